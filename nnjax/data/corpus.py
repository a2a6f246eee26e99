"""A corpus to a token folder: nanoGPT's ``prepare.py`` as a function (and ``nnjax tokenize``).

:func:`tokenize_corpus` reads documents (text files, a field of JSONL / JSON / Parquet /
Arrow records, a ``datasets`` folder or ``datasets.Dataset``), tokenizes them a batch
of documents at a time (``tokenizers``' ``encode_batch`` runs on every core), and
writes a folder::

    out/train.bin    token ids, uint16 (vocabulary <= 65,536) or uint32, little-endian
    out/val.bin      the last ``val_fraction`` of the tokens (as nanoGPT cuts its text)
    out/meta.json    tokenizer, vocabulary size, end-of-text id, dtype, counts

Documents are joined with the end-of-text id between them. The work happens in
``out.partial/``: after each batch the tokens are flushed and a small progress file
records how many documents and tokens are safely on disk, so an interrupted run
called again with the same arguments resumes there and gives the same files. The
finished folder replaces ``out`` only at the end, so a failure never destroys an
existing output (and an existing one is refused unless ``overwrite=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nnjax.core.errors import ArgumentError, DataError
from nnjax.data.records import RECORD_FILES, is_dataset, iter_records
from nnjax.data.tokens import ByteTokenizer, open_tokens

__all__ = ["tokenize_corpus", "read_token_meta"]

_PROGRESS = "progress.json"
_STREAM = "tokens.bin"


def _sources(sources: Any) -> list[Any]:
    items = [sources] if isinstance(sources, str | os.PathLike) or is_dataset(sources) else sources
    if not isinstance(items, Sequence) or not items:
        raise ArgumentError(f"sources: expected paths or a datasets.Dataset, got {sources!r}")
    for s in items:
        if not is_dataset(s) and not os.path.exists(s):
            raise DataError(f"{os.fspath(s)}: no such file or folder")
    return list(items)


def _is_text_file(source: Any) -> bool:
    if is_dataset(source) or os.path.isdir(source):
        return False
    return os.path.splitext(os.fspath(source))[1].lower() not in RECORD_FILES


def _documents(sources: list[Any], field: str) -> Iterator[str]:
    """Each document's text in order: a text file is one; a record's ``field`` is one."""
    for source in sources:
        if _is_text_file(source):
            with open(source, encoding="utf-8") as f:
                yield f.read()
            continue
        for where, record in iter_records(source):
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: expected a string field {field!r} (pass field=/--field), got "
                    f"{'keys ' + str(sorted(record)) if isinstance(record, dict) else record!r}"
                )
            yield text


def _encoder(tokenizer: Any) -> tuple[Callable[[list[str]], list[Any]], dict[str, Any]]:
    """``encode(texts) -> id lists`` and what the sidecar says of the tokenizer."""
    if isinstance(tokenizer, str | os.PathLike) and os.fspath(tokenizer) != "bytes":
        from nnjax.models.hf.tokenizer import load_tokenizer

        path = os.path.abspath(os.fspath(tokenizer))
        tok = load_tokenizer(path)
        with open(os.path.join(path, "tokenizer.json"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        info = {"tokenizer": path, "tokenizer_sha256": digest}
        tokenizer = tok
    elif tokenizer == "bytes" or isinstance(tokenizer, ByteTokenizer):
        tokenizer = ByteTokenizer()
        info = {"tokenizer": "bytes"}

        def encode_bytes(texts: list[str]) -> list[Any]:
            return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

        return encode_bytes, {**info, "vocab_size": 256, "eos_token_id": 0}
    else:
        info = {"tokenizer": type(tokenizer).__name__}
    vocab = getattr(tokenizer, "vocab_size", None)
    if not isinstance(vocab, int) or not callable(getattr(tokenizer, "encode", None)):
        raise ArgumentError(
            "tokenizer: expected a folder with tokenizer.json, 'bytes', or an object with "
            f"encode() and an int vocab_size, got {type(tokenizer).__name__}"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, tuple | list) else eos
    batch: Any = getattr(tokenizer, "encode_batch", None)
    one: Any = tokenizer.encode  # type: ignore[union-attr]
    batched = callable(batch)

    def encode(texts: list[str]) -> list[Any]:
        if batched:  # tokenizers: every core
            return batch(texts, add_special_tokens=False)
        return [one(t) for t in texts]

    return encode, {**info, "vocab_size": vocab, "eos_token_id": eos}


def _fingerprint(sources: list[Any], field: str, info: dict, eot: int | None, val: float) -> dict:
    def describe(s: Any) -> Any:
        if is_dataset(s):
            return {"dataset": getattr(s, "_fingerprint", None), "rows": s.num_rows}
        st = os.stat(s)
        return {"path": os.path.abspath(s), "bytes": st.st_size, "mtime": st.st_mtime}

    return {
        "sources": [describe(s) for s in sources],
        "field": field,
        "tokenizer": {k: v for k, v in info.items() if k != "eos_token_id"},
        "eot_id": eot,
        "val_fraction": val,
    }


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _start(work: str, fingerprint: dict, overwrite: bool) -> tuple[int, int]:
    """``(documents done, tokens on disk)`` of an interrupted run in ``work``, or a fresh one
    (an interrupted run of other arguments is discarded with ``overwrite``, else refused)."""
    progress = os.path.join(work, _PROGRESS)
    if os.path.isfile(progress):
        with open(progress) as f:
            state = json.load(f)
        if state["fingerprint"] == fingerprint:
            return state["documents"], state["tokens"]
        if not overwrite:
            raise DataError(
                f"{work}: an interrupted run with other sources, tokenizer or settings; call "
                "again with the same arguments to resume it, or pass overwrite=True "
                "(--overwrite) to start afresh"
            )
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    _write_json(progress, {"fingerprint": fingerprint, "documents": 0, "tokens": 0})
    return 0, 0


def _append(f: Any, ids: np.ndarray) -> None:
    ids.tofile(f)
    f.flush()
    os.fsync(f.fileno())


def _encode_batch(
    encode: Callable, texts: list[str], first: int, eot: int | None, dtype: np.dtype, vocab: int
) -> np.ndarray:
    """The batch's ids, ``eot`` before every document but the corpus's first (index 0)."""
    parts = []
    for i, ids in enumerate(encode(texts), first):
        if i and eot is not None:
            parts.append(np.asarray([eot], dtype))
        parts.append(np.asarray(ids, dtype))
    out = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if len(out) and int(out.max()) >= vocab:
        raise DataError(f"the tokenizer gave id {int(out.max())} >= its vocab_size {vocab}")
    return out


def _finish(work: str, out: str, meta: dict, val_fraction: float, dtype: np.dtype) -> None:
    """Split the stream into train.bin / val.bin, write meta.json, put the folder at ``out``."""
    stream = os.path.join(work, _STREAM)
    n = os.path.getsize(stream) // dtype.itemsize
    n_val = round(n * val_fraction)
    if n - n_val < 2 or (val_fraction > 0 and n_val < 2):
        raise DataError(
            f"the corpus gave {n} tokens: too few for a train split and a validation split "
            f"of {val_fraction}"
        )
    if n_val:
        tokens = open_tokens(stream, dtype)
        np.asarray(tokens[n - n_val :]).tofile(os.path.join(work, "val.bin"))
        del tokens
        with open(stream, "r+b") as f:
            f.truncate((n - n_val) * dtype.itemsize)
    os.replace(stream, os.path.join(work, "train.bin"))
    _write_json(
        os.path.join(work, "meta.json"),
        {**meta, "tokens": n, "train_tokens": n - n_val, "val_tokens": n_val},
    )
    os.remove(os.path.join(work, _PROGRESS))
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def tokenize_corpus(
    sources: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    field: str = "text",
    val_fraction: float = 0.1,
    eot_id: int | str | None = "auto",
    batch_documents: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize documents into ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``.

    Args:
        sources: a path or a list of paths, or a ``datasets.Dataset``. A text file (any
            ending but ``.jsonl``, ``.json``, ``.parquet``, ``.arrow``) is one document;
            records (those files, a ``Dataset.save_to_disk`` folder, a ``Dataset``) give
            one document per record, its ``field``.
        tokenizer: a folder with ``tokenizer.json`` (read by
            :func:`nnjax.models.hf.load_tokenizer`), ``"bytes"`` (UTF-8 bytes, ids 0-255),
            or an object with ``encode`` (and ``encode_batch``) and ``vocab_size``. No
            special tokens are added to a document (no BOS).
        out: the output folder (refused if it exists, unless ``overwrite``); the work
            happens in ``out.partial`` (an interrupted run there is resumed).
        field: the text field of records.
        val_fraction: the last fraction of the tokens that goes to ``val.bin``
            (0: no validation split).
        eot_id: the id put between documents; ``"auto"``: the tokenizer's end-of-sequence
            id (bytes: 0), ``None``: nothing between documents.
        batch_documents: documents tokenized per call (and per resumable step).
        overwrite: replace an existing ``out`` (only once the new one is complete), and
            discard an interrupted run in ``out.partial`` made with other arguments.
        progress: a progress bar (documents, tokens/s).

    Returns:
        The sidecar (``meta.json``): ``tokenizer``, ``vocab_size``, ``eot_id``,
        ``dtype``, ``documents``, ``tokens``, ``train_tokens``, ``val_tokens``, ...

    Raises:
        DataError: ``out`` exists (without ``overwrite``), a missing source, a record
            without ``field``, a corpus too small to split, an interrupted run in
            ``out.partial`` made with other arguments.
        ArgumentError: a bad tokenizer, ``val_fraction`` outside ``[0, 1)``.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> for i, text in enumerate(["hello world", "bye"]):
        ...     with open(os.path.join(d, f"{i}.txt"), "w") as f:
        ...         _ = f.write(text)
        >>> meta = nj.data.tokenize_corpus([os.path.join(d, "0.txt"), os.path.join(d, "1.txt")],
        ...     "bytes", os.path.join(d, "tokens"), val_fraction=0.2, progress=False)
        >>> meta["documents"], meta["tokens"], meta["train_tokens"], meta["dtype"]
        (2, 15, 12, 'uint16')
        >>> nj.data.open_tokens(os.path.join(d, "tokens", "val.bin"), meta["dtype"]).tolist()
        [98, 121, 101]
    """
    items = _sources(sources)
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise DataError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
        raise ArgumentError(f"val_fraction: expected a float in [0, 1), got {val_fraction!r}")
    encode, info = _encoder(tokenizer)
    eot = info.pop("eos_token_id") if eot_id == "auto" else eot_id
    vocab = info["vocab_size"]
    if eot is not None and not (isinstance(eot, int) and 0 <= eot < vocab):
        raise ArgumentError(f"eot_id: expected an id in [0, {vocab}) or None, got {eot!r}")
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32).newbyteorder("<")
    fingerprint = _fingerprint(items, field, info, eot, val_fraction)
    work = out.rstrip("/\\") + ".partial"
    done, n_tokens = _start(work, fingerprint, overwrite)
    stream = os.path.join(work, _STREAM)
    bar = tqdm(disable=not progress, unit="doc", initial=done, dynamic_ncols=True)
    start, new_tokens = time.perf_counter(), 0
    docs = _documents(items, field)
    for _ in range(done):  # resume: skip what is on disk
        next(docs)
    with open(stream, "ab") as f:
        f.truncate(n_tokens * dtype.itemsize)  # a batch cut short after the last record
        f.seek(n_tokens * dtype.itemsize)
        while batch := [t for _, t in zip(range(batch_documents), docs, strict=False)]:
            ids = _encode_batch(encode, batch, done, eot, dtype, vocab)
            _append(f, ids)
            done, n_tokens, new_tokens = (
                done + len(batch),
                n_tokens + len(ids),
                new_tokens + len(ids),
            )
            _write_json(
                os.path.join(work, _PROGRESS),
                {"fingerprint": fingerprint, "documents": done, "tokens": n_tokens},
            )
            rate = new_tokens / max(time.perf_counter() - start, 1e-9)
            bar.update(len(batch))
            bar.set_postfix({"tokens": n_tokens, "tok/s": f"{rate:.3g}"}, refresh=False)
    bar.close()
    meta = {
        **info,
        "eot_id": eot,
        "dtype": dtype.name,
        "documents": done,
        "field": field,
        "val_fraction": val_fraction,
        "sources": [s.get("path", "dataset") for s in fingerprint["sources"]],
    }
    _finish(work, out, meta, val_fraction, dtype)
    return read_token_meta(out)


def read_token_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a folder :func:`tokenize_corpus` wrote.

    Raises:
        DataError: no ``meta.json`` there.
    """
    path = os.path.join(os.fspath(folder), "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist (not a folder written by nnjax tokenize?)")
    with open(path) as f:
        return json.load(f)
