"""Saving a train state: streamed to disk one tensor at a time, by every process, atomically.

A checkpoint is a folder ``step_000123/`` holding ``metadata.json`` (see
:mod:`nnjax.checkpoint.metadata`) and the array file(s): ``arrays.safetensors``
from a single process, ``arrays.00001-of-00002.safetensors`` (one per process)
from a multi-process run, where each process writes the shards it holds
(``replica_id == 0``: each block once), with no gather. Everything is written
into ``.tmp-step_000123/`` beside the target, fsynced, then renamed into place by
process 0, so a save that dies half way leaves the earlier checkpoints as they
were and no folder :func:`~nnjax.checkpoint.latest` would pick.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np

from nnjax.checkpoint import arrayfile, listing, lock, metadata, tree
from nnjax.core.checks import check_bool, check_int
from nnjax.core.errors import ArgumentError, CheckpointError

__all__ = ["save"]

PART_TIMEOUT_S = 600.0  # process 0 waits this long for the other processes' files


class _Plan(NamedTuple):
    """One process's share of a save, fixed before anything is written."""

    directory: str
    target: str
    temp: str
    file: str  # this process's array file name
    tensors: list[arrayfile.Tensor]
    sources: list[Any]  # the array (or shard data) each tensor is fetched from
    pieces: dict[str, dict[str, Any]]  # tensor key -> {"path", "start", "shape"}
    meta: dict[str, Any]  # everything but "files"
    keep: int | None


def _file_name(index: int, count: int) -> str:
    return metadata.ARRAYS if count == 1 else f"arrays.{index:05d}-of-{count:05d}.safetensors"


def _host_scalar(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return jax.device_get(x)


def _pieces(path: str, leaf: Any) -> Iterator[tuple[str, list[int], list[int], Any]]:
    """``(key, start, shape, source)`` of the blocks of ``leaf`` this process writes."""
    x = tree.data(leaf)
    shape = [int(d) for d in np.shape(x)]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        for shard in x.addressable_shards:
            if shard.replica_id != 0:  # another device holds the same block
                continue
            start = [s.indices(d)[0] for s, d in zip(shard.index, shape, strict=True)]
            size = list(shard.data.shape)
            key = path if size == shape else f"{path}@{','.join(map(str, start))}"
            yield key, start, size, shard.data
    elif jax.process_index() == 0:  # addressable everywhere: the same value on every process
        yield path, [0] * len(shape), shape, x


def _plan(directory: str, ts: Any, step: int, extra: Any, keep: int | None) -> _Plan:
    flat, _ = tree.flat(ts)
    records = {p: tree.record(p, leaf) for p, leaf in flat.items()}
    meta = {
        "format": metadata.FORMAT,
        "version": metadata.VERSION,
        "step": step,
        "leaves": records,
        "extra": dict(extra or {}),
    }
    try:  # a copy now: the caller may change ``extra`` while a background save runs
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"save: extra must be JSON-able ({e})") from None
    tensors, sources, pieces = [], [], {}
    for path, leaf in flat.items():
        dtype = records[path]["dtype"]
        for key, start, shape, source in _pieces(path, leaf):
            tensors.append(
                arrayfile.Tensor(key, dtype, tuple(shape), partial(tree.to_host, source))
            )
            sources.append(source)
            pieces[key] = {"path": path, "start": start, "shape": shape}
    name = listing.step_name(step)
    return _Plan(
        directory,
        os.path.join(directory, name),
        os.path.join(directory, listing.TEMP_PREFIX + name),
        _file_name(jax.process_index(), jax.process_count()),
        tensors,
        sources,
        pieces,
        meta,
        keep,
    )


def _agree(error: BaseException | None, what: str) -> None:
    """Raise on every process if ``what`` failed on any (each process's message, via allgather)."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    text = b"" if error is None else f"process {jax.process_index()}: {error}".encode()[:1000]
    row = np.zeros(1024, np.uint8)
    row[0] = error is not None
    row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, 1024)
    if error is not None:
        raise error
    for r in rows:
        if r[0]:
            message = r[1:].tobytes().rstrip(b"\0").decode(errors="replace")
            raise CheckpointError(f"{what} failed on another process: {message}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _start(plan: _Plan) -> None:
    """Process 0: take the folder's lock, wait for its last save, clear leftovers, make the temp folder."""
    if os.path.exists(plan.target):
        raise CheckpointError(f"checkpoint {plan.target} exists already; it is never overwritten")
    listing.clean_temps(plan.directory)
    os.mkdir(plan.temp)  # mode 0o777 less the umask, like any folder the user makes


def _collect(plan: _Plan) -> dict[str, Any]:
    """Process 0: the other processes' file records, waiting for each ``part`` file."""
    files: dict[str, Any] = {}
    deadline = time.monotonic() + PART_TIMEOUT_S
    for i in range(jax.process_count()):
        part = os.path.join(plan.temp, f"part.{i:05d}.json")
        while not os.path.exists(part):
            if time.monotonic() > deadline:
                raise CheckpointError(f"{plan.target}: process {i} wrote no {part}")
            time.sleep(0.05)
        with open(part, "rb") as f:
            files.update(json.loads(f.read()))
        os.remove(part)
    return files


def _write_part(plan: _Plan) -> dict[str, Any]:
    """This process's array file; in a multi-process run also its ``part`` record for process 0."""
    files = {}
    if plan.tensors:
        written = arrayfile.write(os.path.join(plan.temp, plan.file), plan.tensors)
        files[plan.file] = {**written._asdict(), "pieces": plan.pieces}
    if jax.process_count() > 1:
        part = os.path.join(plan.temp, f"part.{jax.process_index():05d}.json")
        with open(part + ".partial", "w") as f:
            json.dump(files, f)
        os.rename(part + ".partial", part)  # appears whole or not at all
    return files


def _complete(plan: _Plan, files: dict[str, Any]) -> None:
    """Process 0: seal the metadata, rename the temp folder into place, prune."""
    if jax.process_count() > 1:
        files = _collect(plan)
    metadata.write(plan.temp, {**plan.meta, "files": files})
    _fsync_dir(plan.temp)
    if os.path.exists(plan.target):
        raise CheckpointError(f"checkpoint {plan.target} exists already; it is never overwritten")
    os.rename(plan.temp, plan.target)


def _write(plan: _Plan) -> str:
    """Write this process's share; process 0 then completes the checkpoint (or removes the temp folder)."""
    if jax.process_index() != 0:
        _write_part(plan)
        return plan.target
    try:
        _complete(plan, _write_part(plan))
    except BaseException:
        listing.remove_tree(plan.temp)
        raise
    _fsync_dir(plan.directory)
    if plan.keep is not None:
        listing.prune(plan.directory, plan.keep, plan.target)
    return plan.target


def _on_host(plan: _Plan) -> _Plan:
    """The plan with every tensor copied to host memory now (all transfers started at once)."""
    for x in plan.sources:
        if isinstance(x, jax.Array):
            x.copy_to_host_async()
    tensors = [t._replace(fetch=partial(lambda a: a, t.fetch())) for t in plan.tensors]
    return plan._replace(tensors=tensors, sources=[])


def save(
    directory: str | os.PathLike,
    ts: Any,
    *,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = 3,
    blocking: bool = True,
) -> str:
    """Save a train state (any pytree of arrays) as ``directory/step_{step:06d}/``, atomically.

    Arrays go to disk one at a time as they come off the device, so the extra
    host memory is about the largest array (``blocking=True``). With
    ``blocking=False`` the state is copied to host memory first (the whole
    state, once) and written by a background thread while training goes on;
    the next save into the folder (or :func:`~nnjax.checkpoint.wait`) waits for
    it and raises its error, if any. In a multi-process run (``jax.distributed``)
    call it on every process: each writes the shards it holds, and process 0
    completes the checkpoint.

    The first save into a folder locks it for this process (see
    :mod:`nnjax.checkpoint.lock`) and removes leftover temporary folders of
    saves that were killed.

    Args:
        directory: the run's checkpoint folder (created if missing).
        ts: a ``TrainState`` or any pytree of arrays; typed PRNG keys are allowed.
        step: the number in the folder name; default ``int(ts.step)``.
        extra: JSON-able metadata saved beside the arrays (data position, rng, history).
        keep: keep the newest ``keep`` checkpoints and delete older ones once the
            new one is complete (never the new one); ``None`` keeps all.
        blocking: False returns once the state is on the host and writes in the
            background.

    Returns:
        The path of the new checkpoint (complete when ``blocking``).

    Raises:
        CheckpointError: a checkpoint for ``step`` exists already (never
            overwritten), another process is writing into ``directory``, or a
            leaf cannot be stored.
        ArgumentError: ``extra`` is not a JSON-able dict, ``step`` or
            ``keep`` not an int (NumPy and JAX ints pass), ``blocking`` not a bool.

    Example:
        >>> ts = {"w": jnp.ones((2, 3)), "step": jnp.asarray(5)}
        >>> nj.checkpoint.save("runs/a", ts, step=5, extra={"epoch": 3})
        'runs/a/step_000005'
        >>> ts, extra = nj.checkpoint.restore("runs/a", ts)
        >>> extra
        {'epoch': 3}
    """
    keep = None if keep is None else check_int(keep, "save: keep")
    check_bool(blocking, "save: blocking")
    if step is None and not hasattr(ts, "step"):
        raise ArgumentError("save: pass step= for a pytree without a .step")
    number = check_int(_host_scalar(ts.step) if step is None else step, "save: step", 0)
    if extra is not None and not isinstance(extra, Mapping):
        raise ArgumentError(f"save: extra must be a dict, got {type(extra).__name__}")
    directory = os.fspath(directory)
    plan = _plan(directory, ts, number, extra, keep)
    first = jax.process_index() == 0
    error, writer = None, None
    try:  # process 0 locks the folder for the whole run; the others only queue their writes
        writer = lock.acquire(directory, exclusive=first)
    except BaseException as e:  # every process must hear of it before raising
        error = e
    _agree(error, f"saving {plan.target}")
    assert writer is not None  # _agree raised otherwise
    with writer.guard:  # this process's threads save into the folder one at a time
        return _save(writer, plan, first, blocking)


def _save(writer: lock.Writer, plan: _Plan, first: bool, blocking: bool) -> str:
    """The save proper, holding the folder's guard: wait for the last one, start, write."""
    error = None
    try:
        writer.wait()
        if first:
            _start(plan)
    except BaseException as e:  # every process must hear of it before raising
        error = e
    _agree(error, f"saving {plan.target}")
    if not blocking:
        writer.pending = writer.executor.submit(_write, _on_host(plan))
        return plan.target
    path = plan.target
    try:
        path = _write(plan)
    except BaseException as e:
        error = e
    _agree(error, f"saving {plan.target}")
    return path
