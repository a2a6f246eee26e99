"""One writer per checkpoint folder: an OS file lock held from the first save until exit.

The first :func:`nnjax.checkpoint.save` into a folder takes an exclusive
``fcntl.flock`` on ``folder/.writer.lock`` and writes its pid and host there;
the lock stays with the process (the OS drops it when the process ends, even
after ``kill -9``) or until :func:`release`. A second process that saves into
the folder gets a CheckpointError naming the first. The lock also orders this
process's own saves: threads that save into one folder take turns (each save
completes or fails with its own error), and a background (``blocking=False``)
save runs on the folder's one-thread executor, so the next save waits for it.

A process-wide table maps each held folder to its lock: an OS lock belongs to
the process, so the table is the one place that knows which folders it holds.

A background save still running when the script ends is finished before the
interpreter exits (its thread is joined); one that failed, and whose error no
``save`` or ``wait`` raised, is reported on stderr at exit, never left inside a future.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from nnjax.core.errors import CheckpointError

__all__ = ["wait", "release"]

LOCK = ".writer.lock"


class Writer:
    """A held folder: the lock's file descriptor and the save running in the background, if any."""

    def __init__(self, fd: int | None, inode: int | None) -> None:
        self.fd, self.inode = fd, inode
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="nnjax-checkpoint")
        self.pending: Future | None = None
        # one save of this process at a time into the folder: threads that save together
        # queue here (a save's start clears temporary folders another save is writing)
        self.guard = threading.Lock()

    def wait(self) -> None:
        """Block until the background save (if any) is done; raise its error here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


_HELD: dict[str, Writer] = {}
_GUARD = threading.Lock()


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def acquire(directory: str, exclusive: bool = True) -> Writer:
    """The folder's writer, taking the lock on first use (creating the folder).

    ``exclusive=False`` (the processes other than 0 of a multi-process run, whose
    process 0 holds the lock) gives a writer that only orders this process's saves.

    Raises:
        CheckpointError: another process holds the folder's lock (the message names it).
    """
    os.makedirs(directory, exist_ok=True)
    real = os.path.realpath(directory)
    path = os.path.join(real, LOCK)
    with _GUARD:
        held = _HELD.get(real)
        if held is not None and (held.fd is None or _inode(path) == held.inode):
            return held
        if held is not None:  # the folder was removed and made again: its old lock means nothing
            _drop(real)
        if not exclusive:
            _HELD[real] = Writer(None, None)
            return _HELD[real]
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _owner(fd)
            os.close(fd)
            raise CheckpointError(
                f"{directory} is being written by another process ({other}); "
                "one checkpoint folder takes one writer: stop that run or save elsewhere"
            ) from None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _HELD[real] = Writer(fd, os.fstat(fd).st_ino)
        return _HELD[real]


def _drop(real: str) -> None:
    held = _HELD.pop(real)
    held.executor.shutdown(wait=True)
    if held.fd is not None:
        os.close(held.fd)


def _report_at_exit() -> None:
    """Say on stderr which background saves failed (their threads have finished by now)."""
    for real, writer in list(_HELD.items()):
        pending, writer.pending = writer.pending, None
        if pending is None:
            continue
        error = pending.exception() if not pending.cancelled() else RuntimeError("never run")
        if error is not None:
            print(
                f"nnjax: the background checkpoint save into {real} FAILED, nothing was "
                f"written: {type(error).__name__}: {error}",
                file=sys.stderr,
                flush=True,
            )


atexit.register(_report_at_exit)


def held(directory: str | os.PathLike) -> Writer | None:
    return _HELD.get(os.path.realpath(os.fspath(directory)))


def wait(directory: str | os.PathLike) -> None:
    """Block until the background save into ``directory`` (if any) is complete.

    Raises:
        Exception: the error the background save raised (it is raised once, here
            or by the next :func:`~nnjax.checkpoint.save` into the folder).

    Example:
        >>> nj.checkpoint.save("runs/w", {"w": jnp.ones(3)}, step=1, blocking=False)
        'runs/w/step_000001'
        >>> nj.checkpoint.wait("runs/w")
        >>> nj.checkpoint.latest("runs/w")
        'runs/w/step_000001'
    """
    writer = held(directory)
    if writer is not None:
        writer.wait()


def release(directory: str | os.PathLike) -> None:
    """Finish the folder's background save and drop its lock, so another process may write there.

    Raises:
        Exception: the error the background save raised; the lock is dropped anyway.
    """
    real = os.path.realpath(os.fspath(directory))
    with _GUARD:
        writer = _HELD.get(real)
        if writer is None:
            return
        try:
            writer.wait()
        finally:
            _drop(real)
