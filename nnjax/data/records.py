"""Records (one dict per example) from wherever they are kept: JSONL, JSON, Parquet,
Arrow, a ``datasets`` folder, a Hugging Face ``datasets.Dataset``, or a list of dicts.

Every reader of example-shaped data (instruction, preference) goes through
:func:`read_records`, so each accepts the same sources and reports a bad record
the same way, naming the file and line (``data.jsonl:7: ...``) or the row
(``train.parquet row 6: ...``). Nothing is downloaded: a ``datasets.Dataset`` is
one the caller built from local files (``datasets.load_dataset("json",
data_files=...)``, ``Dataset.from_list``, ``load_from_disk``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nnjax.core.errors import DataError

__all__ = ["read_records", "iter_records", "is_dataset", "RECORD_FILES"]

Record = dict[str, Any]
Check = Callable[[Any], "str | None"]

RECORD_FILES = (".jsonl", ".json", ".parquet", ".arrow")
"""File endings :func:`read_records` reads (a folder is read as ``Dataset.save_to_disk`` wrote it)."""


def is_dataset(source: Any) -> bool:
    """Whether ``source`` is a Hugging Face ``datasets.Dataset`` (checked without importing it)."""
    return type(source).__module__.startswith("datasets") and hasattr(source, "column_names")


def _needs(package: str, what: str) -> Any:
    try:
        return __import__(package)
    except ImportError as e:
        raise ImportError(f"{what} needs the `{package}` package: pip install datasets") from e


def _jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None


def _json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e}); one object a line is a .jsonl"
            ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path} item {i}", record


def _rows(table: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Rows of a pyarrow table (a batch of rows at a time) or a ``datasets.Dataset``."""
    if is_dataset(table):
        for i, row in enumerate(table.with_format(None)):  # plain Python values, not tensors
            yield f"{where} row {i}", row
        return
    for lo in range(0, table.num_rows, 1024):
        for i, row in enumerate(table.slice(lo, 1024).to_pylist(), lo):
            yield f"{where} row {i}", row


def _file_rows(path: str) -> Iterator[tuple[str, Any]]:
    if os.path.isdir(path):
        datasets = _needs("datasets", f"reading the dataset folder {path}")
        try:
            dataset = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a folder saved by Dataset.save_to_disk ({e})") from None
        if not is_dataset(dataset):
            raise DataError(
                f"{path}: holds a DatasetDict ({sorted(dataset)}); pass one split's folder, "
                f"e.g. {os.path.join(path, sorted(dataset)[0])}"
            )
        yield from _rows(dataset, path)
        return
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        yield from _jsonl(path)
    elif ext == ".json":
        yield from _json(path)
    elif ext == ".parquet":
        _needs("pyarrow", f"reading {path}")
        import pyarrow.parquet as pq

        yield from _rows(pq.read_table(path), path)
    elif ext == ".arrow":
        datasets = _needs("datasets", f"reading {path}")
        yield from _rows(datasets.Dataset.from_file(path), path)
    else:
        raise DataError(
            f"{path}: expected a file ending in one of {RECORD_FILES} or a dataset folder, "
            f"got {ext or 'no ending'!r}"
        )


def iter_records(source: Any) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs from any source :func:`read_records` takes, lazily.

    ``where`` names the record for messages: ``"data.jsonl:7"``, ``"t.parquet row 6"``,
    ``"dataset row 6"``, ``"records[6]"``. Files are read as they are iterated.

    Raises:
        DataError: a missing file, an unknown file ending, JSON that does not parse.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder")
        yield from _file_rows(path)
    elif is_dataset(source):
        yield from _rows(source, "dataset")
    elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
        for i, record in enumerate(source):
            yield f"records[{i}]", record
    else:
        raise DataError(
            "expected records as a path (.jsonl, .json, .parquet, .arrow, a dataset folder), "
            f"a datasets.Dataset or a list of dicts, got {type(source).__name__}"
        )


def read_records(source: Any, check: Check | None = None) -> list[Record]:
    """Every record of ``source``, checked one by one; a bad one names where it is.

    Args:
        source: a path to a ``.jsonl`` file (one JSON object a line; blank lines skipped),
            a ``.json`` file (a list of objects), a ``.parquet`` or ``.arrow`` file, a
            folder written by ``Dataset.save_to_disk``; a ``datasets.Dataset``; or a
            list of dicts.
        check: ``check(record) -> None`` when good, else what is wrong (a sentence);
            default: each record must be a dict.

    Returns:
        The records as dicts, in order.

    Raises:
        DataError: an unreadable source, a record ``check`` refuses (``data.jsonl:7:
            expected 'response' to be a string, got None``), or no records at all.

    Example:
        >>> import json, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "data.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"text": "hi"}) + "\\n\\n" + json.dumps({"text": "yo"}))
        >>> nj.data.read_records(path)
        [{'text': 'hi'}, {'text': 'yo'}]
    """
    records = []
    for where, record in iter_records(source):
        if not isinstance(record, dict):
            problem: str | None = f"expected a JSON object, got {type(record).__name__}"
        else:
            problem = None if check is None else check(record)
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        records.append(record)
    if not records:
        name = os.fspath(source) if isinstance(source, str | os.PathLike) else "the records"
        raise DataError(f"{name}: expected at least one record, got none")
    return records
