"""Record sources (nnjax/data/records.py) and ``datasets.Dataset`` input for the readers.

The reference for every source is the same records written as JSONL and read by
Python's ``json``; the batches from a ``datasets.Dataset`` must equal those from the
JSONL path, batch for batch, and resume at the same batch.
"""

import json

import numpy as np
import pytest

import nnjax as nj
from nnjax.core.errors import DataError

RECORDS = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(12)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_json_and_list_give_the_same_records(tmp_path):
    jsonl = _jsonl(tmp_path / "a.jsonl", RECORDS)
    (tmp_path / "a.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    expected = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert nj.data.read_records(jsonl) == expected
    assert nj.data.read_records(tmp_path / "a.json") == expected
    assert nj.data.read_records(RECORDS) == expected


def test_bad_sources_and_records_name_where(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected a JSON object, got list"):
        nj.data.read_records(bad)
    with pytest.raises(DataError, match=r"records\[1\]: no"):
        nj.data.read_records([{"a": 1}, {"b": 2}], lambda r: None if "a" in r else "no")
    with pytest.raises(DataError, match="no such file"):
        nj.data.read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: expected a file ending in one of"):
        nj.data.read_records(tmp_path / "x.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="expected at least one record"):
        nj.data.read_records(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match=r"a.jsonl:2: expected 'response' to be a string"):
        nj.data.read_jsonl(_jsonl(tmp_path / "a.jsonl", [RECORDS[0], {"prompt": "x"}]))


def test_datasets_sources_equal_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = _jsonl(tmp_path / "a.jsonl", RECORDS)
    expected = nj.data.read_records(jsonl)
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next(p for p in (tmp_path / "saved").iterdir() if p.suffix == ".arrow")
    assert nj.data.read_records(ds) == expected
    assert nj.data.read_records(tmp_path / "a.parquet") == expected
    assert pq.read_table(tmp_path / "a.parquet").num_rows == len(expected)
    assert nj.data.read_records(tmp_path / "saved") == expected
    assert nj.data.read_records(arrow) == expected
    assert nj.data.is_dataset(ds) and not nj.data.is_dataset(RECORDS)
    bad = datasets.Dataset.from_list([RECORDS[0], {"prompt": "x", "response": None}])
    with pytest.raises(DataError, match=r"dataset row 1: expected 'response' to be a string"):
        nj.data.read_jsonl(bad)


def test_instruct_batches_from_a_dataset_equal_jsonl_and_resume(tmp_path):
    datasets = pytest.importorskip("datasets")
    jsonl = _jsonl(tmp_path / "a.jsonl", RECORDS)
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    tok = nj.data.ByteTokenizer()
    a = nj.data.instruct_batches(jsonl, tok, 8, 2, seed=3, epochs=2)
    b = nj.data.instruct_batches(ds, tok, 8, 2, seed=3, epochs=2)
    ref = list(a)
    got = list(b)
    assert len(ref) == len(got) > 2
    for (xa, ya), (xb, yb) in zip(ref, got, strict=True):
        assert all(np.array_equal(xa[k], xb[k]) for k in xa) and np.array_equal(ya, yb)
    resumed = list(b.at(3))
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(resumed, got[3:], strict=True))


def test_token_batches_from_a_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    joined = np.array([5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13])
    assert nj.data.dataset_tokens(ds, eos_id=0).tolist() == joined.tolist()
    it = nj.data.token_batches(ds, 4, 3, seed=1, eos_id=0)
    ref = nj.data.lm_batches(joined, 4, 3, seed=1)
    for _ in range(3):
        (x, y), (rx, ry) = next(it), next(ref)
        assert np.array_equal(x, rx) and np.array_equal(y, ry)
    x5, _ = next(it.at(5))
    assert np.array_equal(x5, next(ref.at(5))[0])
    with pytest.raises(DataError, match="expected a column 'ids'"):
        nj.data.token_batches(ds, 4, 3, column="ids")
