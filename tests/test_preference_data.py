"""Preference data: masks on exactly the response tokens of both sides, truncation
reported, pairs kept together in batches, exact resumption, datasets.Dataset input."""

import json

import jax
import numpy as np
import pytest

import nnjax as nj
from nnjax import data as nd
from tests.test_instruct import _hf_chat_tokenizer

TOK = nd.ByteTokenizer()
IGNORE = nd.IGNORE_INDEX


def _bytes(text):
    return list(text.encode("utf-8"))


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _want_targets(prompt, response, eos, seq_len):
    """Targets of one side written out by hand: the next token on response tokens only."""
    ids = _bytes(prompt) + _bytes(response) + [eos]
    learn = [False] * len(_bytes(prompt)) + [True] * (len(_bytes(response)) + 1)
    t = [i if lr else IGNORE for i, lr in zip(ids[1:], learn[1:], strict=True)][:seq_len]
    return t + [IGNORE] * (seq_len - len(t)), ids[:-1][:seq_len]


def test_masks_cover_exactly_the_responses_of_both_sides():
    rec = {"prompt": "2+2=", "chosen": "4", "rejected": "five"}
    d = nd.load_preference([rec], TOK, 12, eos_id=0)
    for side, response in enumerate(("4", "five")):
        want_t, want_x = _want_targets("2+2=", response, 0, 12)
        assert d.targets[0, side].tolist() == want_t
        assert d.inputs["ids"][0, side, : len(want_x)].tolist() == want_x
        n = len(want_x)
        assert d.inputs["segment_ids"][0, side].tolist() == [1] * n + [0] * (12 - n)
        assert d.inputs["positions"][0, side, :n].tolist() == list(range(n))
    # the response index: the positions of the targets above, "five" + end the longest
    want = [[i for i, t in enumerate(_want_targets("2+2=", r, 0, 12)[0]) if t != IGNORE]
            for r in ("4", "five")]  # fmt: skip
    assert d.inputs["response_index"][0].tolist() == [want[0] + [-1] * 3, want[1]]


def test_chat_form_learns_only_the_turns_after_the_shared_prompt():
    tok = _hf_chat_tokenizer()
    shared = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},  # shared: part of the prompt, not learnt
        {"role": "user", "content": "2+2?"},
    ]
    rec = {
        "chosen": [*shared, {"role": "assistant", "content": "4"}],
        "rejected": [*shared, {"role": "assistant", "content": "22"}],
    }
    # the same pair in the explicit-prompt chat form gives the same arrays
    rec2 = {"prompt": shared, "chosen": rec["chosen"][-1:], "rejected": rec["rejected"][-1:]}
    a = nd.load_preference([rec], tok, 64)
    b = nd.load_preference([rec2], tok, 64)
    jax.tree.map(np.testing.assert_array_equal, (a.inputs, a.targets), (b.inputs, b.targets))
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    for side, answer in enumerate(("4", "22")):
        whole = tok.apply_chat_template(rec[("chosen", "rejected")[side]], tokenize=False)
        ids = enc(whole)  # transformers' own rendering of the conversation
        prompt = tok.apply_chat_template(shared, tokenize=False, add_generation_prompt=True)
        response = f"{answer}<|im_end|>\n"
        assert whole == prompt + response
        p = len(enc(prompt))
        assert a.inputs["ids"][0, side, : len(ids) - 1].tolist() == ids[:-1]
        learnt = np.flatnonzero(a.targets[0, side] != IGNORE)
        assert learnt.tolist() == list(range(p - 1, len(ids) - 1))
        assert a.targets[0, side, learnt].tolist() == ids[p:]
        index = a.inputs["response_index"][0, side]
        assert index[index >= 0].tolist() == learnt.tolist()


def test_truncation_cuts_the_prompt_first_then_the_responses_and_reports_empty_pairs():
    rec = {"prompt": "abcdefgh", "chosen": "XYZ", "rejected": "Q"}
    d = nd.load_preference([rec], TOK, 6, max_prompt_length=3, eos_id=0)
    # prompt "fgh" (its last 3 tokens), then "XYZ" + eos cut to 7 tokens in all
    assert d.inputs["ids"][0, 0].tolist() == _bytes("fghXYZ")
    assert d.targets[0, 0].tolist() == [IGNORE, IGNORE, *_bytes("XYZ"), 0]
    assert d.targets[0, 1].tolist() == [IGNORE, IGNORE, _bytes("Q")[0], 0, IGNORE, IGNORE]
    d = nd.load_preference([rec], TOK, 6, max_prompt_length=5, eos_id=0)
    assert d.inputs["ids"][0, 0].tolist() == _bytes("defghX")  # the response cut at its end
    # no room for a response: left out and reported, or an error on request
    ok = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.warns(UserWarning, match=r"1 preference pair\(s\) left out.*records\[0\]"):
        d = nd.load_preference([rec, ok], TOK, 6, eos_id=0)
    assert d.dropped == ["records[0]"] and len(d.targets) == 1
    with pytest.raises(nj.DataError, match=r"records\[0\]: no response token fits"):
        nd.load_preference([rec, ok], TOK, 6, eos_id=0, on_empty="error")


def test_pairs_never_split_and_resume_exactly(tmp_path):
    records = [{"prompt": f"{i}?", "chosen": f"c{i}", "rejected": f"r{i}!"} for i in range(11)]
    path = _write(tmp_path / "prefs.jsonl", records)
    full = list(nd.preference_batches(path, TOK, 10, 4, seed=3, epochs=3, eos_id=0))
    assert len(full) == 6  # 2 batches of 4 pairs per epoch (3 left over each time)
    for inputs, targets in full:
        assert targets.shape == (4, 2, 10)
        for n in range(4):  # both sides of each pair hold the same prompt number
            c = bytes(inputs["ids"][n, 0][inputs["segment_ids"][n, 0] > 0].tolist()).decode()
            r = bytes(inputs["ids"][n, 1][inputs["segment_ids"][n, 1] > 0].tolist()).decode()
            i = c.split("?")[0]
            assert c.startswith(f"{i}?c{i}") and r.startswith(f"{i}?r{i}!")
    rebuilt = nd.preference_batches(path, TOK, 10, 4, seed=3, epochs=3, eos_id=0)
    for k in (0, 3, 5):
        tail = list(rebuilt.at(k))
        assert len(tail) == len(full) - k
        for a, b in zip(full[k:], tail, strict=True):
            jax.tree.map(np.testing.assert_array_equal, a, b)
    # gradient accumulation splits axis 0: the pairs stay whole there too
    split = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), full[0][1])
    np.testing.assert_array_equal(split[1, 0], full[0][1][2])


def test_datasets_dataset_gives_the_same_arrays_as_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(5)]
    path = _write(tmp_path / "p.jsonl", records)
    a = nd.load_preference(path, TOK, 8, eos_id=0)
    b = nd.load_preference(datasets.Dataset.from_list(records), TOK, 8, eos_id=0)
    jax.tree.map(np.testing.assert_array_equal, (a.inputs, a.targets), (b.inputs, b.targets))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, "expected keys 'chosen' and 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": None}, "all strings"),
        ({"chosen": [{"role": "user"}], "rejected": []}, r"chosen\[0\]"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "user", "content": "b"}],
            },
            "share their first turns",
        ),
    ],
)
def test_malformed_preference_records_name_where(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, record])
    with pytest.raises(nj.DataError, match=f"bad.jsonl:2: .*{message}"):
        nd.load_preference(path, TOK, 8, eos_id=0)
