"""Read and write the safetensors format with numpy alone (no torch, no extra package).

A file is an 8-byte little-endian header length, a JSON header mapping each
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
data that follows), then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from jlora.config import LoraError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The file's bytes for ``{name: array}`` (names sorted, as safetensors does)."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise LoraError(f"cannot store {name!r}: dtype {arr.dtype} has no safetensors name")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the data is 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def loads(data: bytes, source: str = "safetensors data") -> dict[str, np.ndarray]:
    """``{name: array}`` from a file's bytes; a truncated or corrupted file is a LoraError."""
    def bad(why: str) -> LoraError:
        return LoraError(f"{source} is not a valid safetensors file ({why}); it may be "
                         "truncated or corrupted: save it again")
    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise bad(f"header length {size} exceeds the file")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    body = memoryview(data)[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed") from None
        if not 0 <= begin <= end <= len(body) or end - begin != dtype.itemsize * int(
                np.prod(shape)):
            raise bad(f"entry {name!r} points outside the data")
        out[name] = np.frombuffer(body[begin:end], dtype.newbyteorder("<")).astype(
            dtype).reshape(shape)
    return out
