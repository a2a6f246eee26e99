"""Dataset readers: MNIST-style IDX files, text files, scikit-learn's digits.

Readers return NumPy arrays on the host; feed them to :func:`nnjax.data.batches`.
:func:`load_idx` / :func:`load_mnist` (MNIST, Fashion-MNIST), :func:`load_text`
(nanoGPT's ``shakespeare_char`` convention), :func:`load_digits` (scikit-learn's
bundled 8x8 digits).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import numpy as np

from nnjax.core.errors import ArgumentError, DataError

__all__ = ["load_idx", "load_mnist", "TextData", "load_text", "load_digits"]

PathLike = str | os.PathLike


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
        Three blank images written as IDX files stand in for the real download:

        >>> import os
        >>> def idx(a): return bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">i4").tobytes() + a.tobytes()
        >>> os.makedirs("mnist")
        >>> _ = open("mnist/t10k-images-idx3-ubyte", "wb").write(idx(np.zeros((3, 28, 28), np.uint8)))
        >>> _ = open("mnist/t10k-labels-idx1-ubyte", "wb").write(idx(np.arange(3, dtype=np.uint8)))
        >>> x, y = nj.data.load_mnist("mnist", "test")
        >>> x.shape, y.shape
        ((3, 28, 28), (3,))
    """
    if split not in _MNIST_FILES:
        raise ArgumentError(f"split: expected 'train' or 'test', got {split!r}")
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


def load_text(
    path: PathLike, level: str = "char", val_fraction: float = 0.1, *, encoding: str = "utf-8"
) -> TextData:
    """A text file as token ids, split into train and validation at ``1 - val_fraction``.

    ``level="char"`` follows nanoGPT's ``shakespeare_char``: the vocabulary is the
    sorted set of the text's characters. ``level="byte"``: the 256 byte values of
    the UTF-8 encoding.

    Args:
        path: a text file.
        level: ``"char"`` or ``"byte"`` (the file's raw bytes; ``encoding`` unused).
        val_fraction: the tail fraction held out for validation.
        encoding: the file's text encoding for ``level="char"`` (``"latin-1"``, ...).

    Returns:
        A :class:`TextData`; ``decode(encode(s)) == s`` for any text of the vocabulary.

    Example:
        >>> _ = open("tiny.txt", "w").write("hello world\\n" * 10)
        >>> text = nj.data.load_text("tiny.txt")
        >>> len(text.vocab), text.train.shape, text.val.shape
        (9, (108,), (12,))
        >>> text.decode(text.encode("hello"))
        'hello'

    Raises:
        DataError: a file that is not valid in ``encoding`` (the message names the
            file, the byte offset and the ``encoding=`` option).
    """
    if not 0 <= val_fraction < 1:
        raise ArgumentError(f"val_fraction: expected 0 <= val_fraction < 1, got {val_fraction}")
    if level not in ("char", "byte"):  # before reading a possibly large file
        raise ArgumentError(f"level: expected 'char' or 'byte', got {level!r}")
    if level == "char":
        text = _read_text(path, encoding)
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
    else:  # "byte", checked above
        with open(path, "rb") as f:
            raw = f.read()
        vocab = [bytes([i]) for i in range(256)]

        def encode(s: str) -> np.ndarray:
            return np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32)

        def decode(ids: Iterable[int]) -> str:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

        data = np.frombuffer(raw, np.uint8).astype(np.int32)
    n = int((1 - val_fraction) * len(data))
    return TextData(data[:n], data[n:], vocab, encode, decode)


def _read_text(path: PathLike, encoding: str) -> str:
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{os.fspath(path)}: not valid {encoding} text (byte {e.start}: {e.reason}); pass "
            "the file's encoding, load_text(..., encoding='latin-1'), or level='byte'"
        ) from None


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
    # scikit-learn ships no stubs: pyright infers Bunch | tuple (the return_X_y form) from its body
    digits = cast(Any, sk_load_digits())
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return x, digits.target.astype(np.int32)
