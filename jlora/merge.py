"""Fold an adapter into its base, or take it back out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora import symbolic as sy
from jlora.config import LoraError
from jlora.interpret import _nodes, _to_sym
from jlora.targets import path_str


def _fold(params, adapter, sign: float, check: bool):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (kp, leaf), node in zip(flat, _nodes(params, adapter)):
        if node is None:
            out.append(leaf)
            continue
        sym = _to_sym(leaf, node, path_str(kp))
        new = leaf + (sign * sym.scale * sy.delta(sym)).astype(leaf.dtype)
        if check and not isinstance(new, jax.core.Tracer) and not bool(jnp.isfinite(new).all()):
            raise LoraError(f"merging the adapter into {path_str(kp)!r} gives non-finite values "
                            "(NaN/Inf); check the adapter for diverged training before merging")
        out.append(new)
    return jax.tree_util.tree_unflatten(treedef, out)


def merge(params, adapter):
    """``W0 + s * A @ B`` for every adapted leaf: plain arrays, no inference overhead.

    Raises:
      LoraError: a merged leaf is not finite (checked when called outside ``jit``).

    Example:
      >>> params = {"q_proj": jnp.eye(3)}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets=("q_proj",)))
      >>> bool((jlora.merge(params, ad)["q_proj"] == params["q_proj"]).all())  # B is zero at init
      True
    """
    return _fold(params, adapter, 1.0, check=True)


def unmerge(merged, adapter):
    """Inverse of :func:`merge`: ``W' - s * A @ B`` (exact up to float rounding)."""
    return _fold(merged, adapter, -1.0, check=False)
