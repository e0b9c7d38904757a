"""Validate a base and an adapter before a long run; ``apply(..., safe=True)``'s checks."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.adapter import Adapter, is_node, match
from jlora._src.config import LoraError
from jlora._src.targets import Params, path_str

_NAN_FIX = (
    "find where it came from with jax.config.update('jax_debug_nans', True) or "
    "restore the last good checkpoint"
)


def check(params: Params, adapter: Adapter, *, finite: bool = True) -> int:
    """Check that ``adapter`` fits ``params``; return the adapter's parameter count.

    Checks every adapter entry is a node made for a leaf of ``params`` (path and
    shape), that its factors have the shapes its rank and axes imply and a float
    dtype at least as precise as the weight's, and (``finite=True``) that no
    adapter or params array holds NaN or Inf (one reduction per array, on its device).

    Args:
      params: the base (not modified).
      adapter: the adapter to check against it.
      finite: also check every array for NaN/Inf.

    Returns:
      The number of trainable parameters in ``adapter``.

    Raises:
      LoraError: naming the first bad path, what was found and the fix.

    Examples:
      >>> params = {"q_proj": {"kernel": jnp.ones((4, 6))}}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=("q_proj",)))
      >>> jlora.check(params, ad)
      20
    """
    nodes = match(params, adapter)
    if finite:
        check_finite(adapter, "adapter", _NAN_FIX)
        check_finite(params, "params", _NAN_FIX)
    return sum(leaf.size for n in nodes if n is not None for leaf in jax.tree.leaves(n))


def _named(tree: Any, what: str) -> Iterator[tuple[str, jax.Array]]:
    """``(description, array)`` for each array of a tree; adapter factors as ``'path'.b``."""
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if is_node(leaf):
            for field in dataclasses.fields(leaf):
                value = getattr(leaf, field.name)
                if hasattr(value, "dtype"):
                    yield f"{what} {path_str(kp)!r}.{field.name}", value
        elif hasattr(leaf, "dtype"):
            yield f"{what} {path_str(kp)!r}", leaf


def check_finite(tree: Any, what: str, fix: str) -> None:
    """Raise if a float array of ``tree`` holds NaN/Inf; under a trace, raise at run time."""
    for where, leaf in _named(tree, what):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        bad = jnp.size(leaf) - jnp.sum(jnp.isfinite(leaf))
        if isinstance(bad, jax.core.Tracer):
            jax.debug.callback(functools.partial(_raise, where, jnp.size(leaf), fix), bad)
        else:
            _raise(where, jnp.size(leaf), fix, bad)


def _raise(where: str, size: int, fix: str, bad: jax.Array) -> None:
    if int(bad):
        raise LoraError(
            f"{where} has non-finite values ({int(bad)} of {size} are NaN or Inf); {fix}"
        )
