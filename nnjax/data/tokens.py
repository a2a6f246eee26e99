"""Token files larger than memory (nanoGPT's ``.bin``), and a byte-level tokenizer.

nanoGPT's ``prepare.py`` writes a corpus's token ids as one flat ``uint16`` array
(``np.array(ids, np.uint16).tofile("train.bin")``; ``uint32`` when the vocabulary
has more than 65,536 entries) and ``train.py`` reads it through ``np.memmap``, so
only the windows a batch touches are read from disk. :func:`write_tokens`,
:func:`open_tokens` and :func:`token_batches` do the same, with the resumable
windows of :func:`nnjax.data.lm_batches`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from nnjax.core.errors import DataError
from nnjax.data.iterators import LMBatchIterator, lm_batches
from nnjax.data.records import is_dataset

__all__ = ["write_tokens", "open_tokens", "token_batches", "dataset_tokens", "ByteTokenizer"]

_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))


def _token_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise DataError(f"expected dtype uint16 or uint32 (nanoGPT's .bin), got {dtype}")
    return dtype


def write_tokens(path: str | os.PathLike, ids: Any, dtype: Any = None) -> np.dtype:
    """Write token ids as a raw little-endian ``.bin`` file, as nanoGPT's ``prepare.py``.

    Args:
        path: the file to write.
        ids: integer ids ``(N,)``, all in ``[0, 2**32)``.
        dtype: ``uint16`` or ``uint32``; ``None``: ``uint16`` when every id fits.

    Returns:
        The dtype written (the file has no header: pass it to :func:`open_tokens`).

    Raises:
        DataError: ids that are not 1-d integers, negative, or too large for ``dtype``.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "train.bin")
        >>> nj.data.write_tokens(path, [1, 2, 70000])
        dtype('uint32')
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{os.fspath(path)}: expected 1-d integer ids, got {ids.dtype} {ids.shape}")
    low, high = (int(ids.min()), int(ids.max())) if len(ids) else (0, 0)
    if dtype is None:
        dtype = np.uint16 if high < 2**16 else np.uint32
    dtype = _token_dtype(dtype)
    if low < 0 or high > np.iinfo(dtype).max:
        raise DataError(
            f"{os.fspath(path)}: expected ids in [0, {np.iinfo(dtype).max}] for {dtype}, "
            f"got ids in [{low}, {high}]"
        )
    ids.astype(dtype.newbyteorder("<")).tofile(path)
    return dtype


def open_tokens(path: str | os.PathLike, dtype: Any = np.uint16) -> np.ndarray:
    """A token ``.bin`` file as a read-only ``np.memmap`` (nothing is read until indexed).

    Args:
        path: a file written by :func:`write_tokens` or nanoGPT's ``prepare.py``.
        dtype: ``uint16`` (nanoGPT's default) or ``uint32``.

    Returns:
        A ``(N,)`` memory map of ``dtype``.

    Raises:
        DataError: an empty file, or a size that is not a multiple of the dtype's.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "train.bin")
        >>> _ = nj.data.write_tokens(path, np.arange(10))
        >>> nj.data.open_tokens(path)[3:6]
        memmap([3, 4, 5], dtype=uint16)
    """
    dtype = _token_dtype(dtype)
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise DataError(
            f"{os.fspath(path)}: expected a non-empty multiple of {dtype.itemsize} bytes "
            f"({dtype} tokens), got {size} bytes (wrong dtype, or a truncated file?)"
        )
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r")


def dataset_tokens(
    dataset: Any, column: str = "input_ids", eos_id: int | None = None
) -> np.ndarray:
    """One token stream from a ``datasets.Dataset`` column of id lists, ``eos_id`` between rows.

    Args:
        dataset: a ``datasets.Dataset`` (say, the result of ``dataset.map(tokenize)``).
        column: the column of token-id lists.
        eos_id: an id put between consecutive rows (``None``: none).

    Returns:
        int64 ``(N,)``: the rows in order, joined.

    Raises:
        DataError: no such column, or an empty one.
    """
    if column not in dataset.column_names:
        raise DataError(
            f"dataset: expected a column {column!r} of token ids, got columns {dataset.column_names}"
        )
    parts: list[np.ndarray] = []
    sep = np.asarray([] if eos_id is None else [eos_id], np.int64)
    for i, row in enumerate(dataset.with_format("numpy", columns=[column])[column]):
        parts += [sep, np.asarray(row, np.int64)] if i else [np.asarray(row, np.int64)]
    if not parts or not sum(len(p) for p in parts):
        raise DataError(f"dataset: column {column!r} holds no tokens")
    return np.concatenate(parts)


def token_batches(
    path: Any,
    block_size: int,
    batch_size: int,
    seed: int = 0,
    *,
    dtype: Any = np.uint16,
    start: int = 0,
    steps: int | None = None,
    column: str = "input_ids",
    eos_id: int | None = None,
) -> LMBatchIterator:
    """Random ``(x, y)`` windows of a token file, ``y`` shifted by one; resumable exactly.

    The windows are those of :func:`nnjax.data.lm_batches` over the memory map:
    batch ``i`` depends only on ``(seed, i)``, so ``.at(position)`` (and
    ``nj.fit``'s checkpoints) resume at the same batch, and each batch reads only
    ``batch_size * (block_size + 1)`` tokens from disk. A ``datasets.Dataset`` is
    read into memory as :func:`dataset_tokens` joins it, then windowed the same way.

    Args:
        path: a token ``.bin`` file, or a ``datasets.Dataset`` with a ``column`` of
            token-id lists (then ``dtype`` is unused and ``eos_id`` separates rows).
        block_size: window length ``T``.
        batch_size: windows per batch ``B``.
        seed: seed of the window offsets.
        dtype: the file's ``uint16`` or ``uint32``.
        start: batches to skip (resume).
        steps: total batches (``start`` included); ``None``: endless.
        column, eos_id: for a ``datasets.Dataset`` (see :func:`dataset_tokens`).

    Returns:
        An :class:`~nnjax.data.iterators.LMBatchIterator` of ``(x, y)``, both ``(B, T)`` of
        the file's dtype (JAX's embedding lookups take them as they are).

    Raises:
        DataError: a bad file (see :func:`open_tokens`), or one of ``block_size``
            tokens or fewer.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "train.bin")
        >>> _ = nj.data.write_tokens(path, np.arange(1000) % 50)
        >>> x, y = next(nj.data.token_batches(path, 8, 4))
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        ((4, 8), True)
    """
    if is_dataset(path):
        ids = dataset_tokens(path, column, eos_id)
        return lm_batches(ids, block_size, batch_size, seed, start=start, steps=steps)
    tokens = open_tokens(path, dtype)
    if len(tokens) <= block_size:
        raise DataError(
            f"{os.fspath(path)}: expected more than block_size == {block_size} tokens, "
            f"got {len(tokens)}"
        )
    return lm_batches(tokens, block_size, batch_size, seed, start=start, steps=steps)


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``: a tokenizer that needs no files.

    The vocabulary is the 256 byte values; NUL (id 0), which text does not
    contain, serves as end-of-sequence and padding. It has the
    ``encode`` / ``decode`` / ``eos_token_id`` surface the data readers and
    ``generate`` use.

    Example:
        >>> tok = nj.data.ByteTokenizer()
        >>> tok.encode("hé"), tok.decode([104, 195, 169])
        ([104, 195, 169], 'hé')
    """

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text from byte ids (a NUL ends it; invalid UTF-8 becomes U+FFFD)."""
        data = bytes(int(i) for i in ids)
        return data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
