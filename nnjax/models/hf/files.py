"""The safetensors files of an HF model folder, read and written one tensor at a time.

Reading: every file's header is read (and checked) before any tensor; then each
tensor is read through its own short-lived ``safe_open``. A handle kept open for a
whole file keeps every page it touched resident (a 400 MB file read tensor by tensor
through one handle ended at 424 MB RSS; reopened per tensor, 58 MB peak), so reopening
is what keeps peak memory at the result plus one tensor.

Writing: the safetensors header is written from the known shapes, then each
tensor's bytes as it is produced: peak memory is one tensor, whatever the shard size.
Files are written into a staging folder and moved in only when complete
(:mod:`nnjax.models.hf.staging`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from nnjax.checkpoint.arrayfile import as_bytes
from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, CheckpointError

__all__ = [
    "TensorInfo",
    "model_files",
    "read_headers",
    "read_tensor",
    "read_rows",
    "parse_size",
    "Pending",
    "write_file",
    "write_model",
]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class TensorInfo(NamedTuple):
    """Where a tensor is and what it is, from its file's header (nothing read yet)."""

    file: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _inside(folder: str, name: str, index: str) -> str:
    """``folder/name`` for a plain file name in the index; a path (``../x``, ``/x``, ``a/x``) is refused.

    The rule, for single files and shards alike: the index names files of the folder
    by their plain names, and a file of the folder may be a symlink, followed wherever
    it points (Hugging Face's cache keeps ``snapshots/<rev>/model.safetensors`` as a
    link into ``../../blobs/``); whoever made the folder made its links, while an index
    entry is data that must not reach outside the folder on its own.
    """
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise CheckpointError(
            f"{index}: weight file {name!r} is not a file name inside the folder; refusing it"
        )
    return os.path.join(folder, name)


def model_files(folder: str) -> tuple[list[str], dict[str, str] | None]:
    """The folder's weight files and, when sharded, its ``weight_map`` (names -> file path).

    Files may be symlinks (Hugging Face's cache layout), followed; see ``_inside``.

    Raises:
        CheckpointError: no weights, an unreadable index, an index entry that is not a
            plain file name (``../x.safetensors``, an absolute path, ``sub/x``), or a
            listed file that does not exist (a dangling link too).
    """
    single = os.path.join(folder, SINGLE)
    if os.path.isfile(single):
        return [single], None
    index = os.path.join(folder, INDEX)
    if not os.path.isfile(index):
        found = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth")))
        hint = (
            f" (found {found}: load and re-save it with safe_serialization=True)" if found else ""
        )
        raise CheckpointError(f"{folder!r} holds no {SINGLE} and no {INDEX}{hint}")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        items = dict(weight_map).items()
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    mapping = {name: _inside(folder, file, index) for name, file in items}
    files = sorted(set(mapping.values()))
    for path in files:
        if not os.path.isfile(path):
            raise CheckpointError(f"{index} lists {os.path.basename(path)!r}, which does not exist")
    return files, mapping


def read_headers(
    files: Iterable[str], weight_map: Mapping[str, str] | None
) -> dict[str, TensorInfo]:
    """``{tensor name: TensorInfo}`` of every tensor in ``files`` (headers only).

    Raises:
        CheckpointError: a truncated or corrupt file, a tensor in two files, a dtype
            nnjax does not know, an index entry whose file does not hold it.
    """
    from safetensors import SafetensorError, safe_open

    out: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    s = f.get_slice(name)
                    if name in out:
                        raise CheckpointError(
                            f"tensor {name!r} is in both {out[name].file!r} and {file!r}"
                        )
                    if s.get_dtype() not in _DTYPES:
                        raise CheckpointError(f"{file}: tensor {name!r} has dtype {s.get_dtype()}")
                    out[name] = TensorInfo(file, tuple(s.get_shape()), _DTYPES[s.get_dtype()])
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a complete safetensors file ({e})") from None
    for name, file in (weight_map or {}).items():
        if name not in out or out[name].file != file:
            raise CheckpointError(
                f"{INDEX} puts tensor {name!r} in {file!r}, which does not hold it"
            )
    return out


def read_tensor(name: str, info: TensorInfo) -> np.ndarray:
    """Read one tensor (its own handle: see the module doc)."""
    from safetensors import safe_open

    with safe_open(info.file, framework="numpy") as f:
        return f.get_tensor(name)


def read_rows(name: str, info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of one tensor (its own handle), without reading the rest."""
    from safetensors import safe_open

    with safe_open(info.file, framework="numpy") as f:
        return f.get_slice(name)[start:stop]


def parse_size(size: int | str) -> int:
    """Bytes of ``5_000_000``, ``"5MB"`` (10**6) or ``"5MiB"`` (2**20), as transformers reads them.

    Raises:
        ArgumentError: a bool, a float, zero or a negative size, a string of another form.
    """
    if not isinstance(size, str):
        return check_int(size, "max_shard_size")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ArgumentError(f"max_shard_size: expected bytes or '500MB' / '2GiB', got {size!r}")
    base = 1024 if m.group(3) else 1000
    return check_int(
        int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " ")), "max_shard_size"
    )


class Pending(NamedTuple):
    """A tensor to write: its name, shape, dtype, and a function that produces it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_file(path: str, tensors: list[Pending]) -> None:
    """One safetensors file of ``tensors``, each produced as its turn comes; flushed to disk.

    Raises:
        CheckpointError: a dtype safetensors has no name for (before anything is
            written), a produced tensor of another shape.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in _NAMES:
            raise CheckpointError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors name")
        header[t.name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            arr = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if arr.shape != t.shape:
                raise CheckpointError(
                    f"tensor {t.name!r}: produced {arr.shape}, declared {t.shape}"
                )
            f.write(as_bytes(arr.astype(arr.dtype.newbyteorder("<"), copy=False)))
        f.flush()
        os.fsync(f.fileno())


def write_model(folder: str, tensors: list[Pending], max_shard_size: int | str) -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or shards of at most ``max_shard_size`` bytes
    (a larger tensor gets a shard of its own) and ``model.safetensors.index.json``, into
    ``folder`` (a staging folder: see :mod:`nnjax.models.hf.staging`). Returns the files written.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[Pending]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_file(os.path.join(folder, SINGLE), shards[0])
        return [SINGLE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_file(os.path.join(folder, name), shard)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {
            t.name: name for name, shard in zip(names, shards, strict=True) for t in shard
        },
    }
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return [*names, INDEX]
