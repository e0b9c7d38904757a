"""The storage of an NF4-quantized weight: data only (the math is ``jlora._src.numerics.quant``).

A leaf of the frozen base may be an :class:`NF4` node instead of an array; the
key-path helpers treat it as one leaf, the interpreter as a lazily dequantized view.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeGuard

import jax

from jlora._src.qnode import Quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4(Quantized):
    """A weight stored in NF4: ``packed`` codes and per-block scales.

    ``packed`` is ``uint8 (ceil(n/2),)``. Without double quantization
    ``absmax`` is ``float32 (blocks,)`` and ``absmax2``/``offset`` are None;
    with it ``absmax`` holds ``uint8`` dynamic-map codes, ``absmax2`` the
    ``float32 (ceil(blocks/256),)`` scales and ``offset`` the subtracted mean.
    Under a mesh whose shards hold whole blocks, ``packed`` and ``absmax`` keep the
    weight's leading axes (``shape[:-1] + (shape[-1] // 2,)`` and ``shape[:-1] +
    (shape[-1] // block_size,)``, the same bytes in the same order) so that they
    shard as the weight does.

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
    #: Under a mesh: the original weight's partition spec (under an explicit one each
    #: use reshards the dequantized weight to it).
    spec: Any = dataclasses.field(default=None, metadata=dict(static=True))

    qtype = "nf4"


def is_nf4(x: object) -> TypeGuard[NF4]:
    return isinstance(x, NF4)
