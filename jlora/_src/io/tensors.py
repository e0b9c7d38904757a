"""Checkpoint tensors read one at a time from memory-mapped ``.safetensors`` files.

A safetensors file is an 8-byte little-endian header length, a JSON header (each
tensor's ``dtype``, ``shape`` and ``data_offsets`` into the data that follows) and the
data. :class:`Tensors` reads the headers only; indexing it maps that one tensor's
bytes (``numpy.memmap``, read-only), so a loader that converts and drops tensors one
by one never holds the file in host memory twice. It reads every dtype transformers
writes, fp8 included (``safetensors.numpy`` refuses ``F8_E4M3``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from jlora._src.config import LoraError

DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": jnp.float8_e4m3fn,
    "F8_E5M2": jnp.float8_e5m2,
}
if hasattr(jnp, "float8_e8m0fnu"):  # (jax 0.7's numpy namespace lacks it)
    DTYPES["F8_E8M0"] = jnp.float8_e8m0fnu


class Tensors(Mapping):
    """The tensors of a ``.safetensors`` file, a directory of them, or a dict of arrays,
    by key; a file's tensor is read (memory-mapped) when it is indexed.

    Examples:
      >>> import os, tempfile, safetensors.numpy
      >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
      >>> safetensors.numpy.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
      >>> t = Tensors(path)
      >>> list(t), t["w"].shape, float(t["w"][1, 2])
      (['w'], (2, 3), 5.0)
    """

    def __init__(self, source: str | os.PathLike | Mapping) -> None:
        self._arrays: dict = {}
        self._entries: dict[str, tuple[str, int, np.dtype, tuple[int, ...]]] = {}
        if isinstance(source, Mapping):
            self._arrays = dict(source)
            return
        paths = (
            [
                os.path.join(source, f)
                for f in sorted(os.listdir(source))
                if f.endswith(".safetensors")
            ]
            if os.path.isdir(source)
            else [os.fspath(source)]
        )
        if not paths:
            raise LoraError(f"no .safetensors file in {os.fspath(source)!r}")
        for path in paths:
            self._entries.update(_header(path))

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._arrays:
            return np.asarray(self._arrays[key])
        path, start, dtype, shape = self._entries[key]
        count = int(np.prod(shape))
        return np.memmap(path, dtype, "r", offset=start, shape=(count,)).reshape(shape)

    def __contains__(self, key: object) -> bool:  # (Mapping's would read the tensor)
        return key in self._arrays or key in self._entries

    def dtype(self, key: str) -> np.dtype:
        """A tensor's dtype, from the header (nothing is read)."""
        if key in self._arrays:
            return np.asarray(self._arrays[key]).dtype
        return self._entries[key][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays or self._entries)

    def __len__(self) -> int:
        return len(self._arrays or self._entries)


def _header(path: str) -> dict[str, tuple[str, int, np.dtype, tuple[int, ...]]]:
    """``{key: (path, byte offset, dtype, shape)}`` from one file's header."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:  # a truncated or foreign file: say which
        raise LoraError(f"cannot read {path!r} as safetensors ({e})") from None
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise LoraError(
                f"{path!r}: {key!r} has dtype {entry['dtype']}, which jlora cannot read"
            )
        start = 8 + size + int(entry["data_offsets"][0])
        out[key] = (path, start, np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]))
    return out
