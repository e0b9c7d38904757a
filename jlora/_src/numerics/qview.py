"""A quantized weight as the interpreter sees it: dequantized only where it is used.

``QView`` is a region of a quantized weight (any :class:`~jlora.Quantized`) (a leading-axis
index such as one layer of a scanned stack: a flat ``start`` and a
``region`` shape) plus layout ops the model applied to it (transpose,
convert, reshape, ...), deferred until the value is needed. How the
interpreter applies primitives to a view (narrowing, deferring, a dot that
dequantizes inside ``jax.checkpoint``) is ``jlora._src.interpret.quantized``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeGuard

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jlora._src.numerics import mesh
from jlora._src.numerics.formats import dequantize_region
from jlora._src.qnode import Quantized, is_quantized
from jlora._src.targets import Leaf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QView:
    node: Quantized
    start: Any  # flat element offset of the region (None: 0), may be traced
    region: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    ops: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    aval: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @staticmethod
    def of(node: Quantized) -> QView:
        return QView(node, None, tuple(node.shape), (), _aval(node, tuple(node.shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        return len(self.aval.shape)

    @property
    def size(self) -> int:
        return math.prod(self.aval.shape)

    def value(self) -> jax.Array:
        """The dequantized region with the deferred ops applied."""
        x = dequantize_region(self.node, self.start, self.region)
        spec = _region_spec(self.node, self.region)
        if spec is not None and mesh.spec(x) not in (None, spec):  # explicit, codes whole
            x = jax.sharding.reshard(x, PartitionSpec(*spec))  # as the weight (a local cut)
        for prim, params in self.ops:
            x = prim.bind(x, **dict(params))
        return x

    def index(self, lo: int | jax.Array, size: int | None = None) -> QView:
        """Rows ``lo .. lo+size`` of the leading axis, or row ``lo`` without that axis
        (``size=None``). No ops may be pending."""
        stride = math.prod(self.region[1:])
        start = lo * stride if self.start is None else self.start + lo * stride
        region = self.region[1:] if size is None else (size, *self.region[1:])
        return QView(self.node, start, region, (), _aval(self.node, region))


def _region_spec(node: Quantized, region: tuple) -> tuple | None:
    """The spec of a leading-axis region of the weight (a narrowed axis is unsplit)."""
    if node.spec is None:
        return None
    k = len(node.shape) - len(region)
    spec = tuple(node.spec[k:])
    return spec if region[:1] == tuple(node.shape[k : k + 1]) else (None, *spec[1:])


def _aval(node: Quantized, region: tuple) -> jax.ShapeDtypeStruct:
    """What the model sees of a region: its shape, compute dtype and (explicit) sharding."""
    spec = _region_spec(node, region)
    sharding = None if spec is None else mesh.named(jax.tree.leaves(node)[0], spec)
    if sharding is None:
        return jax.ShapeDtypeStruct(region, node.compute_dtype)
    return jax.ShapeDtypeStruct(region, node.compute_dtype, sharding=sharding)


def is_view(x: object) -> TypeGuard[QView]:
    return isinstance(x, QView)


def wrap(leaf: Leaf) -> Any:
    """A params leaf as the interpreter carries it: a quantized leaf as a lazy view."""
    return QView.of(leaf) if is_quantized(leaf) else leaf
