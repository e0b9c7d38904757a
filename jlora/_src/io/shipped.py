"""Quantized checkpoints as models ship them, read with their bytes kept.

:func:`load_quantized` recognizes each quantized weight of a checkpoint by its keys and
makes it a :class:`~jlora.Quantized` leaf from the stored bytes, permuted at most (nothing
is dequantized or rounded again):

- bitsandbytes 4-bit (``<m>.weight`` with ``.absmax``, ``.quant_map``, ``.quant_state.*``):
  an NF4 leaf, as :func:`jlora.load_bitsandbytes` reads it;
- gpt-oss MXFP4 (``<name>_blocks``: ``uint8 (..., out, in / 32, 16)``, two E2M1 codes a
  byte, the even element in the low nibble; ``<name>_scales``: ``uint8 (..., out, in /
  32)`` E8M0 exponents): an ``mxfp4`` leaf ``<name>`` of shape ``(..., in, out)``, the
  layout ``transformers.integrations.mxfp4.convert_moe_packed_tensors`` dequantizes to;
- block-scaled FP8 (``<m>.weight``: ``float8_e4m3fn (..., out, in)``; ``<m>.weight_scale_inv``:
  ``float32``, one per 128 x 128 block, as DeepSeek-V3 and Qwen3-FP8 store it and
  transformers' ``FineGrainedFP8`` reads it): an ``fp8_block`` leaf in torch's ``(out,
  in)`` layout (the block is square, so the stored bytes are the node's as they are).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jlora._src.config import LoraError
from jlora._src.io.bitsandbytes import nf4_leaves, tree
from jlora._src.io.tensors import Tensors
from jlora._src.numerics.microscaled import LAYOUTS, Microscaled
from jlora._src.targets import Params

#: Key endings of quantization state that some layout must claim.
_STATE_SUFFIXES = ("_blocks", "_scales", "_scale", "_scale_inv", ".absmax", "_packed")


def load_quantized(
    source: str | os.PathLike | Mapping, *, compute_dtype: DTypeLike | None = None
) -> Params:
    """Read a quantized checkpoint as stored: bitsandbytes NF4, gpt-oss MXFP4 or block FP8.

    Args:
      source: a ``.safetensors`` file, a directory of them (a transformers checkpoint),
        or a dict of arrays keyed as the state dict is. Files are memory-mapped and read
        one tensor at a time.
      compute_dtype: the dtype each quantized weight is dequantized to where it is used
        (default: bfloat16; NF4: the dtype its quant state records).

    Returns:
      A nested dict by module path (``model.layers.0.mlp.experts.gate_up_proj_blocks`` ->
      ``["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]``): a
      :class:`jlora.Quantized` leaf per quantized weight (NF4 and FP8 in torch's ``(out,
      in)`` layout, gpt-oss MXFP4 experts as ``(..., in, out)``, as transformers
      dequantizes each), and every other tensor as an array.

    Raises:
      LoraError: a missing scale or block tensor, a shape or dtype that does not fit its
        layout, a float8 weight or scale-like key no layout reads; each names the key.

    Examples:
      >>> import numpy as np
      >>> w = np.ones((256, 128), np.float32).astype(jnp.float8_e4m3fn)
      >>> state = {"fc.weight": w, "fc.weight_scale_inv": np.full((2, 1), 0.5, np.float32)}
      >>> leaf = jlora.load_quantized(state)["fc"]["weight"]
      >>> leaf.qtype, leaf.shape, float(jlora.dequantize(leaf)[0, 0])
      ('fp8_block', (256, 128), 0.5)
    """
    tensors = Tensors(source)
    return tree(tensors, [nf4_leaves, mxfp4_leaves, fp8_block_leaves, _unread], compute_dtype)


def mxfp4_leaves(tensors: Mapping, used: set, compute_dtype: DTypeLike | None) -> dict:
    """``{name: mxfp4 node}`` for each gpt-oss ``<name>_blocks`` / ``<name>_scales`` pair."""
    out = {}
    for key in [k for k in tensors if k.endswith("_blocks")]:
        name = key.removesuffix("_blocks")
        blocks, scales = tensors[key], _needs(tensors, name + "_scales", key)
        if (
            blocks.ndim < 3
            or blocks.dtype != np.uint8
            or blocks.shape[-1] != 16
            or scales.dtype != np.uint8
            or scales.shape != blocks.shape[:-1]
        ):
            raise LoraError(
                f"gpt-oss MXFP4: {key!r} {blocks.dtype}{list(blocks.shape)} with "
                f"{name + '_scales'!r} {scales.dtype}{list(scales.shape)}; expected uint8 "
                "(..., out, in/32, 16) blocks and uint8 (..., out, in/32) scales"
            )
        *lead, rows, groups, _ = blocks.shape
        codes = np.swapaxes(blocks.reshape(*lead, rows, groups * 16), -1, -2)
        out[name] = Microscaled(
            jnp.asarray(np.ascontiguousarray(codes)),
            jnp.asarray(np.ascontiguousarray(np.swapaxes(scales, -1, -2))),
            None,
            (*lead, groups * 32, rows),
            jnp.dtype(jnp.bfloat16),
            "mxfp4",
            jnp.dtype(compute_dtype or jnp.bfloat16),
        )
        used.update({key, name + "_scales"})
    return out


def fp8_block_leaves(tensors: Mapping, used: set, compute_dtype: DTypeLike | None) -> dict:
    """``{<m>.weight: fp8_block node}`` for each ``weight`` / ``weight_scale_inv`` pair."""
    out = {}
    r, c = LAYOUTS["fp8_block"].block
    for key in [k for k in tensors if k.endswith("weight_scale_inv")]:
        name = key.removesuffix("_scale_inv")
        weight, scale = _needs(tensors, name, key), tensors[key]
        want = (*weight.shape[:-2], -(-weight.shape[-2] // r), -(-weight.shape[-1] // c))
        if weight.dtype != jnp.float8_e4m3fn or weight.ndim < 2 or scale.shape != want:
            raise LoraError(
                f"block FP8: {name!r} {weight.dtype}{list(weight.shape)} with {key!r} "
                f"{list(scale.shape)}; expected a float8_e4m3fn weight and a float32 scale "
                f"per {r} x {c} block, {list(want)}"
            )
        out[name] = Microscaled(
            jnp.asarray(np.ascontiguousarray(weight).view(np.uint8)),
            jnp.asarray(scale, jnp.float32),
            None,
            tuple(weight.shape),
            jnp.dtype(jnp.bfloat16),
            "fp8_block",
            jnp.dtype(compute_dtype or jnp.bfloat16),
        )
        used.update({key, name})
    return out


def _unread(tensors: Tensors, used: set, compute_dtype: DTypeLike | None) -> dict:
    """Refuse what looks quantized and no layout read (a finder that finds nothing)."""
    for key in tensors:
        if key in used:
            continue
        if key.endswith(_STATE_SUFFIXES) or tensors.dtype(key) in (
            jnp.float8_e4m3fn,
            jnp.float8_e5m2,
        ):
            raise LoraError(
                f"{key!r} looks quantized, but no layout jlora reads claims it (bitsandbytes "
                "NF4, gpt-oss MXFP4 *_blocks/*_scales, block FP8 weight/weight_scale_inv); "
                "dequantize it before loading, or load the others without it"
            )
    return {}


def _needs(tensors: Mapping, key: str, by: str) -> np.ndarray:
    if key not in tensors:
        raise LoraError(f"{by!r} needs {key!r}, which the checkpoint lacks")
    return tensors[key]
