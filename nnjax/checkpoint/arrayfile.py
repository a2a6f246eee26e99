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
import threading
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


def as_bytes(array: np.ndarray) -> memoryview:
    """An array's bytes as a flat byte buffer (a view when C-contiguous); bfloat16 has no buffer format."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8).data


def write(path: str, tensors: list[Tensor]) -> Written:
    """Write ``tensors`` to ``path`` in order, fetching each only when its turn comes; fsync.

    Raises:
        CheckpointError: a fetched array's dtype or shape is not the one declared.
    """
    digest = hashlib.sha256()
    size = 0
    # The hash of each tensor runs in a second thread while the tensor is written
    # (both release the GIL): the save costs max(write, hash), not their sum. A plain
    # thread, not an executor: executors refuse work once the interpreter is shutting
    # down, which is when a background save started on a script's last line runs.
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
            hashing = threading.Thread(target=digest.update, args=(data,))
            hashing.start()
            try:
                f.write(data)
            finally:
                hashing.join()
            size += data.nbytes
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


def _validate(path: str) -> None:
    """Let safetensors' own parser check the header (offsets in order, no gaps, within the file)."""
    try:
        with safe_open(path, framework="np"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust parser may raise a PanicException (a BaseException)
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


class Entry(NamedTuple):
    dtype: str  # NumPy name
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class Reader:
    """One safetensors file, read a tensor at a time with ``readinto`` (no memory map).

    ``safe_open`` checks the header; the data is then read with plain reads,
    because every page ``safe_open``'s memory map touches counts in the
    process's RSS until the file is closed (a 2 GB file would add 2 GB).
    Whole tensors read in file order are hashed on the way, so the common
    restore reads each byte once; :meth:`finish` hashes what is left and
    compares with ``sha256`` (``None``: no check). Reading out of order, or a
    block of a tensor, first checks the whole file.
    """

    def __init__(self, path: str, sha256: str | None = None) -> None:
        _validate(path)
        self.path, self.sha256 = path, sha256
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        n = struct.unpack("<Q", self.file.read(8))[0]
        head = self.file.read(n)
        self.entries = {}
        for key, info in json.loads(head).items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in CODES:
                raise CheckpointError(f"{path}: {key} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            self.entries[key] = Entry(
                CODES[info["dtype"]].name, tuple(info["shape"]), 8 + n + a, 8 + n + b
            )
        self.digest = hashlib.sha256(struct.pack("<Q", n) + head)
        self.position = 8 + n  # the next byte the running hash expects
        self.touched = False  # whether any tensor was read
        self.verified = sha256 is None

    def close(self) -> None:
        self.file.close()

    def _read(self, begin: int, array: np.ndarray) -> np.ndarray:
        self.touched = True
        view = as_bytes(array) if array.size else memoryview(b"")
        got = os.preadv(self.file.fileno(), [view], begin) if view.nbytes else 0
        if got != view.nbytes:
            raise CheckpointError(f"{self.path}: truncated at byte {begin + got}")
        return array

    def _check_all(self) -> None:
        if not self.verified:
            assert self.sha256 is not None  # verified starts True when there is no sha256
            verify(self.path, os.path.getsize(self.path), self.sha256)
            self.verified = True

    def tensor(self, key: str) -> np.ndarray:
        """The whole tensor ``key``."""
        e = self.entries[key]
        if not self.verified and e.begin != self.position:
            self._check_all()
        array = self._read(e.begin, np.empty(e.shape, e.dtype))
        if not self.verified:
            self.digest.update(as_bytes(array))
            self.position = e.end
        return array

    def block(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor(key)[index]`` (unit-step slices), reading only the rows it spans."""
        self._check_all()
        e = self.entries[key]
        if not e.shape:
            return self.tensor(key)
        a, b, _ = index[0].indices(e.shape[0])
        row = math.prod(e.shape[1:]) * np.dtype(e.dtype).itemsize
        rows = self._read(e.begin + a * row, np.empty((max(b - a, 0), *e.shape[1:]), e.dtype))
        return np.ascontiguousarray(rows[(slice(None), *index[1:])])

    def finish(self) -> None:
        """Hash the bytes not read yet and compare with ``sha256``.

        Raises:
            CheckpointError: the file's sha256 is not the expected one.
        """
        if self.verified:
            return
        buffer = bytearray(min(_CHUNK, max(os.path.getsize(self.path) - self.position, 1)))
        view = memoryview(buffer)
        while n := os.preadv(self.file.fileno(), [buffer], self.position):
            self.digest.update(view[:n])
            self.position += n
        if self.digest.hexdigest() != self.sha256:
            raise CheckpointError(f"{self.path}: sha256 mismatch; the file is corrupt")
        self.verified = True
