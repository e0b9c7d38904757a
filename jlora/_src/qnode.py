"""What every quantized weight is: the base class of the storage nodes (data only).

A leaf of the frozen base may be a :class:`Quantized` node instead of an array
(:class:`~jlora._src.nf4.NF4`, or a node of another format registered in
``jlora._src.numerics.formats``); the key-path helpers treat it as one leaf and the
interpreter as a lazily dequantized view.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import jax


class Quantized:
    """Base class of the quantized storage nodes: :class:`jlora.NF4` and the ``int8``,
    ``int4`` and ``fp8`` nodes of :func:`jlora.quantize`.

    A subclass is a frozen dataclass registered as a pytree whose arrays are the codes
    and scales and whose static fields include ``shape``, ``dtype`` (of the original
    weight), ``compute_dtype`` (what a use dequantizes to) and ``spec`` (quantized on a
    mesh: the original weight's partition spec; else None).

    Examples:
      >>> import numpy as np
      >>> q = jlora.quantize({"w": np.ones((256, 512), np.float32)}, qtype="int4")["w"]
      >>> isinstance(q, jlora.Quantized), q.qtype, q.shape, round(q.nbytes / q.size, 3)
      (True, 'int4', (256, 512), 0.531)
    """

    qtype: Any
    shape: tuple[int, ...]
    dtype: Any
    compute_dtype: Any
    spec: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def sharding(self) -> jax.sharding.NamedSharding | None:
        """The weight's ``NamedSharding`` when its codes lie on a mesh (else None): what
        ``adapter_shardings`` and ``init`` lay the adapter out after."""
        first = jax.tree.leaves(self)[0]
        try:
            sharding = first.sharding
        except Exception:  # a tracer, or an array with no sharding
            return None
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        spec = (
            self.spec
            if self.spec is not None
            else (tuple(sharding.spec) if first.ndim == self.ndim else None)
        )
        if spec is None:
            return None
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales (what the node stores)."""
        return sum(int(p.size) * p.dtype.itemsize for p in jax.tree.leaves(self))


def is_quantized(x: object) -> TypeGuard[Quantized]:
    return isinstance(x, Quantized)
