"""nj.data instruction data: masks against hand-built byte strings, packing against per-example runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
import nnjax.data as nd

IGN = nd.IGNORE_INDEX
TOK = nd.ByteTokenizer()


def _bytes(s):
    return list(s.encode("utf-8"))


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ------------------------------------------------------------------ the loss mask


def test_prompt_response_mask_is_exactly_the_response_and_eos():
    ids, learn = nd.tokenize({"prompt": "Q: 2+2?\nA:", "response": " 4é"}, TOK)
    prompt, response = _bytes("Q: 2+2?\nA:"), _bytes(" 4é")
    assert ids.tolist() == prompt + response + [TOK.eos_token_id]
    assert learn.tolist() == [False] * len(prompt) + [True] * (len(response) + 1)
    ids, learn = nd.tokenize({"prompt": "a", "response": "b"}, TOK, eos_id=None)
    assert ids.tolist() == [97, 98] and learn.tolist() == [False, True]

    class SeveralEos(nd.ByteTokenizer):
        eos_token_id = (7, 8)  # as nj.models.hf.load_tokenizer gives for several stop ids

    ids, _ = nd.tokenize({"prompt": "a", "response": "b"}, SeveralEos())
    assert ids.tolist() == [97, 98, 7]


def test_simple_chat_template_learns_every_assistant_turn():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    ids, learn = nd.tokenize({"messages": msgs}, TOK)
    parts = [
        ("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", False),
        ("hello\n", True),
        ("<|user|>\nbye\n<|assistant|>\n", False),
        ("ciao\n", True),
    ]
    want_ids = [i for text, _ in parts for i in _bytes(text)] + [0]
    want_learn = [t for text, t in parts for _ in _bytes(text)] + [True]
    assert ids.tolist() == want_ids
    assert learn.tolist() == want_learn


def _hf_chat_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    vocab = {c: i for i, c in enumerate(byte_level.alphabet())}
    t = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = byte_level(add_prefix_space=False)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    tok.chat_template = (  # ChatML, as Qwen2's tokenizer_config.json has it (without system)
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def test_tokenizer_chat_template_masks_exactly_the_assistant_turns():
    tok = _hf_chat_tokenizer()
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "done"},
    ]
    ids, learn = nd.tokenize({"messages": msgs}, tok)
    # The reference: the whole conversation as transformers renders and tokenizes it,
    # and the assistant parts located by hand in ChatML.
    whole = tok.apply_chat_template(msgs, tokenize=False)
    assert ids.tolist() == tok.encode(whole, add_special_tokens=False)
    parts = [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>\n", True),
        ("<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n", False),
        ("done<|im_end|>\n", True),
    ]
    assert "".join(p for p, _ in parts) == whole
    want = [t for p, t in parts for _ in tok.encode(p, add_special_tokens=False)]
    assert learn.tolist() == want
    # template="simple" ignores the tokenizer's template
    ids_s, _ = nd.tokenize({"messages": msgs}, tok, template="simple")
    simple = "<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nand?\n<|assistant|>\ndone\n"
    assert ids_s.tolist() == [*tok.encode(simple, add_special_tokens=False), tok.eos_token_id]


def test_nnjax_hf_tokenizer_gives_the_same_ids_and_mask_as_transformers(tmp_path):
    pytest.importorskip("jinja2")
    tok = _hf_chat_tokenizer()
    tok.save_pretrained(tmp_path)
    ours = nj.models.hf.load_tokenizer(tmp_path)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "done"},
    ]
    for record in ({"messages": msgs}, {"prompt": "Q: 1+1\nA:", "response": " 2"}):
        ids, learn = nd.tokenize(record, ours)
        ref_ids, ref_learn = nd.tokenize(record, tok)
        assert ids.tolist() == ref_ids.tolist()
        assert learn.tolist() == ref_learn.tolist()
        assert learn.any() and not learn.all()


def test_template_that_rewrites_history_is_refused():
    tok = _hf_chat_tokenizer()
    tok.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(nj.DataError, match="prefix of the next"):
        nd.tokenize({"messages": msgs}, tok)


# ------------------------------------------------------------------------ packing


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(1, 50, n).astype(np.int32)
        learn = np.arange(n) >= n // 2
        out.append((ids, learn))
    return out


def test_pack_places_each_example_whole_with_its_targets():
    ex = _examples([5, 9, 3, 7, 2, 6])
    inputs, targets = nd.pack(ex, 12, pad_id=99)
    # next fit, in order: positions per example 4, 8 | 2, 6, 1 | 5
    assert inputs["segment_ids"].tolist() == [
        [1] * 4 + [2] * 8,
        [1] * 2 + [2] * 6 + [3] + [0] * 3,
        [1] * 5 + [0] * 7,
    ]
    where = [(0, 0), (0, 4), (1, 0), (1, 2), (1, 8), (2, 0)]
    for (ids, learn), (r, at) in zip(ex, where, strict=True):
        m = len(ids) - 1
        span = slice(at, at + m)
        np.testing.assert_array_equal(inputs["ids"][r, span], ids[:-1])
        np.testing.assert_array_equal(inputs["positions"][r, span], np.arange(m))
        want = [ids[i + 1] if learn[i + 1] else IGN for i in range(m)]
        assert targets[r, span].tolist() == want
    pad = inputs["segment_ids"] == 0
    assert (inputs["ids"][pad] == 99).all() and (targets[pad] == IGN).all()


def test_long_examples_truncated_or_split():
    (ids, learn), short = _examples([30, 4], seed=1)
    learn = np.ones(30, bool)
    inputs, targets = nd.pack([(ids, learn), short], 8, overflow="truncate")
    np.testing.assert_array_equal(inputs["ids"][0], ids[:8])
    np.testing.assert_array_equal(targets[0], ids[1:9])
    assert inputs["segment_ids"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    inputs, targets = nd.pack([(ids, learn), short], 8, overflow="split")
    # 29 positions -> pieces of 8, 8, 8, 5; the short one (3) fits beside the 5
    assert inputs["ids"].shape == (4, 8)
    np.testing.assert_array_equal(inputs["ids"][:3].ravel(), ids[:24])
    np.testing.assert_array_equal(inputs["ids"][3, :5], ids[24:29])
    np.testing.assert_array_equal(targets[:3].ravel(), ids[1:25])
    np.testing.assert_array_equal(targets[3, :5], ids[25:30])
    assert (inputs["positions"][:3] == np.arange(8)).all()
    assert inputs["positions"][3].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert inputs["segment_ids"][3].tolist() == [1] * 5 + [2] * 3


def _tiny_causal_lm(key, vocab=50, d=16, max_pos=32):
    """One attention layer that honours ``positions`` and ``segment_ids``: the test's reference."""
    k = jax.random.split(key, 6)
    p = {n: jax.random.normal(k[i], s) * 0.3 for i, (n, s) in enumerate(
        [("tok", (vocab, d)), ("pos", (max_pos, d)), ("q", (d, d)), ("k", (d, d)),
         ("v", (d, d)), ("out", (d, vocab))])}  # fmt: skip

    def apply(inputs):
        h = p["tok"][inputs["ids"]] + p["pos"][inputs["positions"]]  # (B, T, d)
        q, kk, v = h @ p["q"], h @ p["k"], h @ p["v"]
        seg = inputs["segment_ids"]
        t = jnp.arange(seg.shape[-1])
        allowed = (seg[:, :, None] == seg[:, None, :]) & (t[None, :] <= t[:, None])[None]
        scores = jnp.where(allowed, q @ kk.transpose(0, 2, 1) / jnp.sqrt(d), -jnp.inf)
        return (h + jax.nn.softmax(scores, -1) @ v) @ p["out"]

    return apply


def _alone(x):
    m = len(x)
    return {
        "ids": jnp.asarray(x)[None],
        "positions": jnp.arange(m)[None],
        "segment_ids": jnp.ones((1, m), jnp.int32),
    }


def _check_packed_equals_alone(apply, ex, seq_len):
    inputs, _ = nd.pack(ex, seq_len)
    packed = np.asarray(apply(jax.tree.map(jnp.asarray, inputs)))
    found = 0
    for r in range(len(packed)):
        seg = inputs["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            span = np.flatnonzero(seg == s)
            alone = np.asarray(apply(_alone(inputs["ids"][r, span])))[0]
            np.testing.assert_allclose(packed[r, span], alone, rtol=1e-5, atol=1e-5)
            found += 1
    assert found == len(ex)


def test_packed_row_logits_equal_each_example_alone_reference_attention():
    _check_packed_equals_alone(_tiny_causal_lm(jax.random.key(0)), _examples([5, 9, 3, 7, 2]), 16)


def test_packed_row_logits_equal_each_example_alone_causal_lm():
    if not hasattr(nj.models, "CausalLM"):
        pytest.skip("nj.models.CausalLM has not landed")
    cfg = nj.models.CausalLMConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, mlp_hidden=32
    )
    model = nj.models.CausalLM(cfg)
    ex = _examples([6, 9, 3, 7])
    spec = nd.pack(ex, 16)[0]
    params, state = model.init(jax.random.key(1), jax.tree.map(jnp.asarray, spec))
    _check_packed_equals_alone(lambda x: model.apply(params, state, x)[0], ex, 16)


# ----------------------------------------------------------- files, batches, errors


def test_instruct_batches_resume_exactly_after_rebuilding_from_the_file(tmp_path):
    records = [{"prompt": f"{i} + {i} =", "response": f" {2 * i}"} for i in range(40)]
    records += [{"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hey"}]}] * 5  # fmt: skip
    path = _write(tmp_path / "data.jsonl", records)
    full = list(nd.instruct_batches(path, TOK, 32, 3, seed=4, epochs=3))
    rebuilt = nd.instruct_batches(path, TOK, 32, 3, seed=4, epochs=3)
    for k in (0, 2, 5):
        tail = list(rebuilt.at(k))
        assert len(tail) == len(full) - k
        for a, b in zip(full[k:], tail, strict=True):
            jax.tree.map(np.testing.assert_array_equal, a, b)
    # the rows are exactly load_instruct's, shuffled per epoch by (seed, epoch)
    inputs, targets = nd.load_instruct(path, TOK, 32)
    order = np.random.default_rng((4, 0)).permutation(len(targets))
    np.testing.assert_array_equal(full[0][1], targets[order[:3]])
    np.testing.assert_array_equal(full[0][0]["ids"], inputs["ids"][order[:3]])


def test_masked_loss_counts_only_response_tokens():
    _inputs, targets = nd.load_instruct([{"prompt": "abc", "response": "de"}], TOK, 8)
    logits = jax.random.normal(jax.random.key(0), (1, 8, 256))
    loss = nj.losses.softmax_cross_entropy(logits, targets, ignore_index=IGN)
    logp = np.asarray(jax.nn.log_softmax(logits))[0]
    # inputs a b c d e -> learn d (at c), e (at d), eos (at e)
    want = -np.mean([logp[2, ord("d")], logp[3, ord("e")], logp[4, 0]])
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "data.jsonl:2: not valid JSON"),
        ('["a"]', "data.jsonl:2: expected a JSON object, got list"),
        ('{"prompt": "a"}', "data.jsonl:2: expected 'response' to be a string, got None"),
        ('{"text": "a"}', r"data.jsonl:2: expected keys 'prompt' and 'response', or 'messages'"),
        ('{"messages": []}', "data.jsonl:2: expected 'messages' to be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', r"data.jsonl:2: expected messages\[0\]"),
        (
            '{"messages": [{"role": "user", "content": "x"}]}',
            "data.jsonl:2: expected at least one message with role 'assistant'",
        ),
    ],
)
def test_malformed_records_name_the_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "data.jsonl", [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(nj.DataError, match=message):
        nd.instruct_batches(path, TOK, 16, 1)


def test_bad_arguments():
    ex = _examples([4])
    with pytest.raises(nj.ArgumentError, match="overflow: expected 'truncate' or 'split'"):
        nd.pack(ex, 8, overflow="drop")
    with pytest.raises(nj.ArgumentError, match="seq_len: expected an int >= 1, got 0"):
        nd.pack(ex, 0)
    with pytest.raises(nj.DataError, match="encode"):
        nd.tokenize({"prompt": "a", "response": "b"}, object())
    with pytest.raises(nj.DataError, match="no chat_template"):
        nd.tokenize(
            {"messages": [{"role": "assistant", "content": "b"}]}, TOK, template="tokenizer"
        )
