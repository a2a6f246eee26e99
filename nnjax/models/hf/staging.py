"""Saving into a model folder without ever leaving it unloadable.

A save writes its whole set of files into a hidden folder inside the target
(``.nnjax-save-*``: the same file system, so renames are atomic), checks it (every
safetensors header parses, the index names exactly the tensors written), and only
then moves the files in, in an order that keeps one complete set loadable at every
moment: ``model.safetensors`` wins over an index, so a single file replaces the old
set in one rename; shards go in beside the old single file, which is removed last;
shards over older shards of the same names first repoint the old index at hard links
of the old shards (``.old-model-*``), so the old set stays whole until the new index
is renamed in. Whatever fails before that (a tensor that cannot be produced, a dtype
safetensors cannot hold, a full disk), the folder's earlier model is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.files import (
    _SHARD,
    INDEX,
    SINGLE,
    Pending,
    model_files,
    read_headers,
    write_model,
)

__all__ = [
    "staging",
    "write_json",
    "verify_model",
    "commit_model",
    "commit_files",
    "save_model_folder",
]

_OLD = ".old-"  # hard links that keep an old sharded set whole while new shards take its names


@contextlib.contextmanager
def staging(folder: str) -> Iterator[str]:
    """A fresh hidden folder inside ``folder`` (created), removed on the way out whatever happens."""
    os.makedirs(folder, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=".nnjax-save-", dir=folder)
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def write_json(path: str, value: Any) -> None:
    """``value`` as indented JSON at ``path``, flushed to disk."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def verify_model(staged: str, written: Iterable[str]) -> None:
    """The staged weight files are complete: every header parses, the index fits the files.

    Raises:
        CheckpointError: a file missing or truncated, an index that does not fit.
    """
    files, weight_map = model_files(staged)
    listed = {os.path.basename(f) for f in files} | ({INDEX} if weight_map else set())
    if listed != set(written):
        raise CheckpointError(
            f"save: wrote {sorted(written)}, but the folder holds {sorted(listed)}"
        )
    read_headers(files, weight_map)


def _sync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _bridge_old_shards(folder: str, taken: set[str]) -> None:
    """Point the folder's index at hard links of its shards named in ``taken``, freeing the names."""
    index = os.path.join(folder, INDEX)
    try:
        with open(index) as f:
            old = json.load(f)
        weight_map = dict(old["weight_map"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no loadable old set to keep
    moved = {name for name in weight_map.values() if name in taken}
    if not moved:
        return
    for name in moved:
        if os.path.isfile(os.path.join(folder, name)):
            _link_or_copy(os.path.join(folder, name), os.path.join(folder, _OLD + name))
    old["weight_map"] = {k: _OLD + v if v in moved else v for k, v in weight_map.items()}
    write_json(index + ".tmp", old)
    os.replace(index + ".tmp", index)


def commit_model(staged: str, folder: str, written: list[str]) -> None:
    """Move a verified set of weight files from ``staged`` into ``folder`` (see the module doc)."""
    single = os.path.join(folder, SINGLE)
    if written == [SINGLE]:
        os.replace(os.path.join(staged, SINGLE), single)  # the switch
    else:
        if not os.path.exists(single) and os.path.exists(os.path.join(folder, INDEX)):
            _bridge_old_shards(folder, set(written))
        for name in written:
            if name != INDEX:
                os.replace(os.path.join(staged, name), os.path.join(folder, name))
        os.replace(os.path.join(staged, INDEX), os.path.join(folder, INDEX))
        with contextlib.suppress(FileNotFoundError):
            os.remove(single)  # the switch when a single file was there
    for old in os.listdir(folder):
        stale = old == INDEX or _SHARD.fullmatch(old) or old.startswith(_OLD)
        if stale and old not in written:
            os.remove(os.path.join(folder, old))
    _sync_folder(folder)


def commit_files(staged: str, folder: str, names: Iterable[str]) -> None:
    """Move each of ``names`` from ``staged`` into ``folder`` (one atomic rename each)."""
    for name in names:
        os.replace(os.path.join(staged, name), os.path.join(folder, name))
    _sync_folder(folder)


def save_model_folder(
    folder: str, tensors: list[Pending], max_shard_size: int | str, jsons: dict[str, Any]
) -> list[str]:
    """Write ``tensors`` (one file or shards) and the JSON files ``{name: value}`` into
    ``folder`` atomically (see the module doc). Returns the weight files written."""
    with staging(folder) as staged:
        written = write_model(staged, tensors, max_shard_size)
        for name, value in jsons.items():
            write_json(os.path.join(staged, name), value)
        verify_model(staged, written)
        commit_model(staged, folder, written)
        commit_files(staged, folder, jsons)
    return written
