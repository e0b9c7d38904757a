"""A quantized weight as the interpreter sees it: dequantized only where it is used.

``QView`` is a region of an :class:`~jlora.quant.NF4` weight (a leading-axis
index such as one layer of a scanned stack: a flat ``start`` and a
``region`` shape) plus layout ops the model applied to it (transpose,
convert, reshape, ...), deferred until the value is needed. A ``dot_general``
with it dequantizes just the region, inside a ``jax.checkpoint`` so the
backward pass dequantizes again instead of keeping the dequantized weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.quant import NF4, dequantize_range, is_nf4

#: Unary layout ops with static parameters that are deferred until the value is used.
_DEFER = {"transpose", "convert_element_type", "reshape", "squeeze", "broadcast_in_dim",
          "expand_dims", "slice", "rev", "copy"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QView:
    node: NF4
    start: Any  # flat element offset of the region (None: 0), may be traced
    region: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    ops: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    aval: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @staticmethod
    def of(node: NF4) -> "QView":
        return QView(node, None, tuple(node.shape), (),
                     jax.ShapeDtypeStruct(tuple(node.shape), node.compute_dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def dtype(self):
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        return len(self.aval.shape)

    @property
    def size(self) -> int:
        return math.prod(self.aval.shape)

    def value(self):
        """The dequantized region with the deferred ops applied."""
        start = 0 if self.start is None else self.start
        x = dequantize_range(self.node, start, math.prod(self.region)).reshape(self.region)
        for prim, params in self.ops:
            x = prim.bind(x, **dict(params))
        return x

    def index(self, lo, size: int | None = None) -> "QView":
        """Rows ``lo .. lo+size`` of the leading axis, or row ``lo`` without that axis
        (``size=None``). No ops may be pending."""
        stride = math.prod(self.region[1:])
        start = lo * stride if self.start is None else self.start + lo * stride
        region = self.region[1:] if size is None else (size,) + self.region[1:]
        return QView(self.node, start, region, (), jax.ShapeDtypeStruct(region, self.dtype))


def is_view(x) -> bool:
    return isinstance(x, QView)


def wrap(leaf):
    """A params leaf as the interpreter carries it: an NF4 leaf as a lazy view."""
    return QView.of(leaf) if is_nf4(leaf) else leaf


def op(view: QView, prim, operands, params: dict):
    """``prim`` applied to the view: a narrower view, a deferred op, or a plain array."""
    name = prim.name
    if not view.ops and name == "slice" and (params["strides"] is None or all(
            s == 1 for s in params["strides"])):
        lo, hi = params["start_indices"], params["limit_indices"]
        if all((l, h) == (0, n) for l, h, n in zip(lo[1:], hi[1:], view.shape[1:])):
            return view.index(lo[0], hi[0] - lo[0])
    if not view.ops and name == "dynamic_slice":
        sizes = params["slice_sizes"]
        if all(s == n for s, n in zip(sizes[1:], view.shape[1:])):
            # full along the other axes (their starts clamp to 0); the leading start is
            # clamped so that the slice fits, as dynamic_slice does
            lo = jnp.clip(operands[0], 0, view.shape[0] - sizes[0])
            return view.index(lo, sizes[0])
    if name in _DEFER and not operands:
        items = tuple(sorted(params.items()))
        aval = jax.eval_shape(lambda x: prim.bind(x, **params), view.aval)
        return dataclasses.replace(view, ops=view.ops + ((prim, items),), aval=aval)
    return prim.bind(view.value(), *operands, **params)


def dot(view: QView, x, view_is_rhs: bool, params: dict):
    """``dot_general`` with the dequantized view, rematerialized in the backward pass."""
    def f(view, x):
        w = view.value()
        return lax.dot_general_p.bind(*((x, w) if view_is_rhs else (w, x)), **params)

    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(view, x)
