"""Instruction data: JSONL records, tokenized with the loss on the response only, packed.

A record is ``{"prompt": str, "response": str}`` or a chat
``{"messages": [{"role": str, "content": str}, ...]}``. :func:`tokenize` turns one
into token ids and a loss mask (True on the tokens the model learns to write: the
response, or every assistant turn, and the end-of-sequence token);
:func:`pack` lays several examples side by side in fixed-length rows, each with
its own segment id and positions restarting at 0, so a model that honours
``segment_ids`` (``nj.models.CausalLM``) never lets attention or the loss cross
from one example into the next. :func:`instruct_batches` does all of it and
returns a resumable :func:`nnjax.data.batches` iterator.

A packed batch is ``(inputs, targets)``: ``inputs`` a dict of int32 ``(B, T)``
arrays ``ids``, ``positions``, ``segment_ids`` (0 marks padding) and ``targets``
int32 ``(B, T)``, the next token where it counts and :data:`IGNORE_INDEX` where it
does not; train it with
``functools.partial(nj.losses.softmax_cross_entropy, ignore_index=nj.data.IGNORE_INDEX)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, DataError
from nnjax.data.iterators import BatchIterator, batches
from nnjax.data.records import read_records

__all__ = [
    "IGNORE_INDEX",
    "read_jsonl",
    "simple_chat_template",
    "tokenize",
    "pack",
    "load_instruct",
    "instruct_batches",
]

IGNORE_INDEX = -100  # torch's and transformers' label for "no loss here"

Record = dict[str, Any]
Pieces = list[tuple[str, bool]]  # (text, learn it) in order
Template = Callable[[list[dict[str, str]]], Pieces]


def _record_problem(record: Any) -> str | None:
    """What is wrong with one decoded record, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "expected 'messages' to be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not all(
                isinstance(m.get(k), str) for k in ("role", "content")
            ):
                return f"expected messages[{i}] to be {{'role': str, 'content': str}}, got {m!r}"
        if not any(m["role"] == "assistant" for m in messages):
            return "expected at least one message with role 'assistant' (the loss is on those)"
        return None
    if "prompt" in record or "response" in record:
        for k in ("prompt", "response"):
            if not isinstance(record.get(k), str):
                return f"expected {k!r} to be a string, got {record.get(k)!r}"
        return None
    return f"expected keys 'prompt' and 'response', or 'messages'; got keys {sorted(record)}"


def read_jsonl(path: Any) -> list[Record]:
    """Read and check instruction records from a JSONL file (blank lines are skipped) or any
    source :func:`nnjax.data.read_records` takes (Parquet, Arrow, a ``datasets.Dataset``).

    Args:
        path: a UTF-8 file with one JSON object per line (or another record source), each
            ``{"prompt": str, "response": str}`` or
            ``{"messages": [{"role": str, "content": str}, ...]}`` with at least
            one ``"assistant"`` message.

    Returns:
        The records, in file order.

    Raises:
        DataError: a line that is not JSON or not a valid record, as
            ``data.jsonl:7: expected 'response' to be a string, got None``.

    Example:
        >>> import json, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "data.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"prompt": "2+2=", "response": "4"}) + "\\n")
        >>> nj.data.read_jsonl(path)
        [{'prompt': '2+2=', 'response': '4'}]
    """
    return read_records(path, _record_problem)


def simple_chat_template(messages: list[dict[str, str]]) -> Pieces:
    """The documented fallback chat format: ``<|role|>`` headers, the loss on assistant text.

    Each message becomes ``"<|{role}|>\\n{content}\\n"``; for assistant messages the
    header is not learnt and ``"{content}\\n"`` is (then the end-of-sequence token,
    added by :func:`tokenize`).

    Returns:
        ``[(text, learn), ...]`` pieces in order.

    Example:
        >>> nj.data.simple_chat_template([{"role": "user", "content": "hi"},
        ...                               {"role": "assistant", "content": "hello"}])
        [('<|user|>\\nhi\\n', False), ('<|assistant|>\\n', False), ('hello\\n', True)]
    """
    pieces: Pieces = []
    for m in messages:
        if m["role"] == "assistant":
            pieces += [("<|assistant|>\n", False), (m["content"] + "\n", True)]
        else:
            pieces.append((f"<|{m['role']}|>\n{m['content']}\n", False))
    return pieces


def _tokenizer_template(tokenizer: Any) -> Template:
    """Pieces from a Hugging Face tokenizer's own chat template, rendered turn by turn.

    The text an assistant turn adds is ``render(messages[:i + 1])`` minus
    ``render(messages[:i], add_generation_prompt=True)`` (TRL's approach); a
    template whose renderings are not prefixes of each other is refused.
    """

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def template(messages):
        pieces: Pieces = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    "the tokenizer's chat template does not render each turn as a prefix of "
                    "the next (it rewrites earlier turns); pass template='simple' or a "
                    "callable to nj.data.tokenize"
                )
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        rest = render(messages, False)[len(done) :]
        return [*pieces, (rest, False)] if rest else pieces

    return template


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    if not callable(getattr(tokenizer, "encode", None)):
        raise DataError(
            f"expected a tokenizer with encode(str) -> list[int], got {type(tokenizer).__name__}"
        )
    if hasattr(tokenizer, "apply_chat_template"):
        # Hugging Face tokenizers add BOS to every encode() by default; the pieces are
        # parts of one text (a template writes its own BOS), so none is added.
        return lambda text: tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode


def _resolve_template(template: str | Template, tokenizer: Any) -> Template:
    if callable(template):
        return template
    has_own = bool(getattr(tokenizer, "chat_template", None)) and hasattr(
        tokenizer, "apply_chat_template"
    )
    if template == "auto":
        return _tokenizer_template(tokenizer) if has_own else simple_chat_template
    if template == "simple":
        return simple_chat_template
    if template == "tokenizer":
        if not has_own:
            raise DataError("template='tokenizer', but the tokenizer has no chat_template")
        return _tokenizer_template(tokenizer)
    raise DataError(
        f"expected template 'auto', 'simple', 'tokenizer' or a callable, got {template!r}"
    )


def _eos(tokenizer: Any, eos_id: int | str | None) -> int | None:
    if eos_id is None:
        return None
    if eos_id != "auto":
        return check_int(eos_id, "eos_id", 0)
    eos = getattr(tokenizer, "eos_token_id", None)
    # nj.models.hf.load_tokenizer gives a tuple when the model stops at any of several
    return eos[0] if isinstance(eos, tuple | list) else eos


def tokenize(
    record: Record,
    tokenizer: Any,
    *,
    template: str | Template = "auto",
    eos_id: int | str | None = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """One record as token ids and a loss mask (True on the tokens to learn).

    ``{"prompt", "response"}`` is the plain concatenation ``prompt + response`` then
    ``eos_id``, learning ``response`` and ``eos_id``. ``{"messages"}`` goes through
    ``template``: ``"auto"`` uses the tokenizer's own chat template when it has one
    (a Hugging Face tokenizer with ``chat_template``), else
    :func:`simple_chat_template`; each assistant turn is learnt, plus ``eos_id``
    at the end (when the template is the simple one). Each piece is encoded on
    its own and the ids concatenated, so the mask's boundaries are exact.

    Args:
        record: a checked record (see :func:`read_jsonl`).
        tokenizer: any object with ``encode(str) -> list[int]``.
        template: ``"auto"``, ``"simple"``, ``"tokenizer"``, or a callable
            ``messages -> [(text, learn), ...]``.
        eos_id: the id appended after the response; ``"auto"``: the tokenizer's
            ``eos_token_id`` if it has one (the first, if several); ``None``: none.

    Returns:
        ``(ids, loss_mask)``: int32 ``(n,)`` and bool ``(n,)``.

    Example:
        >>> tok = nj.data.ByteTokenizer()
        >>> ids, learn = nj.data.tokenize({"prompt": "ab", "response": "c"}, tok, eos_id=0)
        >>> ids.tolist(), learn.tolist()
        ([97, 98, 99, 0], [False, False, True, True])
    """
    problem = _record_problem(record)
    if problem is not None:
        raise DataError(problem)
    pieces, add_eos = _record_pieces(record, tokenizer, template)
    eos = _eos(tokenizer, eos_id) if add_eos else None
    return _encode_pieces(pieces, _encoder(tokenizer), eos)


def _record_pieces(record: Record, tokenizer: Any, template: str | Template) -> tuple[Pieces, bool]:
    """A checked record as ``[(text, learn), ...]``, and whether an end token follows."""
    if "messages" in record:
        fn = _resolve_template(template, tokenizer)
        return fn(record["messages"]), fn is simple_chat_template
    return [(record["prompt"], False), (record["response"], True)], True


def _encode_pieces(
    pieces: Pieces, encode: Callable[[str], list[int]], eos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each piece encoded on its own (so the mask's boundaries are exact), then ``eos``."""
    ids: list[int] = []
    learn: list[bool] = []
    for text, train in pieces:
        piece = list(encode(text)) if text else []
        ids += piece
        learn += [train] * len(piece)
    if eos is not None:
        ids.append(int(eos))
        learn.append(True)
    return np.asarray(ids, np.int32), np.asarray(learn, bool)


def _shifted(ids: np.ndarray, learn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs ``ids[:-1]`` and targets ``ids[1:]`` where learnt, else IGNORE_INDEX."""
    return ids[:-1], np.where(learn[1:], ids[1:], IGNORE_INDEX).astype(np.int32)


def _pieces(ids: np.ndarray, learn: np.ndarray, seq_len: int, overflow: str):
    """``(inputs, targets)`` of one example, cut to ``seq_len`` by ``overflow``."""
    x, t = _shifted(ids, learn)
    if len(x) <= seq_len:
        return [(x, t)] if len(x) else []
    if overflow == "truncate":
        return [(x[:seq_len], t[:seq_len])]
    return [(x[i : i + seq_len], t[i : i + seq_len]) for i in range(0, len(x), seq_len)]


def pack(
    examples: Iterable[tuple[np.ndarray, np.ndarray]],
    seq_len: int,
    *,
    overflow: str = "truncate",
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pack tokenized examples into rows of ``seq_len`` with segment ids and restarted positions.

    An example of ``n`` tokens gives ``n - 1`` positions: inputs ``ids[:-1]`` and
    targets ``ids[1:]`` where ``loss_mask[1:]`` holds, else :data:`IGNORE_INDEX`.
    Examples go into rows in order; one that does not fit in what is left of a row
    starts the next (so none is cut by packing). Padding has segment id 0,
    ``pad_id`` inputs and ignored targets.

    Args:
        examples: ``(ids, loss_mask)`` pairs as :func:`tokenize` gives.
        seq_len: row length ``T``.
        overflow: an example longer than ``T + 1`` tokens is ``"truncate"``-d to its
            first ``T`` positions, or ``"split"`` into pieces of ``T`` positions, each
            its own segment with positions from 0 (no attention across pieces).
        pad_id: the input id of padding positions.

    Returns:
        ``(inputs, targets)``: ``inputs`` is ``{"ids", "positions", "segment_ids"}`` and
        ``targets`` ``(N, T)``, all int32 ``(N, T)``; segment ids count ``1, 2, ...``
        within each row.

    Raises:
        ArgumentError: ``seq_len`` or ``pad_id`` not an int (``>= 1``, ``>= 0``), an
            unknown ``overflow``.
        DataError: no example with at least two tokens, or nothing to learn (every
            response truncated away).

    Example:
        >>> ex = [(np.array([5, 6, 7]), np.array([0, 1, 1], bool)),
        ...       (np.array([8, 9]), np.array([0, 1], bool))]
        >>> inputs, targets = nj.data.pack(ex, 4)
        >>> inputs["ids"].tolist(), inputs["segment_ids"].tolist(), targets.tolist()
        ([[5, 6, 8, 0]], [[1, 1, 2, 0]], [[6, 7, 9, -100]])
        >>> inputs["positions"].tolist()
        [[0, 1, 0, 0]]
    """
    seq_len = check_int(seq_len, "seq_len")
    pad_id = check_int(pad_id, "pad_id", 0)
    if overflow not in ("truncate", "split"):
        raise ArgumentError(f"overflow: expected 'truncate' or 'split', got {overflow!r}")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a first row
    for ids, learn in examples:
        ids, learn = np.asarray(ids), np.asarray(learn, bool)
        if ids.shape != learn.shape or ids.ndim != 1:
            raise DataError(
                f"expected ids and loss_mask of one shape (n,), got {ids.shape} and {learn.shape}"
            )
        for x, t in _pieces(ids, learn, seq_len, overflow):
            if used + len(x) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append((x, t))
            used += len(x)
    if not rows:
        raise DataError("expected at least one example of two or more tokens, got none")
    if not any((t != IGNORE_INDEX).any() for row in rows for _, t in row):
        raise DataError(
            f"nothing to learn: no target is left in any of the {sum(map(len, rows))} "
            f"example(s) (every response was truncated away at seq_len == {seq_len}, or "
            "none is marked to learn); raise seq_len or pass overflow='split'"
        )
    shape = (len(rows), seq_len)
    out = {
        "ids": np.full(shape, pad_id, np.int32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }
    targets = np.full(shape, IGNORE_INDEX, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for seg, (x, t) in enumerate(row, 1):
            span = slice(at, at + len(x))
            out["ids"][r, span] = x
            out["positions"][r, span] = np.arange(len(x))
            out["segment_ids"][r, span] = seg
            targets[r, span] = t
            at += len(x)
    return out, targets


def load_instruct(
    data: Any,
    tokenizer: Any,
    seq_len: int,
    *,
    template: str | Template = "auto",
    overflow: str = "truncate",
    eos_id: int | str | None = "auto",
    pad_id: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Records read, tokenized and packed: see :func:`pack`.

    ``data`` is any source :func:`nnjax.data.read_records` takes: a JSONL (JSON, Parquet,
    Arrow) file, a ``datasets`` folder, a ``datasets.Dataset``, or a list of records.

    ``pad_id`` defaults to the tokenizer's ``pad_token_id``, else 0 (padding is
    never attended to nor learnt, so its id only has to be a valid one).

    Example:
        >>> records = [{"prompt": "Q: hi\\nA:", "response": " hello"}] * 3
        >>> inputs, targets = nj.data.load_instruct(records, nj.data.ByteTokenizer(), 32)
        >>> inputs["ids"].shape, int((targets != nj.data.IGNORE_INDEX).sum())
        ((2, 32), 21)
    """
    records = read_records(data, _record_problem)
    pad = (getattr(tokenizer, "pad_token_id", None) or 0) if pad_id is None else pad_id
    examples = (tokenize(r, tokenizer, template=template, eos_id=eos_id) for r in records)
    return pack(examples, seq_len, overflow=overflow, pad_id=pad)


def instruct_batches(
    data: Any,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    *,
    template: str | Template = "auto",
    overflow: str = "truncate",
    eos_id: int | str | None = "auto",
    pad_id: int | None = None,
    seed: int = 0,
    epochs: int | None = 1,
    start: int = 0,
) -> BatchIterator:
    """Packed instruction rows as a resumable :func:`nnjax.data.batches` iterator.

    Packing is deterministic, so rebuilding from the same file and calling
    ``.at(position)`` (or ``start=``) resumes at exactly the same batch; ``nj.fit``
    records and restores the position in its checkpoints.

    Args:
        data, tokenizer, seq_len, template, overflow, eos_id, pad_id: as
            :func:`load_instruct`.
        batch_size: rows per batch (the last partial batch of an epoch is dropped,
            unless the data has fewer rows than one batch: then one smaller batch).
        seed, epochs, start: as :func:`nnjax.data.batches`.

    Returns:
        A :class:`~nnjax.data.iterators.BatchIterator` of ``(inputs, targets)``.

    Example:
        >>> records = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(20)]
        >>> it = nj.data.instruct_batches(records, nj.data.ByteTokenizer(), 16, 2)
        >>> inputs, targets = next(it)
        >>> sorted(inputs), targets.shape, it.position
        (['ids', 'positions', 'segment_ids'], (2, 16), 1)
    """
    packed = load_instruct(
        data,
        tokenizer,
        seq_len,
        template=template,
        overflow=overflow,
        eos_id=eos_id,
        pad_id=pad_id,
    )
    rows = len(packed[1])
    return batches(
        packed,
        min(batch_size, rows),
        shuffle=True,
        seed=seed,
        drop_remainder=True,
        epochs=epochs,
        start=start,
    )
