"""NF4 quantization with double quantization, as bitsandbytes defines it.

A weight is flattened in row-major order and cut into blocks of
``block_size`` (64) consecutive elements. Each block stores its absolute
maximum and, per element, the index of the nearest of the 16 NF4 code values
to ``x / absmax`` (ties go to the lower code), two codes per byte with the
even element in the high nibble. Double quantization stores the absmaxes as
8-bit codes of bitsandbytes' signed dynamic map, after subtracting their
mean, in blocks of 256 with one fp32 scale per block. Bits per parameter:
``4 + 32/64 = 4.5`` without double quantization, ``4 + 8/64 + 32/(64*256)
~= 4.127`` with it (plus one fp32 offset per leaf).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.typing import DTypeLike

from jlora._src.config import LoraError
from jlora._src.nf4 import NF4
from jlora._src.numerics import formats, mesh
from jlora._src.qnode import Quantized

#: bitsandbytes' NF4 code values: ``create_normal_map(offset=0.9677083, use_extra_value=True)``.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
#: Block size of the second quantization level (bitsandbytes' fixed 256).
DQ_BLOCK = 256
#: Bits per parameter at the defaults (64-element blocks, double quantization): 4-bit
#: codes, an 8-bit absmax per block, a float32 scale per 256 absmaxes.
BITS = 4 + 8 / 64 + 32 / (64 * DQ_BLOCK)
_TINY = 1e-38  # bitsandbytes clamps a zero absmax to this before taking its reciprocal


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(..., dtype=float32)``: float32 steps, filled from both ends."""
    step = (np.float32(end) - np.float32(start)) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float32)
    lo = np.float32(start) + step * i
    hi = np.float32(end) - step * (np.float32(steps - 1) - i)
    return np.where(np.arange(steps) < steps // 2, lo, hi).astype(np.float32)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``)."""
    values: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        bounds = _torch_linspace(0.1, 1.0, 2 ** (i + non_sign - max_exponent_bits) + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        values += list(scale * means) + list(-scale * means)
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    if extra > 0:
        bounds = _torch_linspace(0.1, 1.0, extra + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
        values += list(scale * means) + list(-scale * means)
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return np.sort(np.array(values, np.float32))


DYNAMIC_CODE = dynamic_map()


def _bucket(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest code value, ties to the lower one (``torch.bucketize``)."""
    bounds = (code[:-1] + code[1:]) / np.float32(2.0)
    return jnp.searchsorted(jnp.asarray(bounds), scaled, side="left").astype(jnp.uint8)


def _blockwise(flat: jax.Array, block: int, code: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Per-block absmax and code indices of a 1-D float32 array (last block may be short)."""
    n = flat.shape[0]
    full = n - n % block
    absmax = jnp.abs(flat[:full].reshape(-1, block)).max(axis=1)
    # bitsandbytes clamps absmax to 1e-38 so that a zero block scales to 0; XLA on CPU
    # flushes that subnormal to zero, so a zero block is handled explicitly
    recip = jnp.where(absmax > 0, 1.0 / jnp.maximum(absmax, _TINY), 0.0)
    scaled = jnp.clip(flat[:full].reshape(-1, block) * recip[:, None], -1.0, 1.0).reshape(-1)
    if full < n:  # bitsandbytes divides (not multiplies by the reciprocal) in the last block
        tail = jnp.abs(flat[full:]).max()
        part = jnp.where(tail > 0, flat[full:] / jnp.maximum(tail, _TINY), 0.0)
        absmax = jnp.concatenate([absmax, tail[None]])
        scaled = jnp.concatenate([scaled, jnp.clip(part, -1.0, 1.0)])
    return absmax, _bucket(scaled, code)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "compute_dtype"))
def _quantize(w: jax.Array, block_size: int, double_quant: bool, compute_dtype: DTypeLike) -> NF4:
    flat = w.reshape(-1).astype(jnp.float32)
    absmax, q = _blockwise(flat, block_size, NF4_CODE)
    if q.shape[0] % 2:
        q = jnp.concatenate([q, jnp.full((1,), 7, jnp.uint8)])  # code 7 is 0.0
    packed = (q[0::2] << 4) | q[1::2]
    absmax2 = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax2, absmax = _blockwise(absmax - offset, DQ_BLOCK, DYNAMIC_CODE)
    return NF4(
        packed,
        absmax,
        absmax2,
        offset,
        tuple(w.shape),
        jnp.dtype(w.dtype),
        block_size,
        jnp.dtype(compute_dtype),
    )


def quantize_array(
    w: jax.Array,
    *,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: DTypeLike = jnp.bfloat16,
    path: str = "weight",
) -> NF4:
    """One floating-point array to :class:`NF4` (see the module docstring)."""
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise LoraError(
            f"cannot quantize {path!r}: it is {jnp.result_type(w)}, not a floating "
            "point weight; leave it out of quantize's targets"
        )
    if block_size <= 0 or block_size % 2:
        raise LoraError(
            f"block_size={block_size} must be a positive even number (64 is bitsandbytes' default)"
        )
    w = jnp.asarray(w)
    formats.check_finite(w, path)
    sharding = formats.sharding_of(w)
    if sharding is None:
        return _quantize(w, block_size, double_quant, compute_dtype)
    node = _quantize(formats.replicated(w), block_size, double_quant, compute_dtype)
    return _lay_out(node, sharding)


def _lay_out(node: NF4, sharding: NamedSharding) -> NF4:
    """Under a mesh: ``packed`` and ``absmax`` keep the weight's leading axes (the same
    bytes), split as the weight is where each shard holds whole blocks. bitsandbytes'
    blocks run along the flattened weight, so a weight whose rows are not whole blocks
    keeps its codes whole on every device; each use reshards to the weight's spec."""
    spec = formats.full_spec(sharding, node.ndim)
    last, bs = node.shape[-1], node.block_size
    whole = spec  # the weight's, kept on the node
    if node.ndim < 2 or last % bs:
        parts = formats.lay_out({"packed": node.packed, "absmax": node.absmax}, sharding, {})
        return dataclasses.replace(node, **parts, spec=whole)
    if not formats.divides(sharding.mesh, spec[-1], last, bs):
        spec = (*spec[:-1], None)
    rows = node.shape[:-1]
    arrays = {
        "packed": node.packed.reshape((*rows, last // 2)),
        "absmax": node.absmax.reshape((*rows, last // bs)),
        "absmax2": node.absmax2,
        "offset": node.offset,
    }
    parts = formats.lay_out(arrays, sharding, {"packed": spec, "absmax": spec})
    return dataclasses.replace(node, **parts, spec=whole)


def _scales(node: NF4, blocks: jax.Array) -> jax.Array:
    """float32 absmax of the given block indices."""
    if node.absmax2 is None:
        return node.absmax[blocks]
    return (
        jnp.asarray(DYNAMIC_CODE)[node.absmax[blocks]] * node.absmax2[blocks // DQ_BLOCK]
        + node.offset
    )


def _codes(packed: jax.Array) -> jax.Array:
    return jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)


def dequantize_range(node: NF4, start: int | jax.Array, size: int, aligned: bool) -> jax.Array:
    """Elements ``start .. start+size`` of the flattened weight, in ``node.compute_dtype``.

    ``start`` may be traced; ``aligned`` says it is a multiple of the block size (then a
    range of whole blocks slices the bytes). Only that range is dequantized.
    """
    bs, code = node.block_size, jnp.asarray(NF4_CODE)
    if aligned and size % bs == 0:  # whole blocks: slice the bytes, gather their scales
        raw = lax.dynamic_slice_in_dim(node.packed, start // 2, size // 2)
        scales = _scales(node, start // bs + jnp.arange(size // bs))
        return (
            (code[_codes(raw)].reshape(-1, bs) * scales[:, None])
            .reshape(-1)
            .astype(node.compute_dtype)
        )
    if isinstance(start, int) and start == 0 and size == node.size:
        vals = code[_codes(node.packed)][:size]
        return (vals * _scales(node, jnp.arange(size) // bs)).astype(node.compute_dtype)
    idx = start + jnp.arange(size)  # a range that cuts blocks: element by element
    nib = jnp.where(idx % 2 == 0, node.packed[idx // 2] >> 4, node.packed[idx // 2] & 15)
    return (code[nib] * _scales(node, idx // bs)).astype(node.compute_dtype)


def _decode_rows(node: NF4, arrays: dict, lead: tuple, start: int | jax.Array) -> jax.Array:
    """Rows of a weight stored with its leading axes (under a mesh)."""
    packed, absmax = arrays["packed"], arrays["absmax"]
    last, bs = node.shape[-1], node.block_size
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape((*lead, last))
    values = mesh.lookup(NF4_CODE, codes)
    scales = absmax
    if node.absmax2 is not None:
        blocks = start // bs + jnp.arange(math.prod(absmax.shape)).reshape(absmax.shape)
        second = node.absmax2[blocks // DQ_BLOCK]
        spec = mesh.spec(absmax)
        if spec is not None:  # the codes' layout, cut from a small replicated array
            second = jax.sharding.reshard(second, mesh.named(absmax, spec))
        scales = mesh.lookup(DYNAMIC_CODE, absmax) * second + node.offset
    blocked = values.reshape((*lead, last // bs, bs)) * scales[..., None]
    return blocked.reshape((*lead, last)).astype(node.compute_dtype)


def dequantize(node: NF4, start: int | jax.Array | None, region: tuple) -> jax.Array:
    """The region of ``node`` (see :mod:`jlora._src.numerics.formats`)."""
    if node.packed.ndim > 1:
        return formats.slab_region(
            node, start, region, ("packed", "absmax"), node.ndim - 1, _decode_rows
        )
    start = 0 if start is None else start
    # a region's start is a multiple of the stride of its first axis: of whole blocks
    # when that stride is (a row of a stacked weight), else anywhere (part of a row)
    stride = math.prod(node.shape[node.ndim - len(region) + 1 :])
    aligned = stride % node.block_size == 0 or (isinstance(start, int) and start == 0)
    return dequantize_range(node, start, math.prod(region), aligned).reshape(region)


def dequantize_array(node: Quantized) -> jax.Array:
    """The whole weight of any quantized node, ``node.shape`` in ``node.compute_dtype``."""
    return formats.dequantize_region(node, None, tuple(node.shape))


def _settings(node: NF4) -> dict:
    return dict(block_size=node.block_size, double_quant=node.absmax2 is not None)


formats.register(
    "nf4",
    formats.Format(
        quantize_array,
        dequantize,
        _settings,
        frozenset({"block_size", "double_quant"}),
        bits=lambda rows: BITS,
    ),
)
