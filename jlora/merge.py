"""Fold an adapter into its base, or take it back out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora import symbolic as sy
from jlora.config import LoraError
from jlora.interpret import _nodes, _to_sym
from jlora.targets import path_str


def _fold(params, adapter, sign: float):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out, changed = [], []
    for (kp, leaf), node in zip(flat, _nodes(params, adapter)):
        if node is None:
            out.append(leaf)
            continue
        sym = _to_sym(leaf, node, path_str(kp))
        out.append(leaf + (sign * sym.scale * sy.delta(sym)).astype(leaf.dtype))
        changed.append((path_str(kp), out[-1]))
    return jax.tree_util.tree_unflatten(treedef, out), changed


def merge(params, adapter):
    """``W0 + s * A @ B`` for every adapted leaf: plain arrays, no inference overhead.

    Raises:
      LoraError: a merged leaf is not finite (checked when called outside ``jit``,
        with one device-to-host transfer for all leaves).

    Example:
      >>> params = {"q_proj": jnp.eye(3)}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets=("q_proj",)))
      >>> bool((jlora.merge(params, ad)["q_proj"] == params["q_proj"]).all())  # B is zero at init
      True
    """
    merged, changed = _fold(params, adapter, 1.0)
    if changed and not any(isinstance(v, jax.core.Tracer) for _, v in changed):
        finite = np.asarray(jnp.stack([jnp.isfinite(v).all() for _, v in changed]))
        if not finite.all():
            bad = changed[int(np.argmin(finite))][0]
            raise LoraError(f"merging the adapter into {bad!r} gives non-finite values "
                            "(NaN/Inf); check the adapter for diverged training before merging")
    return merged


def unmerge(merged, adapter):
    """Inverse of :func:`merge`: ``W' - s * A @ B`` (exact up to float rounding)."""
    return _fold(merged, adapter, -1.0)[0]
