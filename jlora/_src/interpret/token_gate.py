"""``lora_mask``'s gate at an adapted use: each row of the input times its token's entry.

:mod:`jlora._src.interpret.token_axes` says where the mask's axes lie in the input; here
that becomes an index into the mask, or a ``LoraError`` where it cannot be told.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora._src.config import LoraError
from jlora._src.interpret.token_axes import At


def gate(
    x: jax.Array, ats: frozenset[At], mask: jax.Array, free: Sequence[int], path: str
) -> jax.Array:
    """``x`` with each row multiplied by its entry of ``mask`` (``free``: x's axes the
    adapted dot neither contracts nor batches); a row whose entry cannot be told is a
    ``LoraError``. A mask axis of size 1 (one request, one decoded token) needs no
    placement: every row is its entry 0, even where the model squeezed that axis away."""
    index = []
    for c, size in enumerate(mask.shape):
        if size == 1:  # every row is entry 0 along this axis, wherever (if) it lies
            index.append(jnp.zeros((1,) * x.ndim, jnp.int32))
            continue
        found = [a for a in ats if a.comp == c]
        a = found[0] if len(found) == 1 else None
        ok = (
            a is not None
            and a.axis is not None
            and a.axis in free
            and a.inner is not None
            and x.shape[a.axis] % a.inner == 0
            and (x.shape[a.axis] == a.inner * size if a.outer is None else a.outer == size)
        )
        if not ok:
            raise LoraError(_why_not(path, x, c, found, size))
        assert a is not None and a.inner is not None and a.axis is not None
        coord = jnp.arange(x.shape[a.axis]) // a.inner
        coord = coord if a.outer is None else coord % a.outer
        index.append(coord.reshape([-1 if d == a.axis else 1 for d in range(x.ndim)]))
    g = mask[tuple(index)]
    if g.dtype == jnp.bool_:
        return jnp.where(g, x, jnp.zeros((), x.dtype))
    return x * g.astype(x.dtype)


def _why_not(path: str, x: jax.Array, c: int, found: list[At], size: int) -> str:
    if not found:
        why = "its rows do not depend on that axis of the mask at all"
    elif len(found) > 1:
        why = f"that axis of the mask lies along several of its axes ({found})"
    elif found[0].axis is None or found[0].inner is None:
        why = f"the tokens' order was lost on the way (at {found[0].why})"
    else:
        why = (
            f"it lies along axis {found[0].axis}, which the adapted dot contracts, batches "
            f"or whose size ({x.shape[found[0].axis]}) does not fit the mask's {size}"
        )
    return (
        f"lora_mask gates {path!r} row by row, but its input of shape {tuple(x.shape)} "
        f"does not say which entry of the mask each row is along mask axis {c}: {why}; "
        "lora_mask needs each array argument that carries the tokens to lead with the "
        "mask's shape, and a model that keeps each token's rows apart up to the weight"
    )
