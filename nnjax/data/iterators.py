"""Batch iterators: seeded, resumable minibatches, device prefetch, stacking.

Batches are plain NumPy pytrees on the host; :func:`prefetch_to_device` moves
them to the accelerator ahead of use. :func:`batches` and :func:`lm_batches`
return iterators (:class:`BatchIterator`, :class:`LMBatchIterator`) with a
``position`` (batches consumed) and ``at(position)``, so a checkpoint can record
where training was and resume at that exact batch.

(The module is ``iterators``, not ``batches``: ``nj.data.batches`` is the function.)
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, DataError

__all__ = [
    "batches",
    "lm_batches",
    "BatchIterator",
    "LMBatchIterator",
    "prefetch_to_device",
    "stack_batches",
    "train_test_split",
]


def _leading_length(arrays: Any) -> int:
    leaves = jax.tree.leaves(arrays)
    if not leaves:
        raise DataError("expected at least one array, got an empty pytree")
    lengths = [int(np.shape(a)[0]) if np.ndim(a) else None for a in leaves]
    first = lengths[0]
    if first is None or any(n != first for n in lengths):
        shapes = ", ".join(str(tuple(np.shape(a))) for a in leaves)
        raise DataError(
            f"expected arrays with the same leading length, got lengths {lengths} (shapes {shapes})"
        )
    return first


class _BatchSpec(NamedTuple):
    arrays: Any
    batch_size: int
    shuffle: bool
    seed: int
    drop_remainder: bool
    epochs: int | None


def _epochs(epochs: Any) -> int | None:
    return None if epochs is None else check_int(epochs, "epochs", minimum=0)


class BatchIterator:
    """Minibatches over a pytree of arrays: deterministic per ``(seed, epoch)``, resumable.

    Returned by :func:`batches`. An iterator; ``position`` counts the batches taken so
    far across epochs (``start`` included), and ``at(position)`` is a fresh iterator
    that resumes at exactly that batch.

    Attributes:
        steps_per_epoch: batches in one pass over the data.
        position: batches consumed so far (the index of the next batch).
        epochs, batch_size, num_examples: as given to :func:`batches`.
    """

    def __init__(self, spec: _BatchSpec, start: int):
        self.spec = spec
        self.num_examples = _leading_length(spec.arrays)
        self.batch_size, self.epochs = spec.batch_size, spec.epochs
        self.start = self.position = start
        n, b = self.num_examples, spec.batch_size
        self.steps_per_epoch = n // b if spec.drop_remainder else -(-n // b)
        self._order: tuple[int, np.ndarray | None] = (-1, None)

    def at(self, position: int, *, epochs: Any = "same") -> BatchIterator:
        """A fresh iterator over the same data that starts at batch ``position``.

        ``epochs`` replaces the number of passes (``None``: endless); by default it is kept.
        """
        spec = self.spec if epochs == "same" else self.spec._replace(epochs=_epochs(epochs))
        return BatchIterator(spec, check_int(position, "position", minimum=0))

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.position // self.steps_per_epoch

    def __len__(self) -> int:
        """Batches left to yield; a TypeError for an endless iterator (``epochs=None``)."""
        if self.epochs is None:
            raise ArgumentError("an endless BatchIterator (epochs=None) has no len()")
        return max(self.epochs * self.steps_per_epoch - self.position, 0)

    def _permutation(self, epoch: int) -> np.ndarray | None:
        if not self.spec.shuffle:
            return None
        if self._order[0] != epoch:
            rng = np.random.default_rng((self.spec.seed, epoch))
            self._order = (epoch, rng.permutation(self.num_examples))
        return self._order[1]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self.epochs is not None and self.position >= self.epochs * self.steps_per_epoch:
            raise StopIteration
        epoch, i = divmod(self.position, self.steps_per_epoch)
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.num_examples)
        order = self._permutation(epoch)
        if order is None:
            batch = jax.tree.map(lambda a: a[lo:hi], self.spec.arrays)
        else:
            index = order[lo:hi]
            batch = jax.tree.map(lambda a: a[index], self.spec.arrays)
        self.position += 1
        return batch


def batches(
    arrays: Any,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    epochs: int | None = 1,
    start: int = 0,
) -> BatchIterator:
    """Minibatches of ``batch_size`` examples from a pytree of arrays with one leading length.

    Each epoch visits every example once, in the order of a permutation drawn
    from ``(seed, epoch)`` (or in order with ``shuffle=False``), so any batch can
    be recomputed from its index and training can resume exactly.

    Args:
        arrays: a pytree (tuple, dict) of arrays ``(N, ...)`` with the same ``N >= 1``.
        batch_size: examples per batch.
        shuffle: shuffle the examples anew each epoch.
        seed: seed of the shuffling.
        drop_remainder: drop the last ``N % batch_size`` examples of each epoch;
            otherwise the last batch of an epoch is smaller.
        epochs: passes over the data; ``None`` for an endless stream.
        start: number of batches to skip (resume at a data position).

    Returns:
        A :class:`BatchIterator` yielding pytrees like ``arrays`` of
        ``(batch_size, ...)`` NumPy arrays, with ``.position`` and ``.at(position)``.

    Raises:
        DataError: arrays of different leading lengths or with no examples (before
            any work), or a ``batch_size`` larger than the data with ``drop_remainder``.
        ArgumentError: ``batch_size``, ``epochs``, ``start`` or ``seed`` not an int
            in range (``batch_size: expected an int >= 1, got 64.0 (float)``).

    Example:
        >>> x, y = np.zeros((100, 3), np.float32), np.arange(100)
        >>> it = nj.data.batches((x, y), 32, seed=0, epochs=2)
        >>> xb, yb = next(it); it.position
        1
        >>> xb.shape, yb.shape, it.steps_per_epoch
        ((32, 3), (32,), 3)
    """
    n = _leading_length(arrays)
    batch_size = check_int(batch_size, "batch_size")
    if n == 0:
        raise DataError("expected at least one example, got arrays with leading length 0")
    if drop_remainder and batch_size > n:
        raise DataError(
            f"expected batch_size <= {n} examples with drop_remainder=True, "
            f"got batch_size == {batch_size}"
        )
    seed = check_int(seed, "seed", minimum=0)
    spec = _BatchSpec(
        jax.tree.map(np.asarray, arrays), batch_size, shuffle, seed, drop_remainder, _epochs(epochs)
    )
    return BatchIterator(spec, check_int(start, "start", minimum=0))


class _WindowSpec(NamedTuple):
    ids: np.ndarray
    block_size: int
    batch_size: int
    seed: int
    steps: int | None


class LMBatchIterator:
    """Random ``(x, y)`` windows of a token sequence, ``y`` shifted by one; resumable.

    Returned by :func:`lm_batches`. Batch ``i`` is drawn from ``(seed, i)``, so
    ``at(position)`` resumes exactly.
    """

    def __init__(self, spec: _WindowSpec, start: int):
        self.spec, self.steps = spec, spec.steps
        self.start = self.position = start
        self._window = np.arange(spec.block_size)

    def at(self, position: int) -> LMBatchIterator:
        """A fresh iterator that starts at batch ``position``."""
        return LMBatchIterator(self.spec, check_int(position, "position", minimum=0))

    def __iter__(self) -> LMBatchIterator:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.steps is not None and self.position >= self.steps:
            raise StopIteration
        ids, block_size, batch_size, seed, _ = self.spec
        rng = np.random.default_rng((seed, self.position))
        ix = rng.integers(0, len(ids) - block_size, size=batch_size)
        index = ix[:, None] + self._window  # (B, T)
        self.position += 1
        return ids[index], ids[index + 1]


def lm_batches(
    ids: Any,
    block_size: int,
    batch_size: int,
    seed: int = 0,
    *,
    start: int = 0,
    steps: int | None = None,
) -> LMBatchIterator:
    """Language-model batches as nanoGPT's ``get_batch``: random windows and their next tokens.

    Args:
        ids: token ids ``(N,)``, ``N > block_size``.
        block_size: window length ``T``.
        batch_size: windows per batch ``B``.
        seed: seed; batch ``i`` depends only on ``(seed, i)``.
        start: batches to skip (resume).
        steps: total batches to yield (``start`` included); ``None``: endless.

    Returns:
        An :class:`LMBatchIterator` of ``(x, y)``, both ``(B, T)`` with the dtype
        of ``ids``, ``y[:, t] == x[:, t + 1]``; with ``.position`` and ``.at(position)``.

    Raises:
        DataError: ``ids`` not 1-d or not longer than ``block_size``.
        ArgumentError: a size, seed or count that is not an int in range.

    Example:
        >>> ids = np.arange(1000, dtype=np.int32) % 65
        >>> x, y = next(nj.data.lm_batches(ids, 64, 12))
        >>> x.shape, y.shape
        ((12, 64), (12, 64))
    """
    ids = np.asarray(ids)
    block_size = check_int(block_size, "block_size")
    if ids.ndim != 1:
        raise DataError(f"expected 1-d token ids, got ids.shape == {ids.shape}")
    if len(ids) <= block_size:
        raise DataError(
            f"expected more than block_size == {block_size} tokens, got ids.shape == {ids.shape}"
        )
    steps = None if steps is None else check_int(steps, "steps", minimum=0)
    spec = _WindowSpec(
        ids, block_size, check_int(batch_size, "batch_size"), check_int(seed, "seed", 0), steps
    )
    return LMBatchIterator(spec, check_int(start, "start", minimum=0))


def prefetch_to_device(iterator: Iterable[Any], size: int = 2, sharding: Any = None) -> Iterator:
    """Put batches on the device ``size`` batches ahead of use (``jax.device_put`` is async).

    Args:
        iterator: batches (pytrees of host arrays).
        size: batches in flight.
        sharding: a ``jax.sharding.Sharding`` (or pytree of them) for ``jax.device_put``;
            ``None``: the default device.

    Yields:
        The same batches as ``jax.Array`` pytrees.
    """
    size = check_int(size, "size")  # checked here, not at the first next()

    def ahead() -> Iterator:
        queue: collections.deque = collections.deque()
        for batch in iterator:
            queue.append(jax.device_put(batch, sharding))
            if len(queue) >= size:
                yield queue.popleft()
        while queue:
            yield queue.popleft()

    return ahead()


def _stack(leaves: list[Any]) -> Any:
    if any(isinstance(leaf, jax.Array) for leaf in leaves):
        return jnp.stack(leaves)
    return np.stack(leaves)


def stack_batches(iterator: Iterable[Any], k: int) -> Iterator:
    """Group ``k`` consecutive batches into one with a leading axis ``k`` (for ``steps_per_call``).

    A last group of fewer than ``k`` batches is dropped.

    Yields:
        Pytrees of ``(k, batch, ...)`` arrays.
    """
    k = check_int(k, "k")  # checked here, not at the first next()

    def grouped(it: Iterator) -> Iterator:
        while len(group := list(itertools.islice(it, k))) == k:
            yield jax.tree.map(lambda *leaves: _stack(list(leaves)), *group)

    return grouped(iter(iterator))


def train_test_split(arrays: Any, test_fraction: float = 0.2, seed: int = 0) -> tuple[Any, Any]:
    """Split a pytree of arrays ``(N, ...)`` at random into train and test parts.

    Returns:
        ``(train, test)``, pytrees like ``arrays``; ``test`` holds
        ``round(N * test_fraction)`` examples.
    """
    n = _leading_length(arrays)
    n_test = round(n * test_fraction)
    if not 0 < n_test < n:
        raise DataError(
            f"expected 0 < round(N * test_fraction) < N, got N == {n}, "
            f"test_fraction == {test_fraction}"
        )
    order = np.random.default_rng(seed).permutation(n)
    test_ix, train_ix = order[:n_test], order[n_test:]
    take = lambda ix: jax.tree.map(lambda a: np.asarray(a)[ix], arrays)
    return take(train_ix), take(test_ix)
