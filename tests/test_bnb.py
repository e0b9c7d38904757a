"""jlora's NF4 against bitsandbytes itself (the ``interop`` extra), on the CPU.

bitsandbytes' reference quantizer (its torch implementation, which the CPU
backend runs for 4-bit) must give the same bytes; its 8-bit CPU kernel for
the second level may pick the other neighbour for a value within 1e-4 of a
midpoint, so those codes are compared with that stated tolerance.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

import jax.numpy as jnp  # noqa: E402

from jlora._src.numerics import quant  # noqa: E402

SHAPES = [(128, 96), (7, 33), (3, 5), (512, 1408)]


def _bnb(w, double_quant):
    return F.quantize_4bit(
        torch.tensor(w), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )


def test_codebooks_match():
    np.testing.assert_array_equal(quant.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    ref = F.create_dynamic_map(signed=True).numpy()
    # torch.linspace's float32 rounding depends on the CPU's vector width: within 1 ulp
    np.testing.assert_allclose(quant.DYNAMIC_CODE, ref, rtol=0, atol=6e-8)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bytes_and_absmax_equal_bitsandbytes(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    packed, state = _bnb(w, False)
    node = quant.quantize_array(w, double_quant=False)
    np.testing.assert_array_equal(np.asarray(node.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(node.absmax), state.absmax.numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_matches_bitsandbytes(shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.02
    packed, state = _bnb(w, True)
    node = quant.quantize_array(w, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(node.packed), packed.numpy().reshape(-1))
    np.testing.assert_allclose(float(node.offset), float(state.offset), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(node.absmax2), state.state2.absmax.numpy(), rtol=1e-6)
    ours, theirs = np.asarray(node.absmax), state.absmax.numpy()
    # a 256-block whose absmaxes all equal the mean has scale 0: any code decodes the same
    live = np.asarray(node.absmax2)[np.arange(len(ours)) // 256] > 0
    differ = (ours != theirs) & live
    if differ.any():  # only near-ties, and to the neighbouring code
        code = quant.DYNAMIC_CODE
        assert (np.abs(ours[differ].astype(int) - theirs[differ].astype(int)) == 1).all()
        _, raw = F.quantize_4bit(
            torch.tensor(w), blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        centred = raw.absmax.numpy() - float(node.offset)
        scale = np.asarray(node.absmax2)[np.arange(len(centred)) // 256]
        mid = (code[ours[differ]] + code[theirs[differ]]) / 2
        assert (np.abs(centred[differ] / scale[differ] - mid) < 1e-4).all()
    absmax = F.dequantize_blockwise(state.absmax, state.state2).numpy() + float(state.offset)
    ref = _dequantize(packed, absmax, w.size)
    back = np.asarray(quant.dequantize_array(node)).reshape(-1)
    flips = np.repeat(differ, 64)[: w.size]
    np.testing.assert_allclose(back[~flips], ref[~flips], rtol=1e-6, atol=1e-9)


def _dequantize(packed, absmax, n):
    """bitsandbytes' documented layout, decoded in numpy: high nibble first, code * absmax."""
    raw = packed.numpy().reshape(-1)
    codes = np.stack([raw >> 4, raw & 15], axis=1).reshape(-1)[:n]
    return quant.NF4_CODE[codes] * absmax[np.arange(n) // 64]
