"""Inits computed from data, through one entry point: LoRA-GA, CorDA and EVA.

LoRA-GA (PEFT's ``init_lora_weights="lora_ga"``) aligns the first step with full
fine-tuning's: each target's gradient ``G`` (``(in, out)`` in jlora's layout),
averaged over the batches, is split by its SVD ``G = P S Q^T`` as PEFT's default
``direction="ArB2r"`` does, ``A = P[:, :r]`` and ``B = S[r:2r] Q[:, r:2r]^T``, ``B``
times PEFT's ``stable`` factor ``out^(1/4) / sqrt(stable_gamma)``, and the base
becomes ``W0 - s A B`` so the model starts unchanged. CorDA: :mod:`jlora._src.transforms.corda`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jlora._src.adapter import Adapter, LayersNode, LoraNode, match
from jlora._src.config import INITS, LoraConfig, LoraError, changes_base, needs_data
from jlora._src.targets import Leaf, Params, flatten, path_str
from jlora._src.transforms import corda, factor_inits
from jlora._src.transforms.eva import eva_adapter
from jlora._src.transforms.init import InitResult, init_with_base

#: The inits :func:`init_from_data` computes (``jlora.init`` refuses them).
DATA_INITS = tuple(name for name, spec in INITS.items() if spec.needs_data)


def init_from_data(
    key: jax.Array,
    params: Params,
    cfg: LoraConfig,
    fn: Callable,
    batches: list,
    loss: Callable[[Any], jax.Array] | None = None,
    **eva_kwargs: Any,
) -> InitResult:
    """An adapter (and base) initialised from data: ``cfg.init`` ``"lora_ga"``, ``"corda"``
    or ``"eva"``.

    Args:
      key: a ``jax.random`` key.
      params: the base (not modified).
      cfg: what to adapt; ``cfg.init`` picks the method, ``cfg.stable_gamma`` is LoRA-GA's
        ``stable_gamma`` (PEFT's ``LoraGAConfig``, default 16), ``cfg.corda_method``
        CorDA's ``"ipm"`` or ``"kpm"``.
      fn: the model, ``fn(params, *args)``.
      batches: a non-empty list of argument tuples for ``fn`` (an array is a one-tuple).
      loss: LoRA-GA: ``loss(fn(params, *batch))``, a scalar; its gradient with respect to
        each target, averaged over the batches, is what the factors follow. One target's
        full gradient is alive at a time.
      **eva_kwargs: EVA's options (``masks``, ``rho``, ``whiten``, ``adjust_scaling``, as
        for :func:`jlora.init_eva`).

    Returns:
      ``InitResult(adapter, params)``: LoRA-GA's and CorDA's base is ``W0 - s A B`` (the
      model is unchanged); EVA leaves the base as it is.

    Raises:
      LoraError: another ``cfg.init``, empty ``batches``, LoRA-GA without a ``loss`` or
        with one that is not a scalar, DoRA or ``layers_to_transform`` with LoRA-GA.

    Examples:
      >>> params = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
      >>> fn = lambda p, x: x @ p["w"]
      >>> x = jax.random.normal(jax.random.key(1), (8, 6))
      >>> cfg = jlora.LoraConfig(rank=2, targets="w", init="lora_ga")
      >>> ad, base = jlora.init_from_data(jax.random.key(2), params, cfg, fn, [x],
      ...                                 loss=lambda y: jnp.mean((y - 1.0) ** 2))
      >>> bool(jnp.allclose(jlora.apply(fn)(base, ad, x), fn(params, x), atol=1e-5))
      True
    """
    if not needs_data(cfg.init):
        raise LoraError(
            f"init_from_data computes init {DATA_INITS}; cfg.init={cfg.init!r} "
            "needs no data: use jlora.init or jlora.init_with_base"
        )
    if not isinstance(batches, (list, tuple)) or not batches:
        raise LoraError(
            "init_from_data(batches=...) must be a non-empty list of argument "
            "tuples for fn (an array counts as a one-tuple)"
        )
    batches = [b if isinstance(b, tuple) else (b,) for b in batches]
    plain = dataclasses.replace(cfg, init="kaiming")
    if cfg.init == "eva":
        return InitResult(eva_adapter(key, params, plain, fn, batches, **eva_kwargs), params)
    if loss is None and cfg.init == "lora_ga":
        raise LoraError(
            "init='lora_ga' follows the gradient of a loss: pass "
            "loss=lambda out: ... (a scalar of fn's output)"
        )
    if cfg.dora:
        raise LoraError(f"init={cfg.init!r} with dora=True: PEFT's has no DoRA form")
    adapter = init_with_base(key, params, plain, fn, *batches[0]).adapter
    if cfg.init == "corda":
        covs = corda.covariances(fn, params, adapter, batches)
        return _each_node(
            params,
            adapter,
            lambda p, node, leaf: corda.factors(node, leaf, covs.get(p), cfg.corda_method, p),
            cfg.init,
        )
    assert loss is not None  # (lora_ga without a loss was refused above)
    return _each_node(
        params,
        adapter,
        lambda p, node, leaf: _factors(
            node, leaf, _mean_grad(params, p, fn, batches, loss), cfg.stable_gamma
        ),
        cfg.init,
    )


def init_eva(  # noqa: PLR0913 (a public signature: keyword options)
    key: jax.Array,
    params: Params,
    cfg: LoraConfig,
    fn: Callable,
    batches: list,
    *,
    masks: Sequence[ArrayLike] | None = None,
    rho: float = 2.0,
    whiten: bool = False,
    adjust_scaling: bool = True,
) -> Adapter:
    """An adapter whose ``A`` factors are the principal directions of each target's inputs.

    EVA, PEFT's ``init_lora_weights="eva"``. An alias, kept for the code that calls it:
    ``init_eva(key, params, cfg, fn, batches, **options)`` is
    ``init_from_data(key, params, replace(cfg, init="eva"), fn, batches, **options)``'s
    adapter (EVA leaves the base as it is).

    Args:
      key: a ``jax.random`` key (for targets no captured input reached).
      params: the base (not modified).
      cfg: what to adapt; ``cfg.init`` must be ``"eva"`` or an init that does not change
        the base (it is replaced by ``"eva"``).
      fn: ``fn(params, *args)``, the model; its dots with each target supply the inputs.
      batches: a non-empty list of argument tuples for ``fn`` (an array is one argument).
      masks: optional list (one per batch) of bool arrays shaped like the inputs' rows,
        e.g. ``(batch, seq)``: False rows (padding, prompt tokens) are left out, as
        PEFT's attention/label masks do.
      rho: each leaf may take up to ``round(rho * r)`` components (PEFT's ``rho`` >= 1;
        1.0: no redistribution).
      whiten: divide each component by the square root of its singular value (PEFT's).
      adjust_scaling: a leaf that ends with rank ``k != r`` gets ``alpha * k / r``, so
        its scaling ``alpha / r`` is unchanged (PEFT's ``adjust_scaling_factors``).

    Returns:
      The adapter; a leaf whose rank comes out 0 is not adapted (``None``), as in PEFT.
      Targets no captured input reached (used other than by ``dot_general``, or inside
      a ``cond``/``while``) keep kaiming factors, with a warning, as in PEFT.

    Raises:
      LoraError: ``cfg.init`` changes the base, bad ``rho``/``batches``, an input with
        fewer rows than components, a scanned ``(layers, in, out)`` leaf whose layers
        would get different ranks.

    Examples:
      >>> params = {"q": jnp.ones((4, 3))}
      >>> x = jax.random.normal(jax.random.key(1), (64, 4)) * jnp.array([[5.0, 0.1, 0.1, 0.1]])
      >>> cfg = jlora.LoraConfig(rank=1, targets="q")
      >>> ad = jlora.init_eva(jax.random.key(0), params, cfg, lambda p, x: x @ p["q"], [x])
      >>> jnp.abs(ad["q"].a[:, 0]).round(1).tolist()  # the inputs' main direction
      [1.0, 0.0, 0.0, 0.0]
    """
    if changes_base(cfg.init):
        raise LoraError(
            f"init_eva computes its own factors; cfg.init={cfg.init!r} would also "
            "change the base: use init='eva' (or init_from_data for that init)"
        )
    eva_cfg = dataclasses.replace(cfg, init="eva")
    options: dict[str, Any] = dict(
        masks=masks, rho=rho, whiten=whiten, adjust_scaling=adjust_scaling
    )
    return init_from_data(key, params, eva_cfg, fn, batches, **options).adapter


def _each_node(
    params: Params,
    adapter: Adapter,
    make: Callable[[str, LoraNode, Leaf], tuple[LoraNode, jax.Array]],
    init: str,
) -> InitResult:
    """Each LoRA node and its base leaf through ``make(path, node, leaf)``."""
    flat, treedef = flatten(params)
    nodes, leaves = [], []
    for (kp, leaf), node in zip(flat, match(params, adapter), strict=True):
        path = path_str(kp)
        if isinstance(node, LayersNode):
            raise LoraError(
                f"init={init!r} with layers_to_transform ({path!r}) is not "
                "supported yet; adapt all the layers of a stack"
            )
        if isinstance(node, LoraNode):
            node, leaf = make(path, node, leaf)
        nodes.append(node)
        leaves.append(leaf)
    return InitResult(
        jax.tree_util.tree_unflatten(treedef, nodes), jax.tree_util.tree_unflatten(treedef, leaves)
    )


def _mean_grad(
    params: Params, path: str, fn: Callable, batches: list, loss: Callable[[Any], jax.Array]
) -> jax.Array:
    """The gradient of ``loss(fn(params, *batch))`` with respect to one leaf, averaged."""
    flat, treedef = flatten(params)
    i = [path_str(kp) for kp, _ in flat].index(path)
    leaves = [leaf for _, leaf in flat]

    def of_leaf(w: jax.Array, *args: Any) -> jax.Array:
        out = loss(
            fn(jax.tree_util.tree_unflatten(treedef, [*leaves[:i], w, *leaves[i + 1 :]]), *args)
        )
        if jnp.shape(out) != ():
            raise LoraError(
                f"init_from_data(loss=...) must return a scalar, got shape "
                f"{jnp.shape(out)}; reduce it (e.g. jnp.mean)"
            )
        return out

    grad = jax.jit(jax.grad(of_leaf))
    total = grad(leaves[i], *batches[0]).astype(jnp.float32)
    for args in batches[1:]:
        total = total + grad(leaves[i], *args).astype(jnp.float32)
    return total / len(batches)


def _factors(
    node: LoraNode, leaf: Leaf, grad: jax.Array, gamma: float
) -> tuple[LoraNode, jax.Array]:
    """``A``, ``B`` from the gradient's SVD (PEFT's ArB2r and stable scale), and the base
    ``W0 - s A B``, each stacked matrix on its own."""
    axes = (node.stack_axes, node.in_axes, node.out_axes)
    g, _ = factor_inits._matrices(grad, axes)
    r = node.rank
    if 2 * r > min(g.shape[-2:]):
        raise LoraError(
            f"init='lora_ga' takes 2 x rank = {2 * r} singular directions of the "
            f"gradient, more than {node.shape} has; lower the rank"
        )
    p, s, qt = jnp.linalg.svd(g, full_matrices=False)
    a = p[..., :, :r]
    b = s[..., r : 2 * r, None] * qt[..., r : 2 * r, :] * (g.shape[-1] ** 0.25 / gamma**0.5)
    w, back = factor_inits._matrices(leaf, axes)
    a, b = a.astype(node.a.dtype), b.astype(node.b.dtype)
    base = back(w - node.scale * a.astype(jnp.float32) @ b.astype(jnp.float32))
    return dataclasses.replace(node, a=a, b=b), base.astype(leaf.dtype)
