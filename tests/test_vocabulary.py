"""nj.data.fit_vocabulary / Vocabulary: ids against a hand count, padding, save and load."""

import collections
import json
import re

import numpy as np
import pytest

import nnjax as nj

TRAIN = ["The film was GOOD, really good!", "a bad film; really bad.", "Don't watch it", "good"]


def test_ids_follow_counts_and_texts_encode_as_a_padded_batch():
    vocab = nj.data.fit_vocabulary(TRAIN)
    counts = collections.Counter(w for t in TRAIN for w in re.findall(r"[a-z']+", t.lower()))
    want = sorted(counts, key=lambda w: (-counts[w], w))  # the reference: a hand count
    assert vocab.tokens == ("<pad>", "<unk>", *want) and vocab.size == len(want) + 2
    x = vocab.encode(["good film", "an UNSEEN word, good", ""])
    ids = [[vocab.index[w] for w in s.split()] for s in ("good film",)]
    assert x["inputs"].dtype == np.int32 and x["inputs"].shape == (3, 4)
    assert x["inputs"][0].tolist() == ids[0] + [0, 0]
    assert x["inputs"][1].tolist() == [1, 1, 1, vocab.index["good"]]
    assert x["inputs"][2].tolist() == [0, 0, 0, 0] and x["lengths"].tolist() == [2, 4, 0]
    short = vocab.encode(["good film really bad"], max_length=2)
    assert short["inputs"].tolist() == [ids[0]] and short["lengths"].tolist() == [2]
    assert vocab.decode(x["inputs"][0]) == "good film"
    assert vocab.words("Don't stop") == ["don't", "stop"]


def test_max_tokens_and_min_count_keep_the_most_frequent_words():
    vocab = nj.data.fit_vocabulary(TRAIN, max_tokens=5)
    assert vocab.tokens == ("<pad>", "<unk>", "good", "bad", "film")  # good: 3 times
    assert nj.data.fit_vocabulary(TRAIN, min_count=2).tokens[2:] == (
        "good",
        "bad",
        "film",
        "really",
    )


def test_save_and_load_round_trip_and_checkpoint_extra(tmp_path):
    vocab = nj.data.fit_vocabulary(TRAIN, lowercase=False)
    path = tmp_path / "vocab.json"
    path.write_text("old")
    vocab.save(path)
    back = nj.data.load_vocabulary(path)
    assert back == vocab and not list(tmp_path.glob(".tmp-*"))
    assert nj.data.load_vocabulary(json.loads(json.dumps(vocab.to_json()))) == vocab
    texts = ["The film", "the FILM was good"]
    for key in ("inputs", "lengths"):
        np.testing.assert_array_equal(back.encode(texts)[key], vocab.encode(texts)[key])


def test_bad_input_is_named():
    vocab = nj.data.fit_vocabulary(TRAIN)
    with pytest.raises(nj.DataError, match=r"texts: expected a list of strings, got one string"):
        nj.data.fit_vocabulary("a text")
    with pytest.raises(nj.DataError, match=r"texts\[1\]: expected a string, got int"):
        vocab.encode(["fine", 3])
    with pytest.raises(nj.ArgumentError, match=r"max_length: expected an int >= 1, got 0"):
        vocab.encode(["fine"], max_length=0)
    with pytest.raises(nj.ArgumentError, match=r"max_tokens: expected an int >= 2, got 1"):
        nj.data.fit_vocabulary(TRAIN, max_tokens=1)
    with pytest.raises(nj.ArgumentError, match=r"pattern: not a regular expression"):
        nj.data.fit_vocabulary(TRAIN, pattern="[a-")


def test_load_names_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(nj.DataError, match=r"missing\.json: cannot read a vocabulary"):
        nj.data.load_vocabulary(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tokens": ["a", "b"]}))
    with pytest.raises(nj.DataError, match=r'bad\.json: expected \{"tokens": \["<pad>", "<unk>"'):
        nj.data.load_vocabulary(bad)
