"""A model folder's tokenizer, through the ``tokenizers`` library (``pip install nnjax[llm]``).

:func:`load_tokenizer` reads ``tokenizer.json`` (the fast-tokenizer file every
``save_pretrained`` folder of these families holds) and the special-token ids the
folder names. Chat templates render with ``jinja2`` as transformers renders them
(sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``); without
``jinja2`` or without a template, the simple template :data:`SIMPLE_CHAT` is used.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from nnjax.core.errors import ArgumentError, CheckpointError

__all__ = ["Tokenizer", "load_tokenizer", "pad_ids", "SIMPLE_CHAT"]

SIMPLE_CHAT = "<|{role}|>\n{content}\n"
"""The chat format without a template (or without jinja2): each message as
``<|role|>\\ncontent\\n``; ``add_generation_prompt`` appends ``<|assistant|>\\n``."""


class Tokenizer(NamedTuple):
    """Text <-> token ids, and the special ids (a NamedTuple of functions and values).

    Attributes:
        encode: ``encode(text, add_special_tokens=True) -> list[int]``.
        decode: ``decode(ids, skip_special_tokens=True) -> str``.
        encode_batch: ``encode_batch(texts, add_special_tokens=True) -> list[list[int]]``.
        decode_batch: ``decode_batch(rows, skip_special_tokens=True) -> list[str]``.
        apply_chat_template: ``apply_chat_template(messages, add_generation_prompt=False,
            tokenize=True)`` -> ids (or the text with ``tokenize=False``); messages are
            ``{"role", "content"}`` dicts.
        bos_token_id, pad_token_id: ids or ``None``.
        eos_token_id: an id, a tuple of ids (any ends a sequence), or ``None``.
        vocab_size: the number of ids (added tokens included).
        chat_template: the jinja template, or ``None`` (:data:`SIMPLE_CHAT` is used).
        backend: the ``tokenizers.Tokenizer``.
        pad: ``pad(rows, side="right", max_length=None)`` -> ``{"input_ids",
            "attention_mask", "lengths"}``: ragged id lists as one padded batch
            (:func:`pad_ids` with this tokenizer's pad id); ``side="left"`` for
            :func:`~nnjax.models.generate`.
        encode_padded: ``encode_padded(texts, side="right", max_length=None,
            add_special_tokens=True)``: ``pad(encode_batch(texts))``.
        save: ``save(folder) -> list[str]``: write ``tokenizer.json``,
            ``tokenizer_config.json`` (special tokens, chat template) and
            ``chat_template.jinja``, each file replaced atomically, so that
            ``transformers.AutoTokenizer`` and :func:`load_tokenizer` read the folder.
        special_tokens: ``{"bos_token": "<s>", ...}``: the special tokens' strings.
    """

    encode: Callable[..., list[int]]
    decode: Callable[..., str]
    encode_batch: Callable[..., list[list[int]]]
    decode_batch: Callable[..., list[str]]
    apply_chat_template: Callable[..., Any]
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    pad_token_id: int | None
    vocab_size: int
    chat_template: str | None
    backend: Any
    pad: Callable[..., dict[str, np.ndarray]]
    encode_padded: Callable[..., dict[str, np.ndarray]]
    save: Callable[[str | os.PathLike], list[str]]
    special_tokens: Mapping[str, str | None]


def pad_ids(
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    side: str = "right",
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Ragged rows of ids as one padded batch, as transformers' tokenizers pad.

    Args:
        rows: ``B`` lists of ids (``encode_batch``'s output).
        pad_token_id: the filler id (the attention mask, not the id, tells padding apart).
        side: ``"right"`` (training, classification) or ``"left"`` (prompts for
            :func:`~nnjax.models.generate`: every row ends at the last column).
        max_length: ``T``; default the longest row. A longer row is an error (cut it
            yourself: which end to keep depends on the task).

    Returns:
        ``{"input_ids": int32 (B, T), "attention_mask": int32 (B, T) (1 = token),
        "lengths": int32 (B,)}``.

    Raises:
        ArgumentError: an unknown ``side``, an empty ``rows``, a row longer than ``max_length``.

    Example:
        >>> batch = nj.models.hf.pad_ids([[5, 6, 7], [8]], 0, side="left")
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if side not in ("left", "right"):
        raise ArgumentError(f"side: expected 'left' or 'right', got {side!r}")
    lengths = np.array([len(r) for r in rows], np.int32)
    if lengths.size == 0:
        raise ArgumentError("rows: expected at least one row of ids, got none")
    t = int(lengths.max()) if max_length is None else int(max_length)
    if lengths.max() > t:
        raise ArgumentError(
            f"max_length: row {int(lengths.argmax())} has {int(lengths.max())} ids, more than "
            f"max_length == {t}; cut the rows first (keep their start or their end)"
        )
    ids = np.full((len(rows), t), pad_token_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for b, row in enumerate(rows):
        n = len(row)
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[b, cols] = np.asarray(row, np.int32)
        mask[b, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "lengths": lengths}


def _write_atomic(path: str, text: str) -> None:
    """``text`` at ``path``, replacing what was there in one rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-tok-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_files(folder: str, backend: Any, tokens: Mapping[str, str | None], template: str | None):
    """The files a model folder's tokenizer is: transformers' ``PreTrainedTokenizerFast`` layout."""
    os.makedirs(folder, exist_ok=True)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({k: v for k, v in tokens.items() if v is not None})
    files = {"tokenizer.json": backend.to_str(), "tokenizer_config.json": ""}
    if template is not None:
        config["chat_template"] = template  # transformers before 4.43 reads it here
        files["chat_template.jinja"] = template
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
    for name, text in files.items():
        _write_atomic(os.path.join(folder, name), text)
    return sorted(files)


def _json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token(value: Any) -> str | None:
    """A tokenizer_config token entry: ``"</s>"`` or ``{"content": "</s>", ...}``."""
    return value.get("content") if isinstance(value, Mapping) else value


def _special_ids(folder: str, backend: Any, tok_config: Mapping[str, Any]) -> dict[str, Any]:
    """generation_config.json, then config.json, then tokenizer_config.json's token strings."""
    generation = _json(os.path.join(folder, "generation_config.json"))
    model = _json(os.path.join(folder, "config.json"))
    out = {}
    for kind in ("bos", "eos", "pad"):
        key = f"{kind}_token_id"
        value = generation.get(key, model.get(key))
        if value is None and _token(tok_config.get(f"{kind}_token")) is not None:
            value = backend.token_to_id(_token(tok_config[f"{kind}_token"]))
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _chat_template(folder: str, tok_config: Mapping[str, Any]) -> str | None:
    path = os.path.join(folder, "chat_template.jinja")  # where transformers 5 saves it
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _jinja_render(template: str) -> Callable[..., str] | None:
    """A render function as transformers' (sandboxed), or ``None`` without jinja2."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render


def _simple_render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, **_) -> str:
    text = "".join(SIMPLE_CHAT.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (
        SIMPLE_CHAT.split("{content}")[0].format(role="assistant") if add_generation_prompt else ""
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an HF model folder (its ``tokenizer.json``).

    Args:
        path: a folder with ``tokenizer.json`` (and optionally ``tokenizer_config.json``,
            ``config.json``, ``generation_config.json``, ``chat_template.jinja``).

    Returns:
        A :class:`Tokenizer`. Special ids come from ``generation_config.json``, then
        ``config.json``, then ``tokenizer_config.json``'s token strings.

    Raises:
        ImportError: ``tokenizers`` is not installed (``pip install nnjax[llm]``).
        CheckpointError: no ``tokenizer.json`` in the folder.

    Example:
        A tokenizer trained here stands in for a model folder's:

        >>> from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        >>> t = Tokenizer(models.BPE())
        >>> t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> t.decoder = decoders.ByteLevel()
        >>> t.train_from_iterator(["hello world", "hello there"], trainers.BpeTrainer(
        ...     special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        >>> t.save("tokenizer.json")
        >>> tok = nj.models.hf.load_tokenizer(".")
        >>> ids = tok.encode("hello world")
        >>> tok.decode(ids), tok.vocab_size > 256
        ('hello world', True)
    """
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError as e:
        raise ImportError(
            "load_tokenizer needs the `tokenizers` package: pip install nnjax[llm]"
        ) from e
    folder = os.fspath(path)
    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{file} does not exist (only fast tokenizers are read; re-save the tokenizer "
            "with transformers' AutoTokenizer to get one)"
        )
    backend = Backend.from_file(file)
    tok_config = _json(os.path.join(folder, "tokenizer_config.json"))
    ids = _special_ids(folder, backend, tok_config)
    template = _chat_template(folder, tok_config)
    render = (_jinja_render(template) if template else None) or _simple_render
    tokens = {
        k: _token(tok_config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    for kind in ("bos", "eos", "pad"):  # named by id only (config.json): the id's string
        value = ids[f"{kind}_token_id"]
        first = value[0] if isinstance(value, tuple) and value else value
        if tokens[f"{kind}_token"] is None and isinstance(first, int):
            tokens[f"{kind}_token"] = backend.id_to_token(first)

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [
            e.ids for e in backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def decode(ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(rows: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        rows = [[int(i) for i in r] for r in rows]
        return backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        text = render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **tokens
        )
        # the template writes the special tokens itself (transformers encodes it the same way)
        return encode(text, add_special_tokens=False) if tokenize else text

    filler = ids["pad_token_id"]
    if filler is None:  # any id fills: the attention mask says what is padding
        eos = ids["eos_token_id"]
        filler = (eos[0] if isinstance(eos, tuple) else eos) if eos is not None else 0

    def pad(rows: Sequence[Sequence[int]], side: str = "right", max_length: int | None = None):
        return pad_ids(rows, filler, side=side, max_length=max_length)

    def encode_padded(
        texts: Sequence[str],
        side: str = "right",
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, np.ndarray]:
        return pad(encode_batch(texts, add_special_tokens), side, max_length)

    def save(folder: str | os.PathLike) -> list[str]:
        return _save_files(os.fspath(folder), backend, tokens, template)

    return Tokenizer(
        encode=encode,
        decode=decode,
        encode_batch=encode_batch,
        decode_batch=decode_batch,
        apply_chat_template=apply_chat_template,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        chat_template=template,
        backend=backend,
        pad=pad,
        encode_padded=encode_padded,
        save=save,
        special_tokens=tokens,
        **ids,
    )
