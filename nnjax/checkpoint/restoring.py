"""Restoring a checkpoint onto a target structure and sharding, one array (or shard) at a time.

Each leaf is read with ``safe_open`` and placed before the next one is read, so
the extra host memory is about the largest array; a leaf with a sharding is
built with ``jax.make_array_from_callback``, which reads only the blocks this
process's devices hold (``get_slice``), from whichever files hold them. Every
file is checked against its size and sha256 (and its header against the
metadata) before the first array is read from it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.checkpoint import arrayfile, listing, metadata, tree
from nnjax.core.errors import CheckpointError

__all__ = ["restore"]

# (file name, tensor key, start, shape) of one stored block of a leaf
Piece = tuple[str, str, list[int], list[int]]


class _Files:
    """The checkpoint's array files: sizes and headers checked at once, sha256 as they are read."""

    def __init__(self, folder: str, meta: Mapping[str, Any], stack: contextlib.ExitStack):
        self.folder, self.meta = folder, meta
        self.readers: dict[str, arrayfile.Reader] = {}
        for name, info in meta["files"].items():
            file = os.path.join(folder, name)
            arrayfile.check_size(file, info["size"])
            reader = arrayfile.Reader(file, info["sha256"])
            stack.callback(reader.close)
            self._check_header(reader, name, info["pieces"])
            self.readers[name] = reader

    def _check_header(self, reader: arrayfile.Reader, name: str, pieces: Mapping[str, Any]) -> None:
        if set(reader.entries) != set(pieces):
            raise CheckpointError(
                f"{self.folder}: metadata and {name} disagree on the paths: "
                f"{sorted(set(reader.entries) ^ set(pieces))}"
            )
        for key, piece in pieces.items():
            entry = reader.entries[key]
            want = self.meta["leaves"][piece["path"]]["dtype"]
            if entry.dtype != want or list(entry.shape) != piece["shape"]:
                raise CheckpointError(
                    f"{self.folder}: metadata says {key} is {want} {piece['shape']}, "
                    f"but {name} holds {entry.dtype} {list(entry.shape)}"
                )

    def finish(self) -> None:
        """Check the sha256 of every file read from (what was not read yet is hashed now).

        A file this process took nothing from (another process's shards) is not read at all.
        """
        for reader in self.readers.values():
            if reader.touched:
                reader.finish()

    def region(self, pieces: list[Piece], start: list[int], stop: list[int], dtype: str) -> Any:
        """The block ``[start, stop)`` of a leaf, read from the pieces that overlap it."""
        for name, key, p_start, p_shape in pieces:
            if p_start == start and [a + n for a, n in zip(p_start, p_shape, strict=True)] == stop:
                return self.readers[name].tensor(key)
        out = np.empty([b - a for a, b in zip(start, stop, strict=True)], dtype)
        for name, key, p_start, p_shape in pieces:
            lo = [max(a, p) for a, p in zip(start, p_start, strict=True)]
            hi = [min(b, p + n) for b, p, n in zip(stop, p_start, p_shape, strict=True)]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            src = tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, p_start, strict=True))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
            out[dst] = self.readers[name].block(key, src)
        return out


def _pieces(meta: Mapping[str, Any]) -> dict[str, list[Piece]]:
    out: dict[str, list[Piece]] = {p: [] for p in meta["leaves"]}
    for name, info in meta["files"].items():
        for key, piece in info["pieces"].items():
            out[piece["path"]].append((name, key, piece["start"], piece["shape"]))
    return out


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    ranges = [s.indices(d)[:2] for s, d in zip(index, shape, strict=True)]
    return [a for a, _ in ranges], [b for _, b in ranges]


def _place(files: _Files, pieces: list[Piece], like: Any, sharding: Any, info: Any) -> Any:
    """One leaf as ``like`` has it: on ``sharding``, a typed key, or a NumPy/Python value."""
    shape, dtype = tuple(info["shape"]), info["dtype"]

    def whole() -> Any:
        return files.region(pieces, [0] * len(shape), list(shape), dtype)

    if info.get("key"):
        data = jax.device_put(whole(), sharding) if sharding is not None else jnp.asarray(whole())
        try:
            return jax.random.wrap_key_data(data, impl=info.get("key_impl"))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(
                f"cannot rebuild a {info['key']} key from the stored data ({e})"
            ) from None
    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        if sharding is None:
            return jnp.asarray(whole())

        def block(index: tuple[slice, ...] | None) -> Any:
            assert index is not None  # make_array_from_callback asserts so before calling
            return files.region(pieces, *_bounds(index, shape), dtype)

        return jax.make_array_from_callback(shape, sharding, block)
    if isinstance(like, np.ndarray | np.generic):
        return np.array(whole())
    if isinstance(like, bool | int | float | complex):
        return type(like)(whole().item())
    return jnp.asarray(whole())


def restore(
    path: str | os.PathLike, target: Any, shardings: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint into the structure of ``target``, one array at a time.

    Args:
        path: a checkpoint folder (``.../step_000123``) or a run folder (its newest
            checkpoint is taken).
        target: a pytree (``TrainState``) of arrays or ``jax.ShapeDtypeStruct`` with
            the expected structure; leaves with a ``sharding`` are placed on it.
        shardings: optional tree like ``target`` of ``jax.sharding.Sharding``s to
            place the leaves on instead (any mesh: the checkpoint carries none).

    Returns:
        ``(ts, extra)``: the pytree with the stored values (bit-exact), and the
        ``extra`` dict given to :func:`~nnjax.checkpoint.save`.

    Raises:
        CheckpointError: no checkpoint, missing, changed or corrupt metadata, an
            array file that is missing, truncated or does not match its sha256 or
            metadata, or a structure that differs from ``target`` (the message
            lists the missing, unexpected and differing paths).

    Example:
        >>> _ = nj.checkpoint.save("runs/r", {"w": jnp.arange(3.0)}, step=1)
        >>> tree, extra = nj.checkpoint.restore("runs/r", {"w": jnp.zeros(3)})
        >>> tree["w"]
        Array([0., 1., 2.], dtype=float32)
    """
    path = listing.checkpoint_dir(os.fspath(path))
    meta = metadata.read(path)
    flat, treedef = tree.flat(target)
    if shardings is None:
        placements = [getattr(leaf, "sharding", None) for leaf in flat.values()]
    else:
        placements = treedef.flatten_up_to(shardings)
    pieces = _pieces(meta)
    with contextlib.ExitStack() as stack:
        files = _Files(path, meta, stack)
        tree.check_structure(path, meta["leaves"], flat)
        leaves = [
            _place(files, pieces[p], leaf, sharding, meta["leaves"][p])
            for (p, leaf), sharding in zip(flat.items(), placements, strict=True)
        ]
        files.finish()
    return jax.tree_util.tree_unflatten(treedef, leaves), dict(meta["extra"])
