"""A word vocabulary: strings to a padded batch of ids with lengths, fitted on training text.

As Keras' ``TextVectorization`` (``standardize="lower_and_strip_punctuation"``,
``split="whitespace"``, ``adapt``), in two pure steps::

    vocab = nj.data.fit_vocabulary(train_texts, max_tokens=20000)
    x = vocab.encode(texts, max_length=64)   # {"inputs": (N, 64) int32, "lengths": (N,) int32}

Id 0 is padding (``"<pad>"``), id 1 an unknown word (``"<unk>"``); the words follow,
most frequent first (ties in alphabetical order), so the ids do not depend on the
order of the texts. ``x`` is the padded batch ``Embedding`` and the recurrent layers
read (:mod:`nnjax.core.padded`); ``vocab.size`` is the ``Embedding``'s
``num_embeddings``. A vocabulary saves as JSON (:meth:`Vocabulary.save`, or
:meth:`Vocabulary.to_json` into a checkpoint's ``extra``) beside the model it was
fitted for.

Example:
    >>> vocab = nj.data.fit_vocabulary(["a good film", "a bad film", "good"])
    >>> vocab.tokens
    ('<pad>', '<unk>', 'a', 'film', 'good', 'bad')
    >>> x = vocab.encode(["Good film!", "an awful film"])
    >>> x["inputs"].tolist(), x["lengths"].tolist()
    ([[4, 3, 0], [1, 1, 3]], [2, 3])
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, DataError

__all__ = ["Vocabulary", "fit_vocabulary", "load_vocabulary"]

PAD, UNK = "<pad>", "<unk>"
WORDS = r"[^\W_]+(?:'[^\W_]+)*"
"""The default word pattern: runs of letters and digits, with inner apostrophes (don't)."""


class Vocabulary(NamedTuple):
    """Words and their ids; build one with :func:`fit_vocabulary` or :func:`load_vocabulary`.

    Attributes:
        tokens: ``tokens[i]`` is the word of id ``i``; ``tokens[:2] == ("<pad>", "<unk>")``.
        lowercase: texts are lower-cased before they are split.
        pattern: the regular expression a word matches (``re.findall``).
        index: ``{word: id}``, the inverse of ``tokens``.
    """

    tokens: tuple[str, ...]
    lowercase: bool
    pattern: str
    index: Mapping[str, int]

    @property
    def size(self) -> int:
        """How many ids there are, padding and unknown included: ``Embedding``'s vocabulary size."""
        return len(self.tokens)

    def words(self, text: str) -> list[str]:
        """The words of ``text`` as this vocabulary splits them."""
        return re.findall(self.pattern, text.lower() if self.lowercase else text)

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        """A padded batch of ``texts``: ``{"inputs": ids (N, T) int32, "lengths": (N,) int32}``.

        Args:
            texts: strings.
            max_length: ``T``; longer texts keep their first ``T`` words. Default: the
                most words in ``texts`` (at least 1).

        Returns:
            Right-padded ids (0 after each text's end; 1 for a word not in the
            vocabulary) and each text's number of words (0 for a text without words).

        Raises:
            DataError: ``texts`` is a single string, or holds something that is not one.
            ArgumentError: ``max_length`` is not an int >= 1.
        """
        if isinstance(texts, str):
            raise DataError("texts: expected a list of strings, got one string; write [text]")
        seqs = [
            [self.index.get(w, 1) for w in self.words(_text(t, i))] for i, t in enumerate(texts)
        ]
        if max_length is None:
            max_length = max([1, *map(len, seqs)])
        t = check_int(max_length, "max_length")
        ids = np.zeros((len(seqs), t), np.int32)
        lengths = np.zeros(len(seqs), np.int32)
        for i, seq in enumerate(seqs):
            seq = seq[:t]
            ids[i, : len(seq)] = seq
            lengths[i] = len(seq)
        return {"inputs": ids, "lengths": lengths}

    def decode(self, ids: Iterable[int], length: int | None = None) -> str:
        """The words of ``ids[:length]`` joined by spaces (padding left out)."""
        ids = list(ids)[:length]
        return " ".join(self.tokens[int(i)] for i in ids if int(i) != 0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (for a checkpoint's ``extra``); :func:`load_vocabulary` reads it back."""
        return {"tokens": list(self.tokens), "lowercase": self.lowercase, "pattern": self.pattern}

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary to ``path`` as JSON, atomically (a file there is replaced whole)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-vocab-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _text(t: Any, i: int) -> str:
    if not isinstance(t, str):
        raise DataError(f"texts[{i}]: expected a string, got {type(t).__name__}")
    return t


def _make(tokens: Sequence[str], lowercase: bool, pattern: str) -> Vocabulary:
    tokens = tuple(tokens)
    return Vocabulary(tokens, lowercase, pattern, {w: i for i, w in enumerate(tokens)})


def fit_vocabulary(
    texts: Iterable[str],
    *,
    max_tokens: int | None = None,
    min_count: int = 1,
    lowercase: bool = True,
    pattern: str = WORDS,
) -> Vocabulary:
    """The vocabulary of ``texts`` (the training split: words of the test split stay unknown).

    Args:
        texts: strings.
        max_tokens: the most ids, padding and unknown included (Keras' ``max_tokens``);
            the most frequent words are kept. Default: every word.
        min_count: words seen fewer times are left out (unknown).
        lowercase: lower-case texts before splitting them.
        pattern: a regular expression a word matches; the default keeps letters and
            digits (any script) and inner apostrophes, and drops punctuation.

    Returns:
        A :class:`Vocabulary`: ``<pad>``, ``<unk>``, then words by falling count.

    Raises:
        DataError: ``texts`` is a single string, or holds something that is not one.
        ArgumentError: ``max_tokens`` below 2, ``min_count`` below 1, a bad ``pattern``.
    """
    if isinstance(texts, str):
        raise DataError("texts: expected a list of strings, got one string; write [text]")
    min_count = check_int(min_count, "min_count")
    if max_tokens is not None:
        max_tokens = check_int(max_tokens, "max_tokens", minimum=2)
    try:
        re.compile(pattern)
    except re.error as e:
        raise ArgumentError(f"pattern: not a regular expression ({e}): {pattern!r}") from None
    probe = _make((PAD, UNK), lowercase, pattern)
    counts = collections.Counter(w for i, t in enumerate(texts) for w in probe.words(_text(t, i)))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    words = [w for w in words if w not in (PAD, UNK)]
    if max_tokens is not None:
        words = words[: max_tokens - 2]
    return _make((PAD, UNK, *words), lowercase, pattern)


def load_vocabulary(source: str | os.PathLike | Mapping[str, Any]) -> Vocabulary:
    """A vocabulary from a file :meth:`Vocabulary.save` wrote, or a dict ``to_json`` made.

    Raises:
        DataError: the file is missing or is not a saved vocabulary (names the file and
            what is wrong).
    """
    where = "vocabulary"
    if isinstance(source, Mapping):
        blob: Any = source
    else:
        where = os.fspath(source)
        try:
            with open(where, encoding="utf-8") as f:
                blob = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: cannot read a vocabulary ({e})") from None
    ok = isinstance(blob, Mapping) and isinstance(blob.get("tokens"), list)
    tokens = blob["tokens"] if ok else []
    if not ok or tokens[:2] != [PAD, UNK] or not all(isinstance(w, str) for w in tokens):
        raise DataError(
            f'{where}: expected {{"tokens": ["<pad>", "<unk>", ...], "lowercase", "pattern"}} '
            "as Vocabulary.save writes it"
        )
    return _make(tokens, bool(blob.get("lowercase", True)), str(blob.get("pattern", WORDS)))
