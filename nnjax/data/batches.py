"""Data: resumable batch iterators, device prefetch, and readers for small datasets.

Batches are plain NumPy pytrees on the host; :func:`prefetch_to_device` moves
them to the accelerator ahead of use. :func:`batches` and :func:`lm_batches`
return iterators with a ``position`` (batches consumed) and ``at(position)``,
so a checkpoint can record where training was and resume at that exact batch.

Readers: :func:`load_idx` / :func:`load_mnist` (MNIST, Fashion-MNIST),
:func:`load_text` (nanoGPT's ``shakespeare_char`` convention), :func:`load_digits`
(scikit-learn's bundled 8x8 digits).
"""

from __future__ import annotations

import collections
import gzip
import itertools
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import DataError

__all__ = [
    "DataError",
    "Batches",
    "batches",
    "LMBatches",
    "lm_batches",
    "prefetch_to_device",
    "stack_batches",
    "train_test_split",
    "load_idx",
    "load_mnist",
    "TextData",
    "load_text",
    "load_digits",
]

PathLike = str | os.PathLike


def _leading_length(arrays: Any) -> int:
    leaves = jax.tree.leaves(arrays)
    if not leaves:
        raise DataError("expected at least one array, got an empty pytree")
    lengths = [int(np.shape(a)[0]) if np.ndim(a) else None for a in leaves]
    if None in lengths or len(set(lengths)) != 1:
        shapes = ", ".join(str(tuple(np.shape(a))) for a in leaves)
        raise DataError(
            f"expected arrays with the same leading length, got lengths {lengths} (shapes {shapes})"
        )
    return lengths[0]


class Batches:
    """Minibatches over a pytree of arrays: deterministic per ``(seed, epoch)``, resumable.

    An iterator; ``position`` counts the batches taken so far across epochs
    (``start`` included), and ``at(position)`` is a fresh iterator that resumes at
    exactly that batch. Build it with :func:`batches`.

    Attributes:
        steps_per_epoch: batches in one pass over the data.
        position: batches consumed so far (the index of the next batch).
    """

    def __init__(
        self,
        arrays: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        epochs: int | None = 1,
        start: int = 0,
    ):
        self.num_examples = _leading_length(arrays)
        if batch_size < 1:
            raise DataError(f"expected batch_size >= 1, got batch_size == {batch_size}")
        if drop_remainder and batch_size > self.num_examples:
            raise DataError(
                f"expected batch_size <= {self.num_examples} examples with drop_remainder=True, "
                f"got batch_size == {batch_size}"
            )
        if epochs is not None and epochs < 0:
            raise DataError(f"expected epochs >= 0 or None, got epochs == {epochs}")
        if start < 0:
            raise DataError(f"expected start >= 0, got start == {start}")
        self.arrays = jax.tree.map(np.asarray, arrays)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.epochs = epochs
        self.start = start
        self.position = start
        n, b = self.num_examples, batch_size
        self.steps_per_epoch = n // b if drop_remainder else -(-n // b)
        self._order: tuple[int, np.ndarray | None] = (-1, None)

    def at(self, position: int, *, epochs: Any = "same") -> Batches:
        """A fresh iterator over the same data that starts at batch ``position``.

        ``epochs`` replaces the number of passes (``None``: endless); by default it is kept.
        """
        return Batches(
            self.arrays,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_remainder=self.drop_remainder,
            epochs=self.epochs if epochs == "same" else epochs,
            start=position,
        )

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.position // self.steps_per_epoch

    def __len__(self) -> int:
        """Batches left to yield; a TypeError for an endless iterator (``epochs=None``)."""
        if self.epochs is None:
            raise TypeError("an endless Batches (epochs=None) has no len()")
        return max(self.epochs * self.steps_per_epoch - self.position, 0)

    def _permutation(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._order[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._order = (epoch, rng.permutation(self.num_examples))
        return self._order[1]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        if self.epochs is not None and self.position >= self.epochs * self.steps_per_epoch:
            raise StopIteration
        epoch, i = divmod(self.position, self.steps_per_epoch)
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.num_examples)
        order = self._permutation(epoch)
        if order is None:
            batch = jax.tree.map(lambda a: a[lo:hi], self.arrays)
        else:
            index = order[lo:hi]
            batch = jax.tree.map(lambda a: a[index], self.arrays)
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
) -> Batches:
    """Minibatches of ``batch_size`` examples from a pytree of arrays with one leading length.

    Each epoch visits every example once, in the order of a permutation drawn
    from ``(seed, epoch)`` (or in order with ``shuffle=False``), so any batch can
    be recomputed from its index and training can resume exactly.

    Args:
        arrays: a pytree (tuple, dict) of arrays ``(N, ...)`` with the same ``N``.
        batch_size: examples per batch.
        shuffle: shuffle the examples anew each epoch.
        seed: seed of the shuffling.
        drop_remainder: drop the last ``N % batch_size`` examples of each epoch;
            otherwise the last batch of an epoch is smaller.
        epochs: passes over the data; ``None`` for an endless stream.
        start: number of batches to skip (resume at a data position).

    Returns:
        A :class:`Batches` iterator yielding pytrees like ``arrays`` of
        ``(batch_size, ...)`` NumPy arrays, with ``.position`` and ``.at(position)``.

    Raises:
        DataError: arrays of different leading lengths (before any work), or a
            ``batch_size`` larger than the data with ``drop_remainder``.

    Example:
        >>> it = nj.data.batches((x, y), 32, seed=0, epochs=2)
        >>> xb, yb = next(it); it.position
        1
    """
    return Batches(
        arrays,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_remainder=drop_remainder,
        epochs=epochs,
        start=start,
    )


class LMBatches:
    """Random ``(x, y)`` windows of a token sequence, ``y`` shifted by one; resumable.

    Batch ``i`` is drawn from ``(seed, i)``, so ``at(position)`` resumes exactly.
    Build it with :func:`lm_batches`.
    """

    def __init__(
        self,
        ids: Any,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
        steps: int | None = None,
    ):
        self.ids = np.asarray(ids)
        if self.ids.ndim != 1:
            raise DataError(f"expected 1-d token ids, got ids.shape == {self.ids.shape}")
        if len(self.ids) <= block_size:
            raise DataError(
                f"expected more than block_size == {block_size} tokens, "
                f"got ids.shape == {self.ids.shape}"
            )
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.steps = steps
        self.position = start
        self._window = np.arange(block_size)

    def at(self, position: int) -> LMBatches:
        """A fresh iterator that starts at batch ``position``."""
        return LMBatches(
            self.ids,
            self.block_size,
            self.batch_size,
            seed=self.seed,
            start=position,
            steps=self.steps,
        )

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.steps is not None and self.position >= self.steps:
            raise StopIteration
        rng = np.random.default_rng((self.seed, self.position))
        ix = rng.integers(0, len(self.ids) - self.block_size, size=self.batch_size)
        index = ix[:, None] + self._window  # (B, T)
        self.position += 1
        return self.ids[index], self.ids[index + 1]


def lm_batches(
    ids: Any,
    block_size: int,
    batch_size: int,
    seed: int = 0,
    *,
    start: int = 0,
    steps: int | None = None,
) -> LMBatches:
    """Language-model batches as nanoGPT's ``get_batch``: random windows and their next tokens.

    Args:
        ids: token ids ``(N,)``.
        block_size: window length ``T``.
        batch_size: windows per batch ``B``.
        seed: seed; batch ``i`` depends only on ``(seed, i)``.
        start: batches to skip (resume).
        steps: total batches to yield (``start`` included); ``None``: endless.

    Returns:
        An :class:`LMBatches` iterator of ``(x, y)``, both ``(B, T)`` with the dtype
        of ``ids``, ``y[:, t] == x[:, t + 1]``; with ``.position`` and ``.at(position)``.

    Example:
        >>> x, y = next(nj.data.lm_batches(text.train, 64, 12))
        >>> x.shape, y.shape
        ((12, 64), (12, 64))
    """
    return LMBatches(ids, block_size, batch_size, seed=seed, start=start, steps=steps)


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
    if size < 1:
        raise ValueError(f"expected size >= 1, got size == {size}")
    queue: collections.deque = collections.deque()
    for batch in iterator:
        queue.append(jax.device_put(batch, sharding))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


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
    if k < 1:
        raise ValueError(f"expected k >= 1, got k == {k}")
    it = iter(iterator)
    while True:
        group = list(itertools.islice(it, k))
        if len(group) < k:
            return
        yield jax.tree.map(lambda *leaves: _stack(list(leaves)), *group)


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


# ---------------------------------------------------------------------------- readers

_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw (told apart by the gzip magic).

    The magic is ``0x0000`` then a type byte (``0x08`` uint8, ...) and the number
    of axes: MNIST images have magic 2051 ``(N, 28, 28)``, labels 2049 ``(N,)``.

    Returns:
        The array, in native byte order.

    Raises:
        DataError: a bad magic, a truncated or corrupt file.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES or data[3] == 0:
        raise DataError(
            f"{path}: expected an IDX file (magic 0x0000, a type byte, the number of axes), "
            f"got magic {data[:4].hex() or 'none'}"
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes, got {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: expected {expected} bytes for shape {shape} {dtype.name}, "
            f"got {len(data)} (truncated or corrupt file)"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: PathLike, stem: str) -> str:
    names = [stem + ".gz", stem, stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"none of {names} found in {os.fspath(directory)!r}")


def load_mnist(directory: PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST (or Fashion-MNIST) from a folder of the four standard IDX files, gzipped or raw.

    Args:
        directory: folder holding ``train-images-idx3-ubyte[.gz]``, ``t10k-...``.
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` (0 is background) and uint8 ``(N,)``.

    Example:
        >>> x, y = nj.data.load_mnist("../shared/data/mnist", "test")
        >>> x.shape, y.shape
        ((10000, 28, 28), (10000,))
    """
    if split not in _MNIST_FILES:
        raise ValueError(f"expected split 'train' or 'test', got {split!r}")
    images_stem, labels_stem = _MNIST_FILES[split]
    images = load_idx(_find(directory, images_stem))
    labels = load_idx(_find(directory, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"expected images (N, H, W) and labels (N,), "
            f"got images.shape == {images.shape}, labels.shape == {labels.shape}"
        )
    return images, labels


class TextData(NamedTuple):
    """A tokenised text: ``train`` and ``val`` ids ``(N,)`` int32, the vocabulary, and the codec."""

    train: np.ndarray
    val: np.ndarray
    vocab: list
    encode: Callable[[str], np.ndarray]
    decode: Callable[[Iterable[int]], str]


def load_text(path: PathLike, level: str = "char", val_fraction: float = 0.1) -> TextData:
    """A text file as token ids, split into train and validation at ``1 - val_fraction``.

    ``level="char"`` follows nanoGPT's ``shakespeare_char``: the vocabulary is the
    sorted set of the text's characters. ``level="byte"``: the 256 byte values of
    the UTF-8 encoding.

    Args:
        path: a UTF-8 text file.
        level: ``"char"`` or ``"byte"``.
        val_fraction: the tail fraction held out for validation.

    Returns:
        A :class:`TextData`; ``decode(encode(s)) == s`` for any text of the vocabulary.

    Example:
        >>> text = nj.data.load_text("../shared/data/tinyshakespeare/input.txt")
        >>> len(text.vocab), text.train.shape, text.val.shape
        (65, (1003854,), (111540,))
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"expected 0 <= val_fraction < 1, got val_fraction == {val_fraction}")
    if level == "char":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        vocab: list = sorted(set(text))
        stoi = {c: i for i, c in enumerate(vocab)}

        def encode(s: str) -> np.ndarray:
            try:
                return np.array([stoi[c] for c in s], dtype=np.int32)
            except KeyError as e:
                raise DataError(f"character {e.args[0]!r} is not in the vocabulary") from None

        def decode(ids: Iterable[int]) -> str:
            return "".join(vocab[int(i)] for i in ids)

        data = encode(text)
    elif level == "byte":
        with open(path, "rb") as f:
            raw = f.read()
        vocab = [bytes([i]) for i in range(256)]

        def encode(s: str) -> np.ndarray:
            return np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32)

        def decode(ids: Iterable[int]) -> str:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

        data = np.frombuffer(raw, np.uint8).astype(np.int32)
    else:
        raise ValueError(f"expected level 'char' or 'byte', got {level!r}")
    n = int((1 - val_fraction) * len(data))
    return TextData(data[:n], data[n:], vocab, encode, decode)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no network).

    Returns:
        ``(x, y)``: float32 ``(1797, 8, 8, 1)`` in ``[0, 1]`` (counts / 16) and int32 ``(1797,)``.

    Raises:
        ImportError: scikit-learn is missing (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("nj.data.load_digits needs scikit-learn: pip install scikit-learn") from e
    digits = sk_load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return x, digits.target.astype(np.int32)
