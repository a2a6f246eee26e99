"""``nj.data.tokenize_corpus`` and ``nnjax tokenize``: a corpus to train.bin / val.bin / meta.json.

The reference is the tokenizer run by hand on each document (``tokenizers``'
``Tokenizer.encode``), joined with the end-of-text id; an interrupted run, resumed,
must give the bytes of an uninterrupted one.
"""

import json
import os

import numpy as np
import pytest

import nnjax as nj
from nnjax.app import cli
from nnjax.core.errors import DataError
from nnjax.data import corpus

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "You are all resolved rather to die than to famish?",
    "Resolved. resolved.",
    "First, you know Caius Marcius is chief enemy to the people.",
    "We know't, we know't.",
    "Let us kill him, and we'll have corn at our own price.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(DOCS, trainer)
    folder = tmp_path_factory.mktemp("tok")
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def _corpus(tmp_path):
    """DOCS as two text files, a JSONL file and a Parquet file (in that order)."""
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "b.txt").write_text(DOCS[1], encoding="utf-8")
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS[2:5]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    sources = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return sources, DOCS[:5]
    pq.write_table(pa.table({"text": DOCS[5:]}), tmp_path / "d.parquet")
    return [*sources, tmp_path / "d.parquet"], DOCS


def _read(out, meta):
    train = nj.data.open_tokens(os.path.join(out, "train.bin"), meta["dtype"])
    val_path = os.path.join(out, "val.bin")
    val = nj.data.open_tokens(val_path, meta["dtype"]) if os.path.exists(val_path) else []
    return np.concatenate([np.asarray(train), np.asarray(val)]).tolist()


def test_same_ids_as_the_tokenizer_by_hand(tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer

    sources, docs = _corpus(tmp_path)
    ref = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = ref.token_to_id("<|endoftext|>")
    expected: list[int] = []
    for i, d in enumerate(docs):
        expected += ([eot] if i else []) + ref.encode(d, add_special_tokens=False).ids
    out = tmp_path / "tokens"
    meta = nj.data.tokenize_corpus(
        sources, tokenizer_dir, out, val_fraction=0.25, batch_documents=2, progress=False
    )
    assert _read(out, meta) == expected
    assert eot in expected and expected.count(eot) == len(docs) - 1  # one between each pair
    n_val = round(len(expected) * 0.25)
    assert meta["documents"] == len(docs) and meta["tokens"] == len(expected)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(expected) - n_val, n_val)
    assert os.path.getsize(out / "val.bin") == 2 * n_val and meta["dtype"] == "uint16"
    assert meta["eot_id"] == eot and meta["vocab_size"] == ref.get_vocab_size()
    assert nj.data.read_token_meta(out) == meta
    assert not os.path.exists(f"{out}.partial")


def test_interrupted_run_resumes_to_the_same_file(tmp_path, monkeypatch):
    sources, docs = _corpus(tmp_path)
    whole = nj.data.tokenize_corpus(
        sources, "bytes", tmp_path / "whole", batch_documents=2, progress=False
    )
    calls = []
    real_append = corpus._append

    def torn(f, ids):  # the third batch dies half written
        calls.append(len(ids))
        if len(calls) == 3:
            ids[: len(ids) // 2].tofile(f)
            f.flush()
            raise KeyboardInterrupt
        real_append(f, ids)

    monkeypatch.setattr(corpus, "_append", torn)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        nj.data.tokenize_corpus(sources, "bytes", out, batch_documents=2, progress=False)
    assert not out.exists() and (tmp_path / "cut.partial").is_dir()
    monkeypatch.setattr(corpus, "_append", real_append)
    with pytest.raises(DataError, match="interrupted run with other sources"):
        nj.data.tokenize_corpus(sources, "bytes", out, batch_documents=2, val_fraction=0.2)
    resumed = nj.data.tokenize_corpus(sources, "bytes", out, batch_documents=2, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert _read(out, resumed) == _read(tmp_path / "whole", whole)
    assert {k: v for k, v in resumed.items() if k != "sources"} == {
        k: v for k, v in whole.items() if k != "sources"
    }
    joined = b"\0".join(d.encode() for d in docs)
    assert _read(out, resumed) == list(joined)


def test_existing_output_refused_and_kept_on_failure(tmp_path):
    (tmp_path / "a.txt").write_text("some text for the corpus")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DataError, match=r"out exists; pass overwrite=True \(--overwrite\)"):
        nj.data.tokenize_corpus(tmp_path / "a.txt", "bytes", out, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a string field 'text'"):
        nj.data.tokenize_corpus(
            [tmp_path / "a.txt", bad], "bytes", out, overwrite=True, batch_documents=1
        )
    assert (out / "keep.txt").read_text() == "old"  # the failed run left it alone
    meta = nj.data.tokenize_corpus(tmp_path / "a.txt", "bytes", out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and meta["tokens"] == len("some text for the corpus")
    with pytest.raises(DataError, match="no such file"):
        nj.data.tokenize_corpus(tmp_path / "nope.txt", "bytes", tmp_path / "o2")


def test_large_vocabulary_gives_uint32(tmp_path):
    class Big:  # any object with encode and vocab_size
        vocab_size = 70_000
        eos_token_id = 69_999

        def encode(self, text):
            return [65_000 + len(w) for w in text.split()]

    (tmp_path / "a.txt").write_text("a bb ccc dddd eeeee ffffff")
    meta = nj.data.tokenize_corpus(
        [tmp_path / "a.txt", tmp_path / "a.txt"], Big(), tmp_path / "o", val_fraction=0.0
    )
    assert meta["dtype"] == "uint32" and meta["val_tokens"] == 0
    got = nj.data.open_tokens(tmp_path / "o" / "train.bin", "uint32").tolist()
    one = [65_001, 65_002, 65_003, 65_004, 65_005, 65_006]
    assert got == [*one, 69_999, *one]


def test_datasets_source_and_command_line(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": DOCS})
    meta = nj.data.tokenize_corpus(ds, "bytes", tmp_path / "ds", field="body", progress=False)
    assert _read(tmp_path / "ds", meta) == list(b"\0".join(d.encode() for d in DOCS))
    ds.save_to_disk(str(tmp_path / "saved"))
    argv = ["tokenize", str(tmp_path / "saved"), "--tokenizer", "bytes", "--field", "body"]
    argv += ["--out", str(tmp_path / "cli"), "--no-progress", "--val-fraction", "0.1"]
    assert cli.main(argv) == 0
    assert "7 documents" in capsys.readouterr().out
    assert (tmp_path / "cli" / "train.bin").read_bytes() == (tmp_path / "ds/train.bin").read_bytes()
    with pytest.raises(DataError, match="exists"):
        cli.main(argv)
