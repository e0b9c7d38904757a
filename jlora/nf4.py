"""The storage of an NF4-quantized weight: data only (the math is ``jlora.numerics.quant``).

A leaf of the frozen base may be an :class:`NF4` node instead of an array; the
key-path helpers treat it as one leaf, the interpreter as a lazily dequantized view.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4:
    """A weight stored in NF4: ``packed`` codes and per-block scales.

    ``packed`` is ``uint8 (ceil(n/2),)``. Without double quantization
    ``absmax`` is ``float32 (blocks,)`` and ``absmax2``/``offset`` are None;
    with it ``absmax`` holds ``uint8`` dynamic-map codes, ``absmax2`` the
    ``float32 (ceil(blocks/256),)`` scales and ``offset`` the subtracted mean.

    Examples:
      >>> import numpy as np
      >>> q = jlora.quantize({"w": np.ones((4, 64), np.float32)})["w"]
      >>> q.shape, q.packed.shape, q.packed.dtype, q.block_size
      ((4, 64), (128,), dtype('uint8'), 64)
    """

    packed: Any
    absmax: Any
    absmax2: Any
    offset: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))  # of the original weight
    block_size: int = dataclasses.field(metadata=dict(static=True))
    compute_dtype: Any = dataclasses.field(metadata=dict(static=True))
    #: Under an explicit mesh: the original weight's partition spec (the codes are
    #: stored replicated and each use reshards the dequantized weight to it).
    spec: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.absmax, self.absmax2, self.offset)
        return sum(int(p.size) * p.dtype.itemsize for p in parts if p is not None)


def is_nf4(x) -> bool:
    return isinstance(x, NF4)
