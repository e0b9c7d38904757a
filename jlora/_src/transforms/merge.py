"""Fold an adapter into its base, or take it back out."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import Adapter, is_lora, is_whole, match
from jlora._src.config import LoraError
from jlora._src.interpret import sym as sy
from jlora._src.numerics.quantize import dequantize
from jlora._src.numerics.quantize import requantize as requantize_like
from jlora._src.numerics.qview import wrap
from jlora._src.qnode import is_quantized
from jlora._src.targets import Leaf, Params, flatten, path_str
from jlora._src.transforms import whole_leaves


def _check_finite(changed: list) -> None:
    if not changed or any(isinstance(v, jax.core.Tracer) for _, v in changed):
        return
    finite = np.asarray(jnp.stack([jnp.isfinite(v).all() for _, v in changed]))
    if not finite.all():
        bad = changed[int(np.argmin(finite))][0]
        raise LoraError(
            f"merging the adapter into {bad!r} gives non-finite values "
            "(NaN/Inf); check the adapter for diverged training before merging"
        )


class MergeResult(NamedTuple):
    """What :func:`merge_with_norms` returns: the merged tree and DoRA's norms.

    Examples:
      See :func:`merge_with_norms`'s.
    """

    params: Params
    #: ``{path: n}``: each DoRA leaf's norm of ``W0 + s * A @ B`` (what :func:`unmerge` needs).
    norms: dict


def merge(
    params: Params, adapter: Adapter, *, return_norms: bool = False, requantize: bool = False
) -> Params:
    """The adapted weights as plain arrays: no inference overhead.

    LoRA: ``W0 + s * A @ B``. DoRA: ``(m / n) * (W0 + s * A @ B)`` with ``n`` the
    norm of ``W0 + s * A @ B`` per output feature. A quantized base is dequantized
    (every quantized leaf, adapted or not, comes back in its compute dtype).

    Args:
      params: the base (may hold quantized leaves; not modified).
      adapter: the adapter to fold in.
      return_norms: deprecated (returns ``(merged, norms)``); use
        :func:`merge_with_norms`, which returns a :class:`MergeResult`.
      requantize: quantize each merged quantized leaf again in its own format and
        settings (and leave the other quantized leaves as they were). This rounds
        the merged weight, so the model no longer equals base + adapter; a
        warning says so.

    Returns:
      A tree like ``params`` with each adapted leaf replaced by its merged weight.

    Raises:
      LoraError: a merged leaf is not finite (checked when called outside ``jit``,
        with one device-to-host transfer for all leaves); an activated LoRA (it acts per
        token, which no merged weight can).

    Examples:
      >>> params = {"q_proj": jnp.eye(3)}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets=("q_proj",)))
      >>> bool((jlora.merge(params, ad)["q_proj"] == params["q_proj"]).all())  # B is zero at init
      True
    """
    if return_norms:
        warnings.warn(
            "merge(..., return_norms=True) is deprecated and will be removed in "
            "0.3: use merged, norms = jlora.merge_with_norms(params, adapter)",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(merge_with_norms(params, adapter, requantize=requantize))
    return _merge(params, adapter, requantize, False).params


def merge_with_norms(params: Params, adapter: Adapter, *, requantize: bool = False) -> MergeResult:
    """:func:`merge`, also returning each DoRA leaf's norm, which :func:`unmerge` needs.

    The merged weight ``(m / n) * (W0 + s * A @ B)`` no longer holds ``n``; PEFT caches
    it on the layer, jlora returns it.

    Args:
      params: the base (may hold quantized leaves; not modified).
      adapter: the adapter to fold in.
      requantize: as for :func:`merge`.

    Returns:
      ``MergeResult(params, norms)``; ``norms`` is ``{path: n}`` for the DoRA leaves.

    Raises:
      LoraError: a merged leaf is not finite.

    Examples:
      >>> params = {"q_proj": jnp.eye(3)}
      >>> cfg = jlora.LoraConfig(rank=1, targets=("q_proj",), dora=True)
      >>> ad = jlora.init(jax.random.key(0), params, cfg)
      >>> merged, norms = jlora.merge_with_norms(params, ad)
      >>> sorted(norms), norms["q_proj"].shape
      (['q_proj'], (3,))
      >>> bool(jnp.allclose(jlora.unmerge(merged, ad, norms)["q_proj"], params["q_proj"]))
      True
    """
    return _merge(params, adapter, requantize, True)


def _merge(params: Params, adapter: Adapter, requantize: bool, want_norms: bool) -> MergeResult:
    flat, treedef = flatten(params)
    out: list[Leaf] = []
    changed, norms, rounded = [], {}, ""
    for (kp, leaf), node in zip(flat, match(params, adapter), strict=True):
        if getattr(getattr(node, "node", node), "invocation", None):
            raise LoraError(
                f"{path_str(kp)!r} is an activated LoRA: it acts only from its "
                "invocation on, which a merged weight cannot express (PEFT does "
                "not merge aLoRA either); serve it with apply(..., lora_mask=)"
            )
        if node is None:
            out.append(leaf if requantize or not is_quantized(leaf) else dequantize(leaf))
            continue
        path = path_str(kp)
        if is_whole(node):  # (the finite check covers these too)
            out.append(whole_leaves.merged(leaf, node))
            changed.append((path, out[-1]))
            continue
        node = whole_leaves.lower(leaf, node)[1]  # some layers of a stack: the others zero
        assert is_lora(node)  # (the whole-leaf kinds were merged above)
        out.append(sy.materialize(sy.from_node(wrap(leaf), node, path)))
        changed.append((path, out[-1]))
        if want_norms and node.magnitude is not None:
            norms[path] = sy.node_norm(wrap(leaf), node)
        if requantize and is_quantized(leaf):
            rounded = leaf.qtype.upper()
            out[-1] = requantize_like(leaf, out[-1], path)
    _check_finite(changed)
    if rounded:
        warnings.warn(
            f"merge(requantize=True) rounds base + adapter to {rounded}: the merged "
            "model differs from base + adapter (as with PEFT's merge_and_unload on a "
            "4-bit base); keep the adapter separate for exact outputs",
            stacklevel=3,
        )  # the caller of merge or merge_with_norms
    return MergeResult(jax.tree_util.tree_unflatten(treedef, out), norms)


def unmerge(merged: Params, adapter: Adapter, norms: dict | None = None) -> Params:
    """Inverse of :func:`merge` (exact up to float rounding).

    A DoRA adapter needs the ``norms`` that :func:`merge_with_norms`
    returned: we keep them in the functional return value, where PEFT caches
    them on the layer (and so can only unmerge in the same process).

    Args:
      merged: a tree :func:`merge` returned (not modified).
      adapter: the adapter that was merged.
      norms: the DoRA norms from :func:`merge_with_norms` (DoRA adapters only).

    Returns:
      The base: each adapted leaf with ``s * A @ B`` taken back out.

    Raises:
      LoraError: a DoRA leaf without its norm, or a leaf trained in full or by token
        rows (its base values are gone from the merged tree).

    Examples:
      >>> params = {"q_proj": jnp.eye(3)}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="q_proj"))
      >>> ad = jax.tree.map(lambda x: x + 1.0, ad)  # B nonzero: the merge changes the weight
      >>> back = jlora.unmerge(jlora.merge(params, ad), ad)
      >>> bool(jnp.allclose(back["q_proj"], params["q_proj"], atol=1e-5))
      True
    """
    flat, treedef = flatten(merged)
    out = []
    for (kp, leaf), node in zip(flat, match(merged, adapter), strict=True):
        if node is None:
            out.append(leaf)
            continue
        path = path_str(kp)
        if is_whole(node):
            raise LoraError(
                f"{path!r} was trained in full or by token rows, and the merged "
                "tree no longer holds its base values; keep the base (merge "
                "returns a new tree) instead of unmerging"
            )
        if node.magnitude is not None and path not in (norms or {}):
            raise LoraError(
                f"unmerging the DoRA adapter at {path!r} needs the norms merge "
                "used: merged, norms = jlora.merge_with_norms(params, "
                "adapter); jlora.unmerge(merged, adapter, norms)"
            )
        norm = None if node.magnitude is None else (norms or {})[path]
        node = whole_leaves.lower(leaf, node)[1]
        out.append(sy.dematerialize(sy.from_node(leaf, node, path, norm)))
    return jax.tree_util.tree_unflatten(treedef, out)
