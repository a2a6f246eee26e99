"""Preference data: pairs of responses to one prompt, the chosen one and the rejected one.

A record is ``{"prompt": str, "chosen": str, "rejected": str}``, or the chat forms
``{"chosen": [messages], "rejected": [messages]}`` (the two conversations share their
first turns, the prompt) and ``{"prompt": [messages], "chosen": [messages],
"rejected": [messages]}``. Each side is tokenized as :func:`nnjax.data.tokenize` does
(the tokenizer's chat template for chats, the same pieces and end token), with the
loss mask on the response tokens only: the turns after the shared prompt.

An example is one pair, kept together on an axis of its own: a preference batch is
``(inputs, targets)`` with ``inputs`` a dict of int32 ``(B, 2, T)`` arrays ``ids``,
``positions``, ``segment_ids`` (1 on tokens, 0 on padding) and ``targets`` int32
``(B, 2, T)``, the next token on response positions and :data:`IGNORE_INDEX` elsewhere;
``[:, 0]`` is the chosen side, ``[:, 1]`` the rejected one. ``inputs["response_index"]``
int32 ``(B, 2, R)`` lists each side's response positions (where ``targets`` is not
:data:`IGNORE_INDEX`), ``-1`` after them, ``R`` the most any side of the data has: the
preference trainer computes the vocabulary head only there, not over the prompt. A batch iterator (or
gradient accumulation) splits axis 0 only, so a pair is never split.

Truncation, to ``T`` positions (``T + 1`` tokens): first the prompt, to its last
``max_prompt_length`` tokens (when given); then each response, keeping its start. A
pair that would keep no response token on a side is left out and reported (a
warning naming the records, or a ``DataError`` with ``on_empty="error"``).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import DataError
from nnjax.data.instruct import (
    IGNORE_INDEX,
    Template,
    _encode_pieces,
    _encoder,
    _eos,
    _record_pieces,
    _shifted,
)
from nnjax.data.iterators import BatchIterator, batches
from nnjax.data.records import iter_records

__all__ = [
    "PreferenceData",
    "tokenize_pair",
    "load_preference",
    "preference_batches",
    "response_index",
]

Record = dict[str, Any]


def _messages_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected {name!r} to be a non-empty list of messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not all(
            isinstance(m.get(k), str) for k in ("role", "content")
        ):
            return f"expected {name}[{i}] to be {{'role': str, 'content': str}}, got {m!r}"
    return None


def _record_problem(record: Any) -> str | None:
    """What is wrong with one preference record, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "chosen" not in record or "rejected" not in record:
        return f"expected keys 'chosen' and 'rejected' (and 'prompt'); got keys {sorted(record)}"
    if all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected")):
        return None
    if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
        return (
            "expected 'prompt', 'chosen' and 'rejected' all strings, or 'chosen' and "
            f"'rejected' lists of messages; got prompt {record.get('prompt')!r}"
        )
    for name in ("prompt", "chosen", "rejected"):
        if name in record:
            problem = _messages_problem(record[name], name)
            if problem:
                return problem
    return None


def _conversations(record: Record) -> tuple[list, list, int]:
    """The two full conversations and how many first messages they share (the prompt)."""
    if isinstance(record.get("prompt"), list):
        prompt = record["prompt"]
        return prompt + record["chosen"], prompt + record["rejected"], len(prompt)
    chosen, rejected = record["chosen"], record["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen, rejected, shared


def _chat_pieces(messages, shared, tokenizer, template):
    """Pieces of one conversation, learning only the assistant turns after the shared ones.

    The built-in templates give one learnt piece per assistant message, in order; a
    callable template must do the same.
    """
    pieces, add_eos = _record_pieces({"messages": messages}, tokenizer, template)
    turns = iter(i for i, m in enumerate(messages) if m["role"] == "assistant")
    out = []
    for text, learn in pieces:
        if learn:
            learn = next(turns, len(messages)) >= shared
        out.append((text, learn))
    return out, add_eos


def _prompt_length(learn: np.ndarray) -> int:
    first = np.flatnonzero(learn)
    return int(first[0]) if len(first) else len(learn)


def tokenize_pair(
    record: Record,
    tokenizer: Any,
    *,
    template: str | Template = "auto",
    eos_id: int | str | None = "auto",
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One preference record as ``((ids, learn) chosen, (ids, learn) rejected)``.

    Both sides start with the same prompt tokens (not learnt); the response tokens
    (and the end token, as :func:`nnjax.data.tokenize` adds it) are learnt.

    Args:
        record, tokenizer, template, eos_id: as :func:`nnjax.data.tokenize`.

    Returns:
        Two ``(ids int32 (n,), learn bool (n,))`` pairs.

    Raises:
        DataError: a malformed record, no shared prompt, or a side with no response.

    Example:
        >>> tok = nj.data.ByteTokenizer()
        >>> (c, lc), (r, lr) = nj.data.tokenize_pair(
        ...     {"prompt": "Q", "chosen": "ab", "rejected": "c"}, tok, eos_id=0)
        >>> c.tolist(), lc.tolist(), r.tolist(), lr.tolist()
        ([81, 97, 98, 0], [False, True, True, True], [81, 99, 0], [False, True, True])
    """
    problem = _record_problem(record)
    if problem is not None:
        raise DataError(problem)
    encode = _encoder(tokenizer)
    if isinstance(record["chosen"], str):
        sides = [
            _record_pieces({"prompt": record["prompt"], "response": record[k]}, tokenizer, template)
            for k in ("chosen", "rejected")
        ]
    else:
        chosen, rejected, shared = _conversations(record)
        if shared == 0:
            raise DataError(
                "expected 'chosen' and 'rejected' to share their first turns (the prompt)"
            )
        sides = [_chat_pieces(m, shared, tokenizer, template) for m in (chosen, rejected)]
    out = []
    for pieces, add_eos in sides:
        ids, learn = _encode_pieces(pieces, encode, _eos(tokenizer, eos_id) if add_eos else None)
        if not learn.any():
            raise DataError("expected a response after the shared prompt turns, got none")
        out.append((ids, learn))
    (c, lc), (r, lr) = out
    pc, pr = _prompt_length(lc), _prompt_length(lr)
    if pc != pr or not np.array_equal(c[:pc], r[:pr]):
        raise DataError("the chosen and rejected sides tokenize to different prompts")
    return out[0], out[1]


def _truncate(ids, learn, seq_len: int, max_prompt: int | None):
    """The side cut to ``seq_len + 1`` tokens: the prompt's start first, then the end."""
    p = _prompt_length(learn)
    if max_prompt is not None and p > max_prompt:
        ids, learn = ids[p - max_prompt :], learn[p - max_prompt :]
    return ids[: seq_len + 1], learn[: seq_len + 1]


class PreferenceData(NamedTuple):
    """Tokenized, truncated preference pairs.

    Attributes:
        inputs: ``{"ids", "positions", "segment_ids"}``, int32 ``(N, 2, T)``, and
            ``"response_index"`` int32 ``(N, 2, R)`` (the module doc).
        targets: int32 ``(N, 2, T)``.
        dropped: where each left-out pair came from (``data.jsonl:7``): no response
            token fit on a side.
    """

    inputs: dict[str, np.ndarray]
    targets: np.ndarray
    dropped: list[str]


def load_preference(
    data: Any,
    tokenizer: Any,
    seq_len: int,
    *,
    max_prompt_length: int | None = None,
    template: str | Template = "auto",
    eos_id: int | str | None = "auto",
    pad_id: int | None = None,
    on_empty: str = "warn",
) -> PreferenceData:
    """Preference records read, tokenized with :func:`tokenize_pair` and laid out ``(N, 2, T)``.

    Args:
        data: any source :func:`nnjax.data.read_records` takes (JSONL, JSON, Parquet,
            Arrow, a ``datasets.Dataset``, a list of dicts).
        tokenizer, template, eos_id: as :func:`nnjax.data.tokenize`.
        seq_len: ``T``, positions per side (``T + 1`` tokens).
        max_prompt_length: keep at most this many prompt tokens (the last ones),
            before the responses are cut; ``None``: prompts are cut only by ``T``.
        pad_id: the input id of padding; default the tokenizer's ``pad_token_id``, else 0.
        on_empty: a pair with no response token left on a side is left out with a
            warning (``"warn"``) or raises (``"error"``).

    Returns:
        A :class:`PreferenceData`.

    Raises:
        DataError: a malformed record (naming where), no pair kept, ``on_empty="error"``
            and a pair with no room for its response.

    Example:
        >>> recs = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"}] * 3
        >>> d = nj.data.load_preference(recs, nj.data.ByteTokenizer(), 8, eos_id=0)
        >>> d.inputs["ids"].shape, (d.targets[0] != nj.data.IGNORE_INDEX).sum(axis=-1).tolist()
        ((3, 2, 8), [5, 4])
    """
    seq_len = check_int(seq_len, "seq_len")
    if max_prompt_length is not None:
        max_prompt_length = check_int(max_prompt_length, "max_prompt_length", minimum=0)
    if on_empty not in ("warn", "error"):
        raise DataError(f"on_empty: expected 'warn' or 'error', got {on_empty!r}")
    pad = (getattr(tokenizer, "pad_token_id", None) or 0) if pad_id is None else pad_id
    pairs, dropped = [], []
    for where, record in iter_records(data):
        try:
            sides = tokenize_pair(record, tokenizer, template=template, eos_id=eos_id)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        cut = [_shifted(*_truncate(ids, learn, seq_len, max_prompt_length)) for ids, learn in sides]
        if any(not (t != IGNORE_INDEX).any() for _, t in cut):
            if on_empty == "error":
                raise DataError(
                    f"{where}: no response token fits in seq_len={seq_len} after the prompt; "
                    "raise seq_len or set max_prompt_length"
                )
            dropped.append(where)
            continue
        pairs.append(cut)
    if dropped:
        warnings.warn(
            f"{len(dropped)} preference pair(s) left out, no response token fits in "
            f"seq_len={seq_len}: {', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}",
            UserWarning,
            stacklevel=2,
        )
    if not pairs:
        raise DataError(
            f"expected at least one preference pair that fits seq_len={seq_len}, got none"
        )
    shape = (len(pairs), 2, seq_len)
    inputs = {
        "ids": np.full(shape, pad, np.int32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }
    targets = np.full(shape, IGNORE_INDEX, np.int32)
    for n, pair in enumerate(pairs):
        for side, (x, t) in enumerate(pair):
            inputs["ids"][n, side, : len(x)] = x
            inputs["positions"][n, side, : len(x)] = np.arange(len(x))
            inputs["segment_ids"][n, side, : len(x)] = 1
            targets[n, side, : len(x)] = t
    inputs["response_index"] = response_index(targets)
    return PreferenceData(inputs, targets, dropped)


def response_index(targets: np.ndarray) -> np.ndarray:
    """The positions of each row's scored tokens: int32 ``(..., R)``, ascending, ``-1`` after.

    ``targets`` ``(..., T)``; a position is scored where its target is not
    :data:`IGNORE_INDEX`; ``R`` is the most scored positions of any row (at least 1).

    Example:
        >>> t = np.array([[-100, 5, 6, -100], [-100, -100, 7, -100]])
        >>> nj.data.response_index(t).tolist()
        [[1, 2], [2, -1]]
    """
    scored = np.asarray(targets) != IGNORE_INDEX
    width = max(int(scored.sum(axis=-1).max(initial=0)), 1)
    # a stable sort puts each row's scored positions first, in order
    order = np.argsort(~scored, axis=-1, kind="stable")[..., :width]
    keep = np.take_along_axis(scored, order, axis=-1)
    return np.where(keep, order, -1).astype(np.int32)


def preference_batches(
    data: Any,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    *,
    max_prompt_length: int | None = None,
    template: str | Template = "auto",
    eos_id: int | str | None = "auto",
    pad_id: int | None = None,
    on_empty: str = "warn",
    seed: int = 0,
    epochs: int | None = 1,
    start: int = 0,
) -> BatchIterator:
    """Preference pairs as a seeded, resumable :func:`nnjax.data.batches` iterator.

    Batches are ``(inputs, targets)`` of ``(batch_size, 2, T)`` arrays (see the module
    doc); rebuilding from the same data and calling ``.at(position)`` (or ``start=``)
    resumes at exactly the same batch, as ``nj.fit`` does from a checkpoint.

    Args:
        data, tokenizer, seq_len, max_prompt_length, template, eos_id, pad_id, on_empty:
            as :func:`load_preference`.
        batch_size: pairs per batch (the last partial batch of an epoch is dropped,
            unless there are fewer pairs than one batch: then one smaller batch).
        seed, epochs, start: as :func:`nnjax.data.batches`.

    Example:
        >>> recs = [{"prompt": f"{i}?", "chosen": "y", "rejected": "n"} for i in range(6)]
        >>> it = nj.data.preference_batches(recs, nj.data.ByteTokenizer(), 8, 4, eos_id=0)
        >>> inputs, targets = next(it)
        >>> inputs["ids"].shape, targets.shape
        ((4, 2, 8), (4, 2, 8))
    """
    d = load_preference(
        data,
        tokenizer,
        seq_len,
        max_prompt_length=max_prompt_length,
        template=template,
        eos_id=eos_id,
        pad_id=pad_id,
        on_empty=on_empty,
    )
    return batches(
        (d.inputs, d.targets),
        min(batch_size, len(d.targets)),
        shuffle=True,
        seed=seed,
        drop_remainder=True,
        epochs=epochs,
        start=start,
    )
