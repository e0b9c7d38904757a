"""``init``: an adapter for a base, with gaussian, kaiming (PEFT's default), PiSSA, OLoRA or
LoftQ factors."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jlora._src.adapter import Adapter, LayersNode, LoraNode, Node, default_axes
from jlora._src.config import LAYER_PATTERNS, LoraConfig, LoraError, changes_base, needs_data
from jlora._src.interpret.probe import discover_axes
from jlora._src.numerics.dora import dora_norm
from jlora._src.numerics.quant import dequantize_array
from jlora._src.qnode import is_quantized
from jlora._src.targets import (
    Leaf,
    Params,
    flatten,
    layer_index,
    path_str,
    select,
    select_whole,
)
from jlora._src.transforms import factor_inits, whole_leaves
from jlora._src.transforms.sharding import place


class InitResult(NamedTuple):
    """What :func:`init_with_base` returns: the adapter and the base to use with it.

    Examples:
      See :func:`init_with_base`'s.
    """

    adapter: Adapter
    #: ``params`` itself, or for PiSSA and OLoRA the residual, for LoftQ the NF4 base.
    base: Params


def init(
    key: jax.Array,
    params: Params,
    cfg: LoraConfig,
    fn: Callable | None = None,
    *args: Any,
    **kwargs: Any,
) -> Adapter:
    """Create an adapter for ``params``: a tree mirroring it, ``None`` where not adapted.

    Args:
      key: a ``jax.random`` key; leaf ``i`` uses ``fold_in(key, i)``.
      params: the frozen base pytree (not modified).
      cfg: what to adapt and how.
      fn: optional ``fn(params, *args, **kwargs)``; when given, each target's
        stacked/in/out axes are learned from how ``fn`` contracts it.
      *args: example inputs for ``fn`` (only shapes matter).
      **kwargs: example keyword inputs for ``fn``.

    Returns:
      The adapter. For ``cfg.init`` ``"pissa"``, ``"olora"`` or ``"loftq"``, which change
      the base, use :func:`init_with_base`; ``init`` still returns ``(adapter, base)`` for
      those, with a ``DeprecationWarning``, until 0.3.

    Raises:
      LoraError: no target matched, a rank exceeds a kernel's smaller side, a kernel's
        axes cannot be told without ``fn``.

    Examples:
      >>> params = {"q_proj": {"kernel": jnp.ones((4, 6))}}
      >>> ad = init(jax.random.key(0), params, LoraConfig(rank=2, targets=("q_proj",)))
      >>> ad["q_proj"]["kernel"].a.shape, ad["q_proj"]["kernel"].b.shape
      ((4, 2), (2, 6))
    """
    if changes_base(cfg.init):
        warnings.warn(
            f"jlora.init with init={cfg.init!r} returning (adapter, base) is "
            "deprecated and will be removed in 0.3: use adapter, base = "
            "jlora.init_with_base(key, params, cfg, ...)",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(init_with_base(key, params, cfg, fn, *args, **kwargs))
    return init_with_base(key, params, cfg, fn, *args, **kwargs).adapter


def init_with_base(
    key: jax.Array,
    params: Params,
    cfg: LoraConfig,
    fn: Callable | None = None,
    *args: Any,
    **kwargs: Any,
) -> InitResult:
    """:func:`init`, also returning the base to train and serve the adapter with.

    PiSSA and OLoRA move the top of each target's spectrum (or its QR part) into the
    factors and leave the residual in the base; LoftQ returns the NF4-quantized base its
    factors correct. Every other init returns ``params`` itself as the base.

    Args:
      key: a ``jax.random`` key.
      params: the base pytree (not modified).
      cfg: what to adapt and how.
      fn: optional model function to learn each target's axes from (as for :func:`init`).
      *args: example inputs for ``fn``.
      **kwargs: example keyword inputs for ``fn``.

    Returns:
      ``InitResult(adapter, base)``.

    Raises:
      LoraError: as for :func:`init`.

    Examples:
      >>> params = {"q_proj": jnp.diag(jnp.arange(1.0, 5.0))}
      >>> cfg = LoraConfig(rank=1, targets="q_proj", init="pissa")
      >>> adapter, base = init_with_base(jax.random.key(0), params, cfg)
      >>> float(base["q_proj"][3, 3])  # the top singular value moved into the factors
      0.0
    """
    if needs_data(cfg.init):
        raise LoraError(
            f"init={cfg.init!r} is computed from data: use jlora.init_from_data("
            "key, params, cfg, fn, batches, loss=...)"
        )
    _check_key(key, params, cfg)
    chosen, whole = select(params, cfg), select_whole(params, cfg)
    both = sorted(set(chosen) & set(whole))
    if both:
        raise LoraError(
            f"{both[0]!r} is both a LoRA target and in modules_to_save / "
            "trainable_token_indices; a leaf trains one way: narrow targets "
            "(exclude=...) or the other field"
        )
    learned = {}
    if fn is not None:
        learned = discover_axes(fn, params, set(chosen), args, kwargs)
    flat, treedef = flatten(params)
    nodes: list[Node | None] = []
    residual = []
    for i, (kp, leaf) in enumerate(flat):
        path = path_str(kp)
        if path in whole:
            nodes.append(whole_leaves.make(path, leaf, whole[path]))
            residual.append(leaf)
            continue
        if path not in chosen:
            nodes.append(None)
            residual.append(leaf)
            continue
        axes, origin = learned.get(path), "fn"
        if axes is None:
            _check_unambiguous(path, leaf, flat, fn is not None)
            axes, origin = default_axes(leaf.ndim), "flax"
        make = _make_node if not _some_layers(cfg, path) else _make_layers_node
        node, res = make(jax.random.fold_in(key, i), leaf, path, cfg, *chosen[path], axes)
        node = _with_origin(node, origin)
        nodes.append(node)
        residual.append(res)
    adapter = jax.tree_util.tree_unflatten(treedef, nodes)
    adapter = place(params, adapter)  # a sharded base gets an adapter sharded like it
    if changes_base(cfg.init):
        return InitResult(adapter, jax.tree_util.tree_unflatten(treedef, residual))
    return InitResult(adapter, params)


def _is_key(x: Any) -> bool:
    """A ``jax.random.key`` or a legacy ``PRNGKey`` (uint32 of shape ``(2,)``)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (
        dtype == jnp.uint32 and tuple(jnp.shape(x)) == (2,)
    )


def _check_key(key: jax.Array, params: Params, cfg: LoraConfig) -> None:
    if _is_key(key):
        return
    if _is_key(params) or isinstance(key, LoraConfig):
        raise LoraError(
            "init's arguments are in the wrong order: the random key comes first, "
            "jlora.init(key, params, cfg, ...), e.g. jlora.init(jax.random.key(0), "
            "params, cfg)"
        )
    raise LoraError(
        f"init's first argument must be a jax.random key (jax.random.key(0)), "
        f"not {type(key).__name__}: jlora.init(key, params, cfg, ...)"
    )


def _scan_stacked(path: str, leaf: Leaf, flat: list) -> bool:
    """Whether ``leaf`` looks like one kernel of a Flax ``nn.scan`` stack: some ancestor
    module above its own holds two or more leaves, all of them at least 2-D with the same
    leading size (the layer axis that ``variable_axes={"params": 0}`` puts first)."""
    parts = path.split("/")
    paths = [(path_str(kp).split("/"), x) for kp, x in flat]
    for depth in range(len(parts) - 1):
        under = [x for p, x in paths if p[:depth] == parts[:depth] and len(p) > depth]
        if len(under) > 1 and all(len(x.shape) >= 2 and x.shape[0] == leaf.shape[0] for x in under):
            return True
    return False


def _check_unambiguous(path: str, leaf: Leaf, flat: list, traced: bool) -> None:
    """Without ``fn``, only 2-D kernels and Flax scan stacks of them have a known layout."""
    if leaf.ndim == 2 or (leaf.ndim == 3 and _scan_stacked(path, leaf, flat)):
        return
    how = (
        "fn never contracts it in the traced example"
        if traced
        else "no fn was given to learn it from"
    )
    raise LoraError(
        f"cannot tell which axes of {path!r} {tuple(leaf.shape)} are in, out or stacked "
        f"({how}): it may be a head-split attention kernel (in, heads, head_dim), a "
        "convolution kernel or a stack that is not a Flax scan; learn them by tracing: "
        "jlora.init(key, params, cfg, fn, *example_args) with the model's apply function"
    )


def _with_origin(node: LoraNode | LayersNode, origin: str) -> LoraNode | LayersNode:
    if isinstance(node, LayersNode):
        return dataclasses.replace(node, node=dataclasses.replace(node.node, axes_from=origin))
    return dataclasses.replace(node, axes_from=origin)


def _some_layers(cfg: LoraConfig, path: str) -> bool:
    return (
        cfg.layers_to_transform is not None
        and layer_index(path, cfg.layers_pattern or LAYER_PATTERNS) == "stack"
    )


def _make_layers_node(
    key: jax.Array,
    w: Leaf,
    path: str,
    cfg: LoraConfig,
    rank: int,
    alpha: float,
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
) -> tuple[LayersNode, Leaf]:
    """A node on ``cfg.layers_to_transform`` of a scanned stack (its first stacked axis)."""
    layers = tuple(sorted(set(cfg.layers_to_transform or ())))
    if not axes[0] or is_quantized(w) or cfg.init == "loftq":
        why = (
            "has no stacked axis"
            if not axes[0]
            else "would be NF4 in part (adapt all its layers, or quantize after init)"
        )
        raise LoraError(f"layers_to_transform={list(layers)}: {path!r} {why}")
    ax, length = axes[0][0], w.shape[axes[0][0]]
    if layers[-1] >= length:
        raise LoraError(
            f"layers_to_transform={list(layers)}: {path!r} stacks {length} layers "
            f"(axis {ax}); use indices below {length}"
        )
    ids = jnp.asarray(layers)
    node, res = _make_node(key, jnp.take(w, ids, axis=ax), path, cfg, rank, alpha, axes)
    if changes_base(cfg.init):  # the residual of the chosen layers, in place
        w = w.at[(slice(None),) * ax + (ids,)].set(res)
    return LayersNode(node=node, layers=layers, length=length), w


def factor_dtype(dtype: DTypeLike | None, base_dtype: DTypeLike) -> np.dtype:
    """The factors' dtype: ``dtype``; for None, float32 on a base of lower precision (bf16,
    f16, fp8: PEFT's ``autocast_adapter_dtype``), else the base's; ``"base"``: the base's."""
    if isinstance(dtype, str) and dtype == "base":
        return jnp.dtype(base_dtype)
    if dtype is not None:
        return jnp.dtype(dtype)
    base = jnp.dtype(base_dtype)
    low = jnp.issubdtype(base, jnp.floating) and jnp.finfo(base).bits < 32
    return jnp.dtype(jnp.float32) if low else base


def _make_node(
    key: jax.Array,
    w: Leaf,
    path: str,
    cfg: LoraConfig,
    rank: int,
    alpha: float,
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
) -> tuple[LoraNode, Leaf]:
    stack_axes, in_axes, out_axes = axes

    def size(group: tuple[int, ...]) -> int:
        return math.prod(w.shape[ax] for ax in group)

    n_in, n_out = size(in_axes), size(out_axes)
    if rank > min(n_in, n_out):
        raise LoraError(
            f"rank {rank} for {path!r} exceeds min(in={n_in}, out={n_out}) of its "
            f"kernel {tuple(w.shape)}; lower the rank (rank_pattern can set it "
            "per path)"
        )
    if changes_base(cfg.init) and is_quantized(w):
        then = (
            "it returns the quantized base"
            if cfg.init == "loftq"
            else "then jlora.quantize the residual it returns"
        )
        raise LoraError(
            f"init={cfg.init!r} changes the base, but {path!r} is already "
            f"quantized; run jlora.init with {cfg.init} on the float base ({then})"
        )
    dtype = factor_dtype(cfg.dtype, w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or (
        jnp.finfo(dtype).nmant < jnp.finfo(w.dtype).nmant
    ):
        raise LoraError(
            f"dtype={cfg.dtype!r} for {path!r}: factors in {dtype} on a {w.dtype} "
            f"weight would silently round every update to {dtype}; use dtype=None "
            "(float32, or the base's dtype if wider) or a wider float; to save "
            "memory, cast or jlora.quantize the base instead"
        )
    stack = tuple(w.shape[ax] for ax in stack_axes)
    scale = cfg.scaling_for(rank, alpha)
    (a, b), res = factor_inits.fresh(cfg.init, key, path, (stack, n_in, n_out, rank), dtype), w
    if changes_base(cfg.init):
        a, b, res = factor_inits.base_changing(cfg, w, axes, rank, scale, dtype, key)
    node = LoraNode.of(
        a,
        b,
        alpha=alpha,
        shape=w.shape,
        axes=(stack_axes, in_axes, out_axes),
        rslora=cfg.rslora,
        dropout=cfg.dropout,
        invocation=cfg.alora_invocation_tokens,
    )
    if cfg.dora:  # magnitude = ||W0 + s A B|| per output feature: the model is unchanged
        a_u, b_u, _ = node.unflat()
        base = dequantize_array(res) if is_quantized(res) else res  # LoftQ: the quantized base
        norm = dora_norm(base, a_u, b_u, scale, stack_axes, in_axes, out_axes)
        node = dataclasses.replace(node, magnitude=norm.reshape((*stack, n_out)).astype(dtype))
    return node, res
