"""``jlora.quantize`` and ``jlora.dequantize``: a params tree to and from quantized nodes,
in any registered format (:mod:`jlora._src.numerics.formats`)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jlora._src.config import LoraError
from jlora._src.numerics import formats, microscaled, quant, scaled
from jlora._src.qnode import Quantized, is_quantized
from jlora._src.targets import _NOT_KERNELS, Params, flatten, matches, path_str

#: The modules that register the formats (NF4; int8, int4, fp8): imported for that, so
#: that ``quantize`` knows them whatever else was imported first.
FORMAT_MODULES = (quant, scaled, microscaled)


def _default_targets(path: str, leaf: jax.Array) -> bool:
    return (
        leaf.ndim >= 2
        and path.split("/")[-1] not in _NOT_KERNELS
        and re.search(r"embed|lm_head|norm", path) is None
    )


def _options(qtype: str, given: dict) -> dict:
    """The format's options from ``quantize``'s keywords (None: not given)."""
    if qtype not in formats.FORMATS:
        raise LoraError(f"qtype={qtype!r} is not a format; use one of {sorted(formats.FORMATS)}")
    fmt = formats.FORMATS[qtype]
    extra = sorted(k for k, v in given.items() if v is not None and k not in fmt.options)
    if extra:
        raise LoraError(
            f"{extra} do not apply to qtype={qtype!r}; it takes "
            f"{sorted(fmt.options) or 'none of them'}"
        )
    return {k: v for k, v in given.items() if v is not None}


def quantize(
    params: Params,
    targets: str | tuple[str, ...] | None = None,
    *,
    qtype: str = "nf4",
    block_size: int | None = None,
    double_quant: bool | None = None,
    group_size: int | None = None,
    compute_dtype: DTypeLike = jnp.bfloat16,
) -> Params:
    """Quantize the selected leaves of ``params``; the others are returned as they are.

    Args:
      params: the base pytree (not modified).
      targets: a regex or tuple of module names, as in :class:`jlora.LoraConfig`;
        default: every floating leaf of two or more dimensions except biases,
        scales and paths matching ``embed|lm_head|norm``: the linear layers,
        which is what bitsandbytes quantizes in transformers.
      qtype: the format: ``"nf4"`` (bitsandbytes' NF4, :class:`jlora.NF4`), ``"int8"``
        (symmetric, one scale per output feature), ``"int4"`` (symmetric, one scale
        per group of the input axis and output feature, two codes per byte) or
        ``"fp8"`` (``float8_e4m3fn``, one scale per output feature); or a block-scaled
        float format as models ship them: ``"mxfp4"`` (E2M1, an E8M0 scale per 32
        inputs), ``"nvfp4"`` (E2M1, an E4M3 scale per 16 inputs and a float32 per
        matrix), ``"mxfp8"`` (E4M3, an E8M0 scale per 32 inputs) or ``"fp8_block"``
        (E4M3, a float32 scale per 128 x 128 block). All but NF4 read the input axis
        as the second to last (Flax's ``(..., in, out)``).
      block_size: NF4 only: elements per absmax block (64).
      double_quant: NF4 only: quantize the absmaxes too (default True: about 4.127
        bits per parameter instead of 4.5).
      group_size: int4 (default 128) and int8/fp8 (default: the whole input axis):
        rows of the input axis that share a scale; an axis shorter than it is one group.
      compute_dtype: the dtype a weight is dequantized to where it is used.

    Returns:
      A tree of the same structure with :class:`jlora.Quantized` nodes in place of
      the selected leaves. ``apply``, ``init``, ``merge``, ``dequantize``, ``check``
      and the checkpoints accept it. A leaf sharded over a mesh keeps its split:
      each device stores the codes and scales of its shard wherever the shards
      hold whole blocks or groups.

    Raises:
      LoraError: an unknown ``qtype`` or an option it does not take, a target that
        matches nothing, an integer leaf, an odd or non-positive ``block_size``, a
        ``group_size`` that does not divide the input axis, a weight with inf or nan,
        or a scale that underflows to zero.

    Examples:
      >>> q = jlora.quantize({"w": jnp.ones((4, 64)), "b": jnp.ones(4)})
      >>> type(q["w"]).__name__, q["b"].shape
      ('NF4', (4,))
      >>> q8 = jlora.quantize({"w": jnp.ones((256, 512))}, qtype="int8")["w"]
      >>> q8.qtype, round(q8.nbytes / q8.size, 3)
      ('int8', 1.016)
      >>> fp4 = jlora.quantize({"w": jnp.ones((256, 512))}, qtype="mxfp4")["w"]
      >>> type(fp4).__name__, fp4.codes.shape, round(fp4.nbytes / fp4.size, 3)
      ('Microscaled', (128, 512), 0.531)
    """
    options = _options(
        qtype, dict(block_size=block_size, double_quant=double_quant, group_size=group_size)
    )
    make = formats.FORMATS[qtype].quantize
    flat, treedef = flatten(params)
    out, hit = [], False
    for kp, leaf in flat:
        path = path_str(kp)
        if is_quantized(leaf):
            out.append(leaf)
            continue
        if targets is None:
            chosen = _default_targets(path, leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
        else:
            chosen = matches(targets, path) and not (
                isinstance(targets, tuple)
                and (leaf.ndim < 2 or path.split("/")[-1] in _NOT_KERNELS)
            )
        hit |= chosen
        if chosen and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise LoraError(
                f"cannot quantize {path!r}: it is {jnp.result_type(leaf)}, not a "
                "floating point weight; leave it out of quantize's targets"
            )
        out.append(
            make(jnp.asarray(leaf), path=path, compute_dtype=compute_dtype, **options)
            if chosen
            else leaf
        )
    if targets is not None and not hit:
        some = [path_str(kp) for kp, leaf in flat if getattr(leaf, "ndim", 0) >= 2][:6]
        raise LoraError(
            f"quantize targets={targets!r} matched no parameter; paths look like {some}"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def requantize(node: Quantized, w: jax.Array, path: str = "weight") -> Quantized:
    """``w`` quantized with ``node``'s format and settings."""
    fmt = formats.of(node)
    return fmt.quantize(w, path=path, compute_dtype=node.compute_dtype, **fmt.settings(node))


def dequantize(tree: Params) -> Params:
    """Every quantized node in ``tree`` (or ``tree`` itself) as an array in its compute dtype.

    Args:
      tree: a pytree holding :class:`jlora.Quantized` leaves (NF4, int8, int4, fp8), or
        one such node.

    Returns:
      The same structure with each quantized node dequantized (the other leaves as
      they are).

    Examples:
      >>> w = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
      >>> back = jlora.dequantize(jlora.quantize({"w": w}, compute_dtype=jnp.float32))["w"]
      >>> back.shape, back.dtype, bool(jnp.abs(back - w).max() < 0.15)  # NF4: 0.14 worst
      ((2, 32), dtype('float32'), True)
    """

    def whole(x: Quantized) -> jax.Array:
        return formats.dequantize_region(x, None, tuple(x.shape))

    if is_quantized(tree):
        return whole(tree)
    return jax.tree_util.tree_map(
        lambda x: whole(x) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )
