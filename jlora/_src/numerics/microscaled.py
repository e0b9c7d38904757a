"""Block-scaled float formats: ``mxfp4``, ``nvfp4``, ``mxfp8`` and ``fp8_block``.

The formats 2026 models ship in. Each stores small floats (E2M1: the eight magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6; or E4M3, ``float8_e4m3fn``) and one scale per block:

=============  ========  ==========================  ======================  ==============
qtype          elements  block (input x output)      block scale             bytes / param
=============  ========  ==========================  ======================  ==============
``mxfp4``      E2M1      32 x 1 (OCP MX)             E8M0 (a power of two)   0.53
``nvfp4``      E2M1      16 x 1                      E4M3, times one float32 0.56
                                                     per matrix
``mxfp8``      E4M3      32 x 1 (OCP MX)             E8M0                    1.03
``fp8_block``  E4M3      128 x 128 (DeepSeek-V3,     float32                 1.00
                         Qwen3-FP8)
=============  ========  ==========================  ======================  ==============

A weight is read as ``(..., in, out)`` (Flax's layout: blocks run along the input axis,
the second to last); an axis that is not a whole number of blocks ends in a partial one.
A block's scale ``s`` maps its largest magnitude to at most the element format's largest
(6 or 448): E8M0 takes the smallest power of two that does (so nothing clips; the OCP
spec's ``floor`` rule can clip by up to a quarter), NVFP4 rounds ``absmax / 6`` over the
matrix's float32 scale to E4M3 and fp8_block keeps ``absmax / 448`` as it is. Each
element is ``w / s`` rounded to the nearest element value, ties to even, saturating at
the largest: so ``|w - dequantize(w)|`` is at most half the element spacing at ``|w| / s``
times ``s`` (E2M1: 0.25, 0.5 or 1 below 2, 4 and 6), or ``|w| - 6 s`` past the largest
(nvfp4's rounded scale).

E2M1 codes are stored two a byte along the input axis, row ``2i`` in the low nibble (as
gpt-oss stores its ``*_blocks``); E4M3 codes and scales as their ``uint8`` bit patterns,
so that a backend without fp8 arithmetic widens one layer at a time, where it is used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.typing import DTypeLike

from jlora._src.config import LoraError
from jlora._src.numerics import formats
from jlora._src.qnode import Quantized

#: The E2M1 values of the codes 0..15 (bit 3: the sign), as OCP MX and NVFP4 define them.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
LARGEST = {"e2m1": 6.0, "e4m3": 448.0}


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one block-scaled format stores."""

    element: str  # "e2m1" (two codes a byte) or "e4m3"
    scale: str  # "e8m0", "e4m3" (times a float32 per matrix) or "f32"
    block: tuple[int, int]  # rows of the input axis x columns of the output axis


LAYOUTS = {
    "mxfp4": Layout("e2m1", "e8m0", (32, 1)),
    "nvfp4": Layout("e2m1", "e4m3", (16, 1)),
    "mxfp8": Layout("e4m3", "e8m0", (32, 1)),
    "fp8_block": Layout("e4m3", "f32", (128, 128)),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Microscaled(Quantized):
    """A weight stored as small floats times one scale per block (see the module text).

    ``codes`` is ``uint8``: ``(..., ceil(in / 2), out)`` for E2M1 (two codes a byte),
    the weight's shape for E4M3 (the ``float8_e4m3fn`` bits). ``scales`` holds one scale
    per block, ``(..., ceil(in / rows), ceil(out / cols))``: ``uint8`` E8M0 exponents
    (``2 ** (e - 127)``), ``uint8`` E4M3 bits (nvfp4) or ``float32`` (fp8_block, what
    checkpoints call ``weight_scale_inv``). ``tensor_scale`` is nvfp4's float32 scale
    per matrix, ``(..., 1, 1)``, else None.

    Examples:
      >>> import numpy as np
      >>> w = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
      >>> q = jlora.quantize({"w": w}, qtype="mxfp4")["w"]
      >>> q.codes.shape, q.scales.shape, round(q.nbytes / q.size, 3)
      ((32, 32), (2, 32), 0.531)
      >>> err = np.abs(np.asarray(jlora.dequantize(q), np.float32) - w).max()
      >>> bool(err <= 0.125)  # half the top spacing (1) times the scale (2 ** -3)
      True
    """

    codes: Any
    scales: Any
    tensor_scale: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))  # of the original weight
    qtype: str = dataclasses.field(metadata=dict(static=True))
    compute_dtype: Any = dataclasses.field(metadata=dict(static=True))
    spec: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.qtype]


def _e2m1(y: jax.Array) -> jax.Array:
    """The E2M1 code (uint8, 0..15) nearest ``y``, ties to even, saturating at 6."""
    a = jnp.abs(y)
    # midpoints between neighbouring values; at a tie the even code (0, 1, 2, 4) wins,
    # so the midpoints below an even code count when reached, the others when passed
    up = (0.75, 1.75, 3.5)
    past = (0.25, 1.25, 2.5, 5.0)
    mag = sum((a >= m).astype(jnp.uint8) for m in up) + sum((a > m).astype(jnp.uint8) for m in past)
    return mag + jnp.where(jnp.signbit(y), jnp.uint8(8), jnp.uint8(0))


def _from_e2m1(code: jax.Array) -> jax.Array:
    """E2M1 codes (uint8, 0..15) as float32, built bit by bit (elementwise: no table)."""
    code = code.astype(jnp.uint32)
    e, m = (code >> 1) & 3, code & 1  # exponent (bias 1) and mantissa bits
    exponent = jnp.where(e > 0, e + 126, jnp.where(m > 0, 126, 0))  # e = 0: 0 or 0.5
    mantissa = jnp.where(e > 0, m << 22, 0)
    bits = ((code >> 3) << 31) | (exponent << 23) | mantissa
    return lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def _e4m3_bits(y: jax.Array) -> jax.Array:
    y = jnp.clip(y, -LARGEST["e4m3"], LARGEST["e4m3"])
    return lax.bitcast_convert_type(y.astype(jnp.float8_e4m3fn), jnp.uint8)


def _from_e4m3(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.float32)


def _from_e8m0(e: jax.Array) -> jax.Array:
    """``2 ** (e - 127)`` exactly (``e = 0``: 2 ** -127, a float32 subnormal)."""
    normal = lax.bitcast_convert_type(e.astype(jnp.uint32) << 23, jnp.float32)
    return jnp.where(e == 0, jnp.float32(2.0**-127), normal)


def _to_e8m0(amax: jax.Array, largest: float) -> jax.Array:
    """The smallest power of two ``s`` with ``amax / s <= largest``, as a biased exponent."""
    mant, exp = jnp.frexp(amax / largest)  # amax / largest = mant * 2 ** exp, mant in [.5, 1)
    e = jnp.where(mant == 0.5, exp - 1, exp)
    e = jnp.where(amax > largest * jnp.ldexp(jnp.float32(1.0), e), e + 1, e)  # the rounding
    return jnp.where(amax > 0, jnp.clip(e + 127, 0, 254), 127).astype(jnp.uint8)


def _blocks(x: jax.Array, block: tuple[int, int]) -> jax.Array:
    """``x (..., R, C)`` zero-padded to whole blocks, as ``(..., R/r, r, C/c, c)``."""
    (r, c), (rows, cols) = block, x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(0, -rows % r), (0, -cols % c)]
    x = jnp.pad(x, pad)
    return x.reshape((*x.shape[:-2], x.shape[-2] // r, r, x.shape[-1] // c, c))


def _per_block(
    x: jax.Array, s: jax.Array, block: tuple[int, int], op: Callable[..., jax.Array]
) -> jax.Array:
    """``op(x, scale)`` for ``x (..., R, C)`` and each element's block scale (``s
    (..., R/r, C/c)``, the last blocks partial): broadcast over the rows of a block, as
    int4's groups are (no per-element copy of ``s``), repeated over its columns."""
    (r, c), (rows, cols) = block, x.shape[-2:]
    if c > 1:  # (a broadcast and a merge of axes: a mesh's split of C/c carries over)
        s = jnp.broadcast_to(s[..., None], (*s.shape, c)).reshape((*s.shape[:-1], -1))
        s = s[..., :cols]
    if rows % r:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, -rows % r), (0, 0)])
    grouped = x.reshape((*x.shape[:-2], x.shape[-2] // r, r, cols))
    out = op(grouped, s[..., :, None, :]).reshape(x.shape)
    return out[..., :rows, :]


def _pack(codes: jax.Array) -> jax.Array:
    """E2M1 codes two a byte along axis -2: row ``2i`` low, ``2i + 1`` high."""
    if codes.shape[-2] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 2) + [(0, 1), (0, 0)])
    return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)


def _unpack(packed: jax.Array, rows: int) -> jax.Array:
    """The float32 values of E2M1 codes stored two a byte along axis -2 (each nibble
    decoded on its own, then interleaved: interleaving the codes first made XLA keep
    about a quarter more temporaries in a scanned step)."""
    both = jnp.stack([_from_e2m1(packed & 15), _from_e2m1(packed >> 4)], axis=-2)
    values = both.reshape((*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]))
    return values[..., :rows, :]


@functools.partial(jax.jit, static_argnames=("qtype",))
def _quantize(w: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array, jax.Array | None, Any]:
    lay = LAYOUTS[qtype]
    largest = LARGEST[lay.element]
    w = w.astype(jnp.float32)
    amax = jnp.abs(_blocks(w, lay.block)).max(axis=(-3, -1))  # (..., R/r, C/c)
    tensor = None
    if lay.scale == "e8m0":
        scales = _to_e8m0(amax, largest)
        s = _from_e8m0(scales)
    elif lay.scale == "e4m3":  # NVFP4: absmax / 6 over the matrix's scale, rounded to E4M3
        top = amax.max(axis=(-2, -1), keepdims=True)
        tensor = jnp.where(top > 0, top / (LARGEST["e4m3"] * largest), 1.0)
        scales = _e4m3_bits(amax / largest / tensor)
        s = _from_e4m3(scales) * tensor
    else:
        scales = s = amax / largest
    underflow = ((amax > 0) & ~(s > 0)).any()
    y = _per_block(w, s, lay.block, lambda x, s: jnp.where(s > 0, x / jnp.where(s > 0, s, 1), 0))
    codes = _pack(_e2m1(y)) if lay.element == "e2m1" else _e4m3_bits(y)
    return codes, scales, tensor, underflow


def _check(qtype: str, shape: tuple, path: str) -> None:
    if len(shape) < 2:
        raise LoraError(
            f"cannot quantize {path!r} to {qtype}: it has shape {shape}; the blocks run "
            "along the input axis (-2), so it needs two or more axes"
        )


def quantize_array(
    w: jax.Array,
    *,
    qtype: str,
    compute_dtype: DTypeLike = jnp.bfloat16,
    path: str = "weight",
) -> Microscaled:
    """One floating-point array ``(..., in, out)`` to a :class:`Microscaled` node."""
    _check(qtype, tuple(w.shape), path)
    formats.check_finite(w, path)
    sharding = formats.sharding_of(w)
    whole = w if sharding is None else formats.replicated(w)
    codes, scales, tensor, underflow = _quantize(whole, qtype)
    if not isinstance(underflow, jax.core.Tracer) and bool(underflow):
        raise LoraError(
            f"cannot quantize {path!r} to {qtype}: a nonzero block's scale underflows to "
            "zero (its magnitude is too far below the largest block's for the scale "
            "format); rescale the weight, pick another qtype or leave it out of targets"
        )
    node = Microscaled(
        codes, scales, tensor, tuple(w.shape), jnp.dtype(w.dtype), qtype, jnp.dtype(compute_dtype)
    )
    return node if sharding is None else _lay_out(node, sharding)


def _lay_out(node: Microscaled, sharding: NamedSharding) -> Microscaled:
    """Codes and scales split as the weight is, an axis only where its shards hold whole
    blocks (and whole bytes); the matrix scales split along the leading axes."""
    spec = formats.full_spec(sharding, node.ndim)
    (r, c), (rows, cols) = node.layout.block, node.shape[-2:]
    keep = [
        formats.divides(sharding.mesh, spec[-2], rows, r),
        formats.divides(sharding.mesh, spec[-1], cols, c),
    ]
    spec = (*spec[:-2], *(p if k else None for p, k in zip(spec[-2:], keep, strict=True)))
    parts = formats.lay_out(
        {"codes": node.codes, "scales": node.scales, "tensor_scale": node.tensor_scale},
        sharding,
        {"codes": spec, "scales": spec, "tensor_scale": (*spec[:-2], None, None)},
    )
    return dataclasses.replace(node, **parts, spec=formats.full_spec(sharding, node.ndim))


def _decode(node: Microscaled, arrays: dict, lead: tuple, start: int | jax.Array = 0) -> jax.Array:
    lay, codes = node.layout, arrays["codes"]
    e2m1 = lay.element == "e2m1"
    values = _unpack(codes, node.shape[-2]) if e2m1 else _from_e4m3(codes)
    scales = arrays["scales"]
    if lay.scale == "e8m0":
        s = _from_e8m0(scales)
    elif lay.scale == "e4m3":
        s = _from_e4m3(scales) * arrays["tensor_scale"]
    else:
        s = scales
    return _per_block(values, s, lay.block, jnp.multiply).astype(node.compute_dtype)


def dequantize(node: Microscaled, start: int | jax.Array | None, region: tuple) -> jax.Array:
    fields = ("codes", "scales") + (("tensor_scale",) if node.tensor_scale is not None else ())
    return formats.slab_region(node, start, region, fields, node.ndim - 2, _decode)


def _bits(qtype: str, rows: float) -> float:
    """Element bits plus the block scales', the last block of ``rows`` partial."""
    lay = LAYOUTS[qtype]
    r, c = lay.block
    element = 4 if lay.element == "e2m1" else 8
    scale = 32 if lay.scale == "f32" else 8
    per_rows = math.ceil(rows / r) / rows if math.isfinite(rows) else 1 / r
    return element + scale * per_rows / c


for _q in LAYOUTS:
    formats.register(
        _q,
        formats.Format(
            functools.partial(quantize_array, qtype=_q),
            dequantize,
            lambda node: {},
            bits=functools.partial(_bits, _q),
        ),
    )
