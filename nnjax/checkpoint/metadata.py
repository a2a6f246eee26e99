"""``metadata.json``: what a checkpoint holds, sealed by its own sha256, and checked field by field.

Version 2 (written since the streaming format)::

    {"format": "nnjax.checkpoint", "version": 2, "step": 7,
     "leaves": {path: {"shape": [3, 4], "dtype": "float32"[, "key", "key_impl"]}},
     "files": {"arrays.safetensors": {"size": ..., "sha256": ...,
               "pieces": {tensor key: {"path": path, "start": [0, 0], "shape": [3, 4]}}}},
     "extra": {...},
     "checksum": sha256 of the JSON of everything else (sorted keys, no spaces)}

A piece is a block of a leaf: the whole leaf (its key is the path) or, from a
multi-process save, one shard (``path@start,start``). Version 1 (one file, no
pieces, no checksum) is still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any, TypeGuard

import numpy as np

from nnjax.checkpoint.arrayfile import NAMES
from nnjax.core.errors import CheckpointError

FORMAT = "nnjax.checkpoint"
VERSION = 2
METADATA = "metadata.json"
ARRAYS = "arrays.safetensors"


def checksum(meta: Mapping[str, Any]) -> str:
    """sha256 of the metadata without its ``checksum`` field, in one canonical JSON form."""
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def seal(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {**meta, "checksum": checksum(meta)}


def write(folder: str, meta: Mapping[str, Any]) -> None:
    with open(os.path.join(folder, METADATA), "wb") as f:
        f.write(json.dumps(seal(meta), indent=1).encode())
        f.flush()
        os.fsync(f.fileno())


def load(folder: str) -> dict[str, Any]:
    """The parsed JSON of ``folder/metadata.json``; a CheckpointError if missing or not JSON."""
    meta_path = os.path.join(folder, METADATA)
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: missing {METADATA}; not a complete checkpoint") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({str(e)[:100]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        got = meta.get("format")
        raise CheckpointError(f"{meta_path}: expected format {FORMAT!r}, got {_short(got)}")
    return meta


def file_names(meta: Mapping[str, Any]) -> list[str]:
    """The array files a (parsed, possibly unchecked) metadata names; [] when it names none."""
    files = meta.get("files") if meta.get("version") == VERSION else {meta.get("arrays"): None}
    if not isinstance(files, dict):
        return []
    return [n for n in files if isinstance(n, str)]


def _short(x: Any) -> str:
    """A scalar's or flat list's repr (cut to 60 characters), else the type: never a deep repr."""
    scalar = str | int | float | bool | type(None)
    if isinstance(x, scalar) or (isinstance(x, list) and all(isinstance(v, scalar) for v in x)):
        return repr(x)[:60]
    return type(x).__name__


def _ints(value: Any, n: int | None = None) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and all(type(v) is int and v >= 0 for v in value)
        and (n is None or len(value) == n)
    )


def _check_leaf(path: Any, info: Any) -> str | None:
    if not isinstance(path, str) or not isinstance(info, dict):
        return f"leaf {path!r}: {_short(info)}"
    if not _ints(info.get("shape")) or info.get("dtype") not in NAMES:
        return f"leaf {path}: shape {_short(info.get('shape'))}, dtype {_short(info.get('dtype'))}"
    if not all(isinstance(info.get(k, ""), str) for k in ("key", "key_impl")):
        return f"leaf {path}: key {_short(info.get('key'))}"
    return None


def _check_piece(leaves: Mapping[str, Any], key: Any, piece: Any) -> str | None:
    if not isinstance(key, str) or not isinstance(piece, dict) or piece.get("path") not in leaves:
        return f"piece {key!r}: {_short(piece)}"
    shape = leaves[piece["path"]]["shape"]
    start, size = piece.get("start"), piece.get("shape")
    if not (_ints(start, len(shape)) and _ints(size, len(shape))):
        return f"piece {key}: start {_short(start)}, shape {_short(size)}"
    if any(a + n > d for a, n, d in zip(start, size, shape, strict=True)):
        return f"piece {key}: {start} + {size} outside {shape}"
    return None


def _problem(meta: Mapping[str, Any]) -> str | None:
    """What is wrong with a version-2 metadata's fields, or None."""
    leaves, files = meta.get("leaves"), meta.get("files")
    if type(meta.get("step")) is not int:
        return f"step {_short(meta.get('step'))}"
    if not isinstance(meta.get("extra"), dict):
        return f"extra {type(meta.get('extra')).__name__}"
    if not isinstance(leaves, dict) or not isinstance(files, dict):
        return "leaves and files must be objects"
    for path, info in leaves.items():
        if (bad := _check_leaf(path, info)) is not None:
            return bad
    covered: dict[str, list[tuple[str, Any]]] = {p: [] for p in leaves}
    for name, info in files.items():
        if (
            not isinstance(name, str)
            or os.path.basename(name) != name
            or not isinstance(info, dict)
            or type(info.get("size")) is not int
            or not isinstance(info.get("sha256"), str)
            or not isinstance(info.get("pieces"), dict)
        ):
            return f"file {_short(name)}"
        for key, piece in info["pieces"].items():
            if (bad := _check_piece(leaves, key, piece)) is not None:
                return bad
            covered[piece["path"]].append((key, piece))
    for path, pieces in covered.items():
        if (bad := _check_tiling(path, leaves[path]["shape"], pieces)) is not None:
            return bad
    return None


def _check_tiling(path: str, shape: list[int], pieces: list[tuple[str, Any]]) -> str | None:
    """The pieces (each inside the leaf) tile it exactly: no two overlap and together they
    hold every element (disjoint boxes whose sizes add up to the leaf's cover it)."""
    n = sum(math.prod(p["shape"]) for _, p in pieces)
    if n != math.prod(shape):
        return f"leaf {path}: pieces hold {n} of {math.prod(shape)} elements"
    boxes = [(k, p) for k, p in pieces if math.prod(p["shape"])]
    if len(boxes) < 2:
        return None
    lo = np.array([p["start"] for _, p in boxes], np.int64).reshape(len(boxes), -1)
    hi = lo + np.array([p["shape"] for _, p in boxes], np.int64).reshape(len(boxes), -1)
    meet = np.all((lo[:, None] < hi[None]) & (lo[None] < hi[:, None]), axis=-1)
    np.fill_diagonal(meet, False)
    if meet.any():
        i, j = np.argwhere(meet)[0]
        return f"leaf {path}: pieces {boxes[i][0]} and {boxes[j][0]} overlap (they must tile it)"
    return None


def _upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """A version-1 metadata (one file, no pieces) in the version-2 layout."""
    leaves = meta.get("leaves")
    if not isinstance(leaves, dict) or not all(isinstance(v, dict) for v in leaves.values()):
        return meta
    pieces = {
        p: {"path": p, "start": [0] * len(info.get("shape") or []), "shape": info.get("shape")}
        for p, info in leaves.items()
    }
    name = meta.get("arrays", ARRAYS)
    file = {"size": meta.get("size"), "sha256": meta.get("sha256"), "pieces": pieces}
    return {**meta, "files": {name: file}, "extra": meta.get("extra") or {}}


def read(folder: str) -> dict[str, Any]:
    """The checked metadata of a checkpoint folder (version 1 given the version-2 layout).

    Raises:
        CheckpointError: missing, not JSON, too deeply nested, another format or
            version, a checksum that does not match (the file was changed), or a
            field of the wrong kind; the message names the file and the field.
    """
    meta = load(folder)
    meta_path = os.path.join(folder, METADATA)
    version = meta.get("version")
    if version == 1:
        meta = _upgrade(meta)
    elif version == VERSION:
        try:
            same = meta.get("checksum") == checksum(meta)
        except (RecursionError, ValueError) as e:  # nested too deep to encode again
            raise CheckpointError(f"{meta_path}: corrupt metadata ({str(e)[:100]})") from None
        if not same:
            raise CheckpointError(
                f"{meta_path}: checksum mismatch; the metadata was changed after it was written"
            )
    else:
        raise CheckpointError(f"{meta_path}: unsupported format version {_short(version)}")
    bad = _problem(meta)
    if bad is not None:
        raise CheckpointError(f"{meta_path}: corrupt metadata: {bad}")
    return meta
