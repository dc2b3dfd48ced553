"""A minimal safetensors reader/writer that streams one tensor at a time.

Why not `safetensors.numpy`: its loaders return whole files, cannot name the tensor a
truncated file cuts off, and numpy has no bfloat16 without ml_dtypes. The format is tiny
(8-byte little-endian header length, a JSON header, then raw little-endian bytes), so reading
it here gives zero-copy memory-mapped tensors, bfloat16 via ml_dtypes, and precise errors.
A `gs://` file is read tensor by tensor with ranged reads (`vipllava_jax.storage`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from vipllava_jax import storage
from vipllava_jax.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """The header of one .safetensors file; `read(name)` maps and copies one tensor."""

    def __init__(self, path: str | Path):
        self.path = storage.path(path)
        self.remote = storage.is_remote(self.path)
        size = storage.size(self.path)
        with self.path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file (header of {n} bytes, file of {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name}") from None
            if begin < 0 or end < begin or any(d < 0 for d in shape):
                raise CheckpointError(
                    f"{self.path}: corrupt header entry for tensor {name}: offsets [{begin}, {end}] "
                    f"shape {list(shape)}"
                )
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(
                    f"{self.path}: corrupt tensor {name}: {end - begin} bytes for shape {shape} {e['dtype']}"
                )
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor {name} ends at byte "
                    f"{self.data_start + end} but the file has {size}"
                )
            self.entries[name] = (dtype, shape, begin, end)
        # As the format defines them, the tensors cover the data section exactly: sorted by
        # offset, each begins where the previous ends, from 0 to the end of the file.
        expected = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: kv[1][2:]):
            if begin != expected:
                what = "overlaps the tensor before it" if begin < expected else f"leaves a gap of {begin - expected} bytes before it"
                raise CheckpointError(f"{self.path}: corrupt tensor offsets: tensor {name} at [{begin}, {end}] {what}")
            expected = end
        if self.data_start + expected != size:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors file: {size - self.data_start - expected} bytes "
                "after the last tensor"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        """A memory-mapped view of one tensor (pages are read on first touch); a remote file's
        tensor is read whole with one ranged read."""
        dtype, shape, begin, end = self.entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        if self.remote:
            def read():
                with self.path.open("rb") as f:
                    f.seek(self.data_start + begin)
                    return f.read(end - begin)
            data = storage.retry(read, what=f"{self.path} ({name})")
            if len(data) != end - begin:
                raise CheckpointError(f"{self.path}: truncated read of tensor {name}")
            return np.frombuffer(data, dtype).reshape(shape)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)


def write_safetensors(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors given as (name, shape, dtype, make) and calls `make()` one at a time."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with storage.path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in tensors:
            arr = np.ascontiguousarray(make(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {arr.shape}, header says {shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
