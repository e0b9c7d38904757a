"""Pre-quantized bitsandbytes 4-bit checkpoints as jlora NF4 leaves, with their bytes kept.

transformers saves a bitsandbytes ``Linear4bit`` weight (``load_in_4bit``) as
``<module>.weight`` (``uint8``, two NF4 codes per byte, the even element in the high
nibble) beside ``<module>.weight.absmax``, ``.weight.quant_map`` and, with double
quantization, ``.weight.nested_absmax`` and ``.weight.nested_quant_map``, plus
``.weight.quant_state.bitsandbytes__nf4``: a JSON dict stored as ``uint8`` bytes
(``blocksize``, ``shape``, ``dtype``, ``nested_blocksize``, ``nested_offset``, ...).
That is jlora's NF4 format (``jlora._src.numerics.quant``), so each weight becomes an
:class:`~jlora._src.nf4.NF4` leaf from the same bytes: nothing is dequantized or rounded
again, and the leaf keeps torch's ``(out, in)`` layout (a model using it as
``x @ W.T`` is served by the interpreter; ``init(fn)`` and ``peft.load(..., fn)``
learn its axes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jlora._src.config import LoraError
from jlora._src.io.tensors import Tensors
from jlora._src.nf4 import NF4
from jlora._src.numerics.quant import DQ_BLOCK, DYNAMIC_CODE, NF4_CODE
from jlora._src.targets import Params

_STATE = "weight.quant_state.bitsandbytes__"
#: ``<module>.weight.<part>`` (or ``weight.<part>`` for a bare layer's state dict).
_MODULE = re.compile(
    r"(?:(.*)\.)?weight\.(?:absmax|quant_map|nested_absmax|nested_quant_map|"
    r"quant_state\.bitsandbytes__\w+)"
)


def load_bitsandbytes(
    source: str | os.PathLike | dict, *, compute_dtype: DTypeLike | None = None
) -> Params:
    """Read a bitsandbytes 4-bit (NF4) checkpoint into a params tree with NF4 leaves.

    Args:
      source: a ``.safetensors`` file, a directory of them (a transformers checkpoint),
        or a dict of arrays keyed as the state dict is.
      compute_dtype: the dtype each NF4 weight is dequantized to where it is used
        (default: the dtype the checkpoint says the weight had, e.g. ``bfloat16``).

    Returns:
      A nested dict by module path (``model.layers.0.q_proj.weight`` ->
      ``["model"]["layers"]["0"]["q_proj"]["weight"]``): an ``NF4`` leaf per quantized
      weight, in torch's ``(out, in)`` layout, and every other tensor as an array.

    Raises:
      LoraError: fp4 codes, a quant map that is not bitsandbytes' NF4 (or its nested map
        not the dynamic map), a missing quant-state entry, sizes that disagree with the
        recorded shape; each names the key.

    Examples:
      >>> import numpy as np
      >>> w = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
      >>> q = jlora.quantize({"w": w}, double_quant=False, compute_dtype=jnp.float32)["w"]
      >>> state = {"fc.weight": np.asarray(q.packed)[:, None], "fc.weight.absmax":
      ...     np.asarray(q.absmax), "fc.weight.quant_map": np.asarray(NF4_CODE),
      ...     "fc.weight.quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps({
      ...         "quant_type": "nf4", "blocksize": 64, "dtype": "float32",
      ...         "shape": [2, 64]}).encode(), np.uint8)}
      >>> leaf = jlora.load_bitsandbytes(state)["fc"]["weight"]
      >>> bool((jlora.dequantize(leaf) == jlora.dequantize(q)).all()), leaf.shape
      (True, (2, 64))
    """
    return tree(Tensors(source), [nf4_leaves], compute_dtype)


def nf4_leaves(tensors: Mapping, used: set, compute_dtype: DTypeLike | None) -> dict:
    """``{weight key: NF4}`` for each bitsandbytes 4-bit weight; their keys go in ``used``."""
    modules = {_prefix(m.group(1)) for m in map(_MODULE.fullmatch, tensors) if m is not None}
    return {m + "weight": _nf4(m, tensors, used, compute_dtype) for m in sorted(modules)}


def tree(tensors: Mapping, finders: list, compute_dtype: DTypeLike | None) -> dict:
    """A nested dict by module path of what each finder makes of its keys (``finder(tensors,
    used, compute_dtype) -> {key: leaf}``) and, as arrays, of the keys none used: one
    tensor read at a time."""
    out: dict = {}
    used: set = set()
    for find in finders:
        for key, leaf in find(tensors, used, compute_dtype).items():
            _put(out, key, leaf)
    for key in tensors:
        if key not in used:
            _put(out, key, jnp.asarray(tensors[key]))
    return out


def _prefix(module: str | None) -> str:
    return "" if module is None else module + "."


def _take(tensors: Mapping, used: set, key: str) -> np.ndarray:
    if key not in tensors:
        raise LoraError(
            f"bitsandbytes checkpoint: {key!r} is missing; a 4-bit weight needs "
            "its packed codes, absmax, quant_map and quant_state entries"
        )
    used.add(key)
    return tensors[key]


def _state(module: str, tensors: Mapping, used: set) -> dict:
    keys = [k for k in tensors if k.startswith(module + _STATE)]
    if not keys:
        raise LoraError(f"bitsandbytes checkpoint: {module + _STATE + 'nf4'!r} is missing")
    if keys != [module + _STATE + "nf4"]:
        raise LoraError(
            f"bitsandbytes checkpoint: {keys[0]!r} holds "
            f"{keys[0].rsplit('__', 1)[-1]!r} codes; jlora reads nf4 only "
            "(quantize with bnb_4bit_quant_type='nf4')"
        )
    state = json.loads(bytes(np.asarray(_take(tensors, used, keys[0]), np.uint8)).decode())
    if state.get("quant_type", "nf4") != "nf4":
        raise LoraError(
            f"bitsandbytes checkpoint: {keys[0]!r} says quant_type="
            f"{state['quant_type']!r}; jlora reads nf4 only"
        )
    for field in ("blocksize", "shape", "dtype"):
        if field not in state:
            raise LoraError(f"bitsandbytes checkpoint: {keys[0]!r} lacks {field!r}")
    return state


def _same(key: str, got: ArrayLike, want: np.ndarray, what: str) -> None:
    got = np.asarray(got, np.float32).reshape(-1)
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-6):
        raise LoraError(
            f"bitsandbytes checkpoint: {key!r} is not {what}; jlora's NF4 "
            "decodes with that map only"
        )


def _nf4(module: str, tensors: Mapping, used: set, compute_dtype: DTypeLike | None) -> NF4:
    key = module + "weight"
    state = _state(module, tensors, used)
    shape, block = tuple(int(n) for n in state["shape"]), int(state["blocksize"])
    packed = np.asarray(_take(tensors, used, key), np.uint8).reshape(-1)
    absmax = np.asarray(_take(tensors, used, key + ".absmax")).reshape(-1)
    _same(
        key + ".quant_map",
        _take(tensors, used, key + ".quant_map"),
        NF4_CODE,
        "bitsandbytes' NF4 map",
    )
    n = int(np.prod(shape))
    if packed.size != (n + 1) // 2 or absmax.size != -(-n // block):
        raise LoraError(
            f"bitsandbytes checkpoint: {key!r} holds {packed.size} bytes and "
            f"{absmax.size} absmax for shape {shape}, blocksize {block}"
        )
    absmax2 = offset = None
    if "nested_offset" in state or key + ".nested_absmax" in tensors:
        absmax2 = jnp.asarray(_take(tensors, used, key + ".nested_absmax"), jnp.float32)
        _same(
            key + ".nested_quant_map",
            _take(tensors, used, key + ".nested_quant_map"),
            DYNAMIC_CODE,
            "bitsandbytes' dynamic map",
        )
        if int(state.get("nested_blocksize", DQ_BLOCK)) != DQ_BLOCK or "nested_offset" not in state:
            raise LoraError(
                f"bitsandbytes checkpoint: {key!r}'s quant_state needs "
                f"nested_offset and nested_blocksize {DQ_BLOCK}"
            )
        offset = jnp.asarray(state["nested_offset"], jnp.float32)
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    dtype = jnp.dtype(state["dtype"])
    return NF4(
        jnp.asarray(packed),
        jnp.asarray(absmax),
        absmax2,
        offset,
        shape,
        dtype,
        block,
        jnp.dtype(compute_dtype or dtype),
    )


def _put(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value
