"""Which step folders are complete checkpoints; pruning old ones; removing killed saves' leftovers."""

from __future__ import annotations

import json
import os
import re
import shutil

from nnjax.checkpoint import metadata
from nnjax.core.errors import CheckpointError

__all__ = ["all_steps", "latest"]

STEP_DIR = re.compile(r"^step_(\d+)$")
TEMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step_{int(step):06d}"


def _complete(folder: str) -> bool:
    """``metadata.json`` and every array file it names are there.

    Metadata that does not parse still counts (restoring it reports the
    corruption loudly instead of silently falling back to an older step).
    """
    try:
        with open(os.path.join(folder, metadata.METADATA), "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        return False
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return True
    names = metadata.file_names(meta) if isinstance(meta, dict) else []
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


def all_steps(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the complete checkpoints in ``directory``, oldest first.

    A step folder without ``metadata.json``, or without an array file its
    metadata names, is not a checkpoint and is not listed.

    Example:
        >>> for step in (1, 2):
        ...     _ = nj.checkpoint.save("runs/s", {"w": jnp.ones(2)}, step=step)
        >>> [s for s, _ in nj.checkpoint.all_steps("runs/s")]
        [1, 2]
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = STEP_DIR.match(name)
        path = os.path.join(directory, name)
        if m and _complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(directory: str | os.PathLike) -> str | None:
    """The path of the newest complete checkpoint in ``directory``, or None.

    Example:
        >>> nj.checkpoint.latest("runs/none") is None
        True
    """
    steps = all_steps(directory)
    return steps[-1][1] if steps else None


def checkpoint_dir(path: str) -> str:
    """``path`` if it is a checkpoint folder, else the newest checkpoint inside it."""
    if os.path.isfile(os.path.join(path, metadata.METADATA)) or STEP_DIR.match(
        os.path.basename(path)
    ):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path!r} (expected step_*/{metadata.METADATA})")
    return found


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prune(directory: str, keep: int, written: str) -> None:
    """Delete all but the newest ``keep`` checkpoints; never ``written``, the one just saved."""
    for _, old in all_steps(directory)[:-keep]:
        if os.path.realpath(old) != os.path.realpath(written):
            remove_tree(old)


def clean_temps(directory: str) -> None:
    """Remove the temporary folders killed saves left; call it only while holding the folder's lock."""
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            remove_tree(os.path.join(directory, name))
