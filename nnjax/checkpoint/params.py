"""Params alone as one plain ``.safetensors`` file (``/`` path keys), written and read one tensor at a time."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from nnjax.checkpoint import arrayfile, tree
from nnjax.core.errors import CheckpointError
from nnjax.core.paths import unflatten

__all__ = ["save_params", "load_params"]


def _temp_file(folder: str) -> str:
    """A new empty file in ``folder``, mode 0o666 less the umask (``mkstemp`` would make it 0o600)."""
    for n in range(1000):
        path = os.path.join(folder, f".tmp-{os.getpid()}-{n}.safetensors")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise CheckpointError(f"{folder}: cannot make a temporary file")


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Save params (or any pytree of arrays) as one ``.safetensors`` file with ``/`` keys.

    The file loads in any safetensors reader (``safetensors.torch.load_file``);
    bfloat16 stays ``BF16``. Arrays are written one at a time into a temporary
    file that is renamed into place.

    Raises:
        CheckpointError: a typed PRNG key or a dtype safetensors cannot store.

    Example:
        >>> nj.checkpoint.save_params("p.safetensors", {"dense": {"kernel": jnp.ones((2, 3))}})
        >>> nj.checkpoint.load_params("p.safetensors")["dense"]["kernel"].shape
        (2, 3)
    """
    path = os.fspath(path)
    flat, _ = tree.flat(params)
    if any(tree.is_key(v) for v in flat.values()):
        raise CheckpointError("save_params: typed PRNG keys are not params; use save()")
    records = {p: tree.record(p, v) for p, v in flat.items()}
    tensors = [
        arrayfile.Tensor(
            p, records[p]["dtype"], tuple(records[p]["shape"]), partial(tree.to_host, v)
        )
        for p, v in flat.items()
    ]
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temp_file(folder)
    try:
        arrayfile.write(tmp, tensors)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_params(path: str | os.PathLike, target: Any = None) -> Any:
    """Load a ``.safetensors`` file written by :func:`save_params` (or any with ``/`` keys).

    Args:
        path: the file.
        target: optional pytree of arrays or ``ShapeDtypeStruct`` to check against
            (missing, unexpected, differing paths are a CheckpointError) and to place on.

    Returns:
        Nested dicts of ``jax.Array`` (or ``target``'s structure).

    Raises:
        CheckpointError: a missing file, one the safetensors parser refuses, an
            unsupported dtype, or a structure other than ``target``'s.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no params file {path!r}")
    reader = arrayfile.Reader(path)
    try:
        stored = {k: {"dtype": e.dtype, "shape": list(e.shape)} for k, e in reader.entries.items()}
        if target is None:
            keys = set(stored)
            parents = {p.rsplit("/", i)[0] for p in keys for i in range(1, p.count("/") + 1)}
            if parents & keys:
                raise CheckpointError(f"{path}: keys {sorted(parents & keys)} also hold arrays")
            return unflatten({p: jnp.asarray(reader.tensor(p)) for p in stored})
        flat, treedef = tree.flat(target)
        tree.check_structure(path, stored, flat)
        leaves = []
        for p, like in flat.items():
            sharding = getattr(like, "sharding", None)
            array = reader.tensor(p)
            leaves.append(jax.device_put(array, sharding) if sharding else jnp.asarray(array))
    finally:
        reader.close()
    return jax.tree_util.tree_unflatten(treedef, leaves)
