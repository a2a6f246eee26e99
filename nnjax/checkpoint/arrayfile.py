"""One safetensors file, written and checked one tensor at a time.

The header (names, dtypes, shapes, byte offsets) is known from the shapes alone,
so it is written first and each tensor's bytes follow as they come off the
device, hashed on the way: the host holds one tensor at a time, never the whole
file. The result is an ordinary safetensors file (``safetensors.safe_open`` and
``safetensors.torch.load_file`` read it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

from nnjax.core.errors import CheckpointError

# safetensors dtype codes <-> NumPy dtypes (ml_dtypes gives bfloat16 and float8).
CODES = {
    "BOOL": np.dtype(bool),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "C64": np.dtype(np.complex64),
}
NAMES = {dtype.name: code for code, dtype in CODES.items()}
_CHUNK = 1 << 24  # 16 MiB: the hashing read buffer


class Tensor(NamedTuple):
    """A tensor to write: its name, dtype name, shape, and how to fetch it (called once, in order)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    fetch: Callable[[], Any]


class Written(NamedTuple):
    """What :func:`write` wrote: the file's size in bytes and its sha256 (hex)."""

    size: int
    sha256: str


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def header(tensors: Iterable[Tensor]) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to 8 bytes as safetensors does."""
    entries, offset = {}, 0
    for t in tensors:
        n = nbytes(t.dtype, t.shape)
        entries[t.key] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def as_bytes(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (no copy); bfloat16 has no buffer format."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def write(path: str, tensors: list[Tensor]) -> Written:
    """Write ``tensors`` to ``path`` in order, fetching each only when its turn comes; fsync.

    Raises:
        CheckpointError: a fetched array's dtype or shape is not the one declared.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        head = header(tensors)
        f.write(head)
        digest.update(head)
        size += len(head)
        for t in tensors:
            array = np.asarray(t.fetch())
            if array.dtype.name != t.dtype or tuple(array.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{t.key}: expected {t.dtype} {tuple(t.shape)} while saving, "
                    f"got {array.dtype.name} {array.shape}"
                )
            data = as_bytes(array)
            f.write(data)
            digest.update(data)
            size += data.size
            del array, data  # one tensor on the host at a time
        f.flush()
        os.fsync(f.fileno())
    return Written(size, digest.hexdigest())


def check_size(path: str, size: int) -> None:
    """A CheckpointError if the file is missing or not ``size`` bytes long."""
    try:
        got = os.path.getsize(path)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    if got != size:
        raise CheckpointError(f"{path}: expected {size} bytes, got {got} (truncated or corrupt)")


def verify(path: str, size: int, sha256: str) -> None:
    """Check a file's size, then its sha256, reading 16 MiB at a time.

    Raises:
        CheckpointError: the file is missing, has another size, or another hash.
    """
    check_size(path, size)
    digest = hashlib.sha256()
    buffer = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    if digest.hexdigest() != sha256:
        raise CheckpointError(f"{path}: sha256 mismatch; the file is corrupt")


def open_file(path: str) -> Any:
    """``safe_open(path, framework="np")``; a CheckpointError for anything the parser refuses."""
    try:
        return safe_open(path, framework="np")
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust parser may raise a PanicException (a BaseException)
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def entry(handle: Any, key: str, where: str) -> tuple[str, list[int]]:
    """``(dtype name, shape)`` of ``key`` in an open file, or a CheckpointError."""
    try:
        view = handle.get_slice(key)
        code, shape = view.get_dtype(), list(view.get_shape())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CheckpointError(f"{where}: cannot read {key} ({e})") from None
    if code not in CODES:
        raise CheckpointError(f"{where}: {key} has unsupported dtype {code}")
    return CODES[code].name, shape


def read(handle: Any, key: str, region: tuple[slice, ...] | None, where: str) -> np.ndarray:
    """Tensor ``key`` (or its ``region``) from an open file, as a NumPy array of its dtype."""
    try:
        out = handle.get_tensor(key) if region is None else handle.get_slice(key)[region]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CheckpointError(f"{where}: cannot read {key} ({e})") from None
    return np.asarray(out)
