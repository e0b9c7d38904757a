"""Rules for a quantized weight (a :class:`~jlora._src.numerics.qview.QView`): narrow, defer, dot.

Indexing the leading axis of a view (one layer of a stacked kernel) narrows the
region that will be dequantized; layout ops are deferred until the value is
needed; a ``dot_general`` dequantizes just the region inside ``jax.checkpoint``,
so the backward pass dequantizes again instead of keeping the weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive

from jlora._src.numerics.qview import QView

#: Unary layout ops with static parameters that are deferred until the value is used.
DEFER = frozenset(
    {
        lax.transpose_p,
        lax.convert_element_type_p,
        lax.reshape_p,
        lax.squeeze_p,
        lax.broadcast_in_dim_p,
        lax.slice_p,
        lax.rev_p,
        lax.copy_p,
    }
)


def _narrow(view: QView, prim: Primitive, operands: Sequence, params: dict) -> QView | None:
    """A slice or dynamic slice of the leading axis only, as a narrower region (or None)."""
    if view.ops:
        return None
    if prim is lax.slice_p and (
        params["strides"] is None or all(s == 1 for s in params["strides"])
    ):
        lo, hi = params["start_indices"], params["limit_indices"]
        if all((a, b) == (0, n) for a, b, n in zip(lo[1:], hi[1:], view.shape[1:], strict=True)):
            return view.index(lo[0], hi[0] - lo[0])
    if prim is lax.dynamic_slice_p:
        sizes = params["slice_sizes"]
        if all(s == n for s, n in zip(sizes[1:], view.shape[1:], strict=True)):
            # full along the other axes (their starts clamp to 0); the leading start is
            # clamped so that the slice fits, as dynamic_slice does
            lo = jnp.clip(operands[0], 0, view.shape[0] - sizes[0])
            return view.index(lo, sizes[0])
    return None


def op(view: QView, prim: Primitive, operands: Sequence, params: dict) -> Any:
    """``prim`` applied to the view: a narrower view, a deferred op, or a plain array."""
    narrow = _narrow(view, prim, operands, params)
    if narrow is not None:
        return narrow
    if prim in DEFER and not operands:
        items = tuple(sorted(params.items()))
        aval = jax.eval_shape(lambda x: prim.bind(x, **params), view.aval)
        return dataclasses.replace(view, ops=(*view.ops, (prim, items)), aval=aval)
    return prim.bind(view.value(), *operands, **params)


def dot(view: QView, x: jax.Array, view_is_rhs: bool, params: dict) -> jax.Array:
    """``dot_general`` with the dequantized view, rematerialized in the backward pass."""

    def f(view: QView, x: jax.Array) -> jax.Array:
        w = view.value()
        return lax.dot_general_p.bind(*((x, w) if view_is_rhs else (w, x)), **params)

    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(view, x)
