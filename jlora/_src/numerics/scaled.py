"""Symmetric scaled formats: ``int8``, ``int4`` and ``fp8`` (``float8_e4m3fn``).

A weight ``(..., in, out)`` (Flax's layout: the input axis second to last) is cut
along its input axis into groups of ``group_size`` rows; each group has one
float32 scale per output column, ``absmax / qmax``, and each element the code
``round(w / scale)`` (``int8``: ``qmax`` 127; ``int4``: 7, two codes per byte,
rows ``2i`` and ``2i + 1`` in the high and low nibble, offset by 8; ``fp8``:
448, the cast to ``float8_e4m3fn`` rounds; its bits are stored as ``uint8``).
``int8`` and ``fp8`` use one group (one scale per output feature), ``int4``
groups of 128. A dequantized element
is within half a quantization step of the weight: ``scale / 2`` for the
integers, half the e4m3 spacing at ``w / scale`` times ``scale`` for fp8.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.typing import DTypeLike

from jlora._src.config import LoraError
from jlora._src.numerics import formats
from jlora._src.qnode import Quantized

QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
DEFAULT_GROUP = {"int8": None, "int4": 128, "fp8": None}  # None: the whole input axis


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scaled(Quantized):
    """A weight stored as symmetric codes times one float32 scale per group and column.

    ``codes`` is ``int8`` (int8) or ``uint8`` (fp8: the ``float8_e4m3fn`` bit patterns,
    so that a backend without fp8 arithmetic widens one layer at a time, where it is
    used) of the weight's shape, or for int4 ``uint8 (..., ceil(in / 2), out)``;
    ``scales`` is ``float32 (..., in // group_size, out)``. Under a mesh they are split
    as the weight is wherever the shards hold whole groups.

    Examples:
      >>> import numpy as np
      >>> q = jlora.quantize({"w": np.ones((256, 512), np.float32)}, qtype="int8")["w"]
      >>> q.codes.dtype, q.scales.shape, round(q.nbytes / q.size, 3)
      (dtype('int8'), (1, 512), 1.016)
    """

    codes: Any
    scales: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))  # of the original weight
    qtype: str = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    compute_dtype: Any = dataclasses.field(metadata=dict(static=True))
    spec: Any = dataclasses.field(default=None, metadata=dict(static=True))


def _unpack(packed: jax.Array, rows: int) -> jax.Array:
    """int4 codes ``(..., rows, out)`` (signed, as int8) from their bytes."""
    both = jnp.stack([packed >> 4, packed & 15], axis=-2)  # (..., rows/2, 2, out)
    codes = both.reshape((*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]))
    if codes.shape[-2] != rows:
        codes = codes[..., :rows, :]
    return codes.astype(jnp.int8) - 8


def _pack(codes: jax.Array) -> jax.Array:
    if codes.shape[-2] % 2:
        pad = [(0, 0)] * (codes.ndim - 2) + [(0, 1), (0, 0)]
        codes = jnp.pad(codes, pad)
    nib = (codes + 8).astype(jnp.uint8)
    return (nib[..., 0::2, :] << 4) | nib[..., 1::2, :]


@functools.partial(jax.jit, static_argnames=("qtype", "group"))
def _quantize(w: jax.Array, qtype: str, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    shape, qmax = w.shape, QMAX[qtype]
    grouped = w.astype(jnp.float32).reshape((*shape[:-2], shape[-2] // group, group, shape[-1]))
    absmax = jnp.abs(grouped).max(axis=-2)
    scales = absmax / qmax
    safe = jnp.where(scales > 0, scales, 1.0)[..., None, :]
    x = jnp.clip(jnp.where(scales[..., None, :] > 0, grouped / safe, 0.0), -qmax, qmax)
    x = x.reshape(shape)
    if qtype == "fp8":  # stored as the e4m3 bit patterns (see _decode)
        codes = lax.bitcast_convert_type(x.astype(jnp.float8_e4m3fn), jnp.uint8)
    else:
        codes = jnp.round(x).astype(jnp.int8)
    underflow = ((absmax > 0) & ~(scales > 0)).any()
    return (_pack(codes) if qtype == "int4" else codes), scales, underflow


def _group(qtype: str, shape: tuple, group_size: int | None, path: str) -> int:
    if len(shape) < 2:
        raise LoraError(
            f"cannot quantize {path!r} to {qtype}: it has shape {shape}; the "
            "scales run along the input axis (-2), so it needs two or more axes"
        )
    rows = shape[-2]
    group = DEFAULT_GROUP[qtype] if group_size is None else group_size
    group = rows if group is None else min(group, rows)
    if group <= 0 or rows % group:
        raise LoraError(
            f"group_size={group} does not divide the input axis ({rows} rows) "
            f"of {path!r}; pass a group_size that divides {rows}"
        )
    return group


def quantize_array(
    w: jax.Array,
    *,
    qtype: str,
    group_size: int | None = None,
    compute_dtype: DTypeLike = jnp.bfloat16,
    path: str = "weight",
) -> Scaled:
    """One floating-point array ``(..., in, out)`` to a :class:`Scaled` node."""
    group = _group(qtype, tuple(w.shape), group_size, path)
    formats.check_finite(w, path)
    sharding = formats.sharding_of(w)
    whole = w if sharding is None else formats.replicated(w)
    codes, scales, underflow = _quantize(whole, qtype, group)
    if not isinstance(underflow, jax.core.Tracer) and bool(underflow):
        raise LoraError(
            f"cannot quantize {path!r} to {qtype}: a group's scale (absmax / "
            f"{QMAX[qtype]:g}) underflows to zero; rescale the weight or leave it "
            "out of targets"
        )
    node = Scaled(
        codes, scales, tuple(w.shape), jnp.dtype(w.dtype), qtype, group, jnp.dtype(compute_dtype)
    )
    return node if sharding is None else _lay_out(node, sharding)


def _lay_out(node: Scaled, sharding: NamedSharding) -> Scaled:
    """Codes and scales split as the weight is, the input axis only where shards hold
    whole groups or there is one group (and, for int4, whole bytes)."""
    spec = formats.full_spec(sharding, node.ndim)
    rows, g = node.shape[-2], node.group_size
    block = (1 if g == rows else g) * (2 if node.qtype == "int4" else 1)
    if not formats.divides(sharding.mesh, spec[-2], rows, block):
        spec = (*spec[:-2], None, spec[-1])
    parts = formats.lay_out(
        {"codes": node.codes, "scales": node.scales}, sharding, {"codes": spec, "scales": spec}
    )
    return dataclasses.replace(node, **parts, spec=formats.full_spec(sharding, node.ndim))


def _decode(node: Scaled, arrays: dict, lead: tuple, start: int | jax.Array = 0) -> jax.Array:
    rows, cols = node.shape[-2:]
    codes = arrays["codes"]
    if node.qtype == "int4":
        codes = _unpack(codes, rows)
    elif node.qtype == "fp8":  # XLA's CPU backend widens a float8 array where it is made:
        codes = lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)  # here, one layer
    values = codes.astype(jnp.float32)
    g = node.group_size
    if g == rows:  # one group: the scales broadcast over the rows as they are
        return (values * arrays["scales"]).astype(node.compute_dtype)
    grouped = values.reshape((*lead, rows // g, g, cols)) * arrays["scales"][..., None, :]
    return grouped.reshape((*lead, rows, cols)).astype(node.compute_dtype)


def dequantize(node: Scaled, start: int | jax.Array | None, region: tuple) -> jax.Array:
    return formats.slab_region(node, start, region, ("codes", "scales"), node.ndim - 2, _decode)


def _settings(node: Scaled) -> dict:
    return dict(group_size=node.group_size)


def _bits(qtype: str, rows: float) -> float:
    """Code bits plus a float32 scale per group of the input axis (default group size)."""
    code = 4 if qtype == "int4" else 8
    return code + 32 / (DEFAULT_GROUP[qtype] or rows)


for _q in QMAX:
    formats.register(
        _q,
        formats.Format(
            functools.partial(quantize_array, qtype=_q),
            dequantize,
            _settings,
            frozenset({"group_size"}),
            bits=functools.partial(_bits, _q),
        ),
    )
