"""The data side of ``fit``: what ``train_data`` / ``eval_data`` may be, and the batch stream.

Every accepted form becomes a stream of ``(batch, position after it)``; the
position is what a checkpoint records, so a resumed run takes the same batches.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from nnjax.core.errors import ArgumentError, CheckpointError, DataError
from nnjax.data.iterators import BatchIterator, prefetch_to_device, stack_batches

__all__: list[str] = []  # fit's internals; nj.fit documents the forms

ACCEPTED = (
    "accepted forms: arrays (x, y) with batch_size= (nj.fit(tr, ts, (x, y), batch_size=64)); "
    "nj.data.batches((x, y), 64) or another iterator with .at(position); "
    "a list of (inputs, targets) batches; a callable epoch -> iterable of batches"
)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def is_arrays(data: Any) -> bool:
    """``data`` is arrays (``x``, ``(x, y)``, ``{"ids": ..}``), not a sequence of batches.

    A tuple or dict whose every element is an array, or a dict of arrays: iterating it
    would give arrays (or rows), never ``(inputs, targets)`` pairs.
    """
    if _is_array(data):
        return True
    values = data.values() if isinstance(data, dict) else data if isinstance(data, tuple) else None
    if not values:
        return False
    return all(
        _is_array(v) or (isinstance(v, dict) and all(map(_is_array, jax.tree.leaves(v))))
        for v in values
    )


def is_resumable(data: Any) -> bool:
    return hasattr(data, "at") and hasattr(data, "position")


def batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def check_batch(batch: Any, what: str) -> Any:
    """``batch`` must be an ``(inputs, targets)`` pair; the message lists the accepted forms."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        kind = type(batch).__name__
        shape = f" of shape {np.shape(batch)}" if hasattr(batch, "shape") else ""
        raise DataError(
            f"{what}: expected batches (inputs, targets), got a {kind}{shape}; {ACCEPTED}"
        )
    return batch


def _resumed(data: Any, pos: dict[str, int] | None, key: str) -> None:
    if pos is not None and key not in pos:
        raise CheckpointError(f"the checkpoint's data position {pos} does not fit {data!r}")


def stream(data: Any, epochs: int | None, pos: dict[str, int] | None) -> Iterator:
    """``(batch, position after it)`` from any kind of ``train_data``, resumed at ``pos``."""
    if isinstance(data, BatchIterator) or is_resumable(data):
        _resumed(data, pos, "position")
        start = data.position if pos is None else pos["position"]
        if isinstance(data, BatchIterator):
            it = data.at(start, epochs=data.epochs if epochs is None else epochs)
        elif epochs is not None:
            raise ArgumentError(f"{type(data).__name__} has no epochs; pass steps= to fit")
        else:
            it = data.at(start)
        for batch in it:
            yield check_batch(batch, "train_data"), {"position": it.position}
        return
    _resumed(data, pos, "epoch")
    epoch, index = (0, 0) if pos is None else (pos["epoch"], pos["index"])
    # what is left: a re-iterable, or epoch -> batches
    batches: Iterable | Callable[[int], Iterable] = data
    while epochs is None or epoch < epochs:
        it = iter(batches(epoch) if callable(batches) else batches)
        count = sum(1 for _ in itertools.islice(it, index))
        for batch in it:
            count += 1
            yield check_batch(batch, "train_data"), {"epoch": epoch, "index": count}
        if count == 0:
            return  # an empty (or used up) epoch ends the data
        epoch, index = epoch + 1, 0


def calls(batches: Iterator, k: int, prefetch: int) -> Iterator:
    """``(batch for one trainer.step, position after it, examples)``; ``k`` batches stacked.

    With ``prefetch``, the batches go through :func:`nnjax.data.prefetch_to_device`;
    their positions and sizes wait in a queue beside them.
    """
    if k == 1:
        grouped = ((batch, pos, batch_size(batch)) for batch, pos in batches)
    else:
        groups = iter(lambda: list(itertools.islice(batches, k)), [])
        grouped = (
            (next(stack_batches([b for b, _ in g], k)), g[-1][1], sum(batch_size(b) for b, _ in g))
            for g in itertools.takewhile(lambda g: len(g) == k, groups)
        )
    if prefetch <= 0:
        yield from grouped
        return
    meta: collections.deque = collections.deque()

    def host_batches() -> Iterator:
        for batch, pos, n in grouped:
            meta.append((pos, n))
            yield batch

    for batch in prefetch_to_device(host_batches(), prefetch):
        yield (batch, *meta.popleft())


def planned_steps(data: Any, epochs: int | None, steps: int | None) -> int | None:
    """The run's length where it is known (for the progress bar), else None."""
    per_epoch = None
    if isinstance(data, BatchIterator):
        per_epoch = data.steps_per_epoch
        epochs = data.epochs if epochs is None else epochs
    elif hasattr(data, "__len__") and not callable(data):
        per_epoch = len(data)
    by_epochs = per_epoch * epochs if per_epoch is not None and epochs is not None else None
    known = [n for n in (steps, by_epochs) if n is not None]
    return min(known) if known else None


def steps_per_epoch(data: Any) -> int | None:
    if isinstance(data, BatchIterator):
        return data.steps_per_epoch
    return len(data) if isinstance(data, list | tuple) else None


def eval_batches(eval_data: Any) -> Iterable:
    """One full pass over ``eval_data``, as often as it is asked for."""
    if isinstance(eval_data, BatchIterator):
        return eval_data.at(0, epochs=1)  # one full pass, however it was built
    if is_resumable(eval_data):
        if getattr(eval_data, "steps", None) is None:
            raise ArgumentError(f"eval_data {type(eval_data).__name__} is endless; give it steps=")
        return eval_data.at(0)
    batches: Iterable | Callable[[], Iterable] = eval_data  # a re-iterable, or () -> batches
    return batches() if callable(batches) else batches
