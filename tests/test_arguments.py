"""Arguments by principle across the public API: a float where an int is meant, a bool where a
number is meant, zero or negative sizes, strings where ids are meant, ids outside the vocabulary
are each an ArgumentError naming the argument, raised before any work; NumPy and JAX scalars
of the same number are accepted alike (the reference: the call with the Python number)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax import data as nd
from nnjax.models import hf

CFG = nj.models.CausalLMConfig(
    vocab_size=16, hidden_size=16, num_heads=2, mlp_hidden=8, max_position=16
)


@pytest.fixture(scope="module")
def params():
    return nj.models.CausalLM(CFG).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))[0]


PROMPT = np.array([[1, 2, 3]], np.int32)


@pytest.mark.parametrize(
    ("name", "alike"),
    [
        ("temperature", [np.float32(0.7), jnp.float32(0.7), np.float64(0.7)]),
        ("top_k", [np.int64(3), jnp.int32(3), np.int8(3)]),
        ("top_p", [np.float32(0.9), jnp.float32(0.9)]),
        ("max_new_tokens", [np.int64(3), jnp.int32(3)]),
        ("eos_token_id", [np.int64(5), jnp.int32(5), [np.int32(5)], jnp.array([5])]),
    ],
)
def test_generate_takes_numpy_and_jax_scalars_as_the_same_number(params, name, alike):
    python = {"temperature": 0.7, "top_k": 3, "top_p": 0.9, "max_new_tokens": 3, "eos_token_id": 5}
    kw = {"temperature": 0.7, "max_new_tokens": 3, "rng": jax.random.key(1)}
    want = nj.models.generate(CFG, params, PROMPT, **{**kw, name: python[name]})
    for value in alike:
        got = nj.models.generate(CFG, params, PROMPT, **{**kw, name: value})
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"temperature": True}, r"temperature: expected a finite number >= 0, got True"),
        ({"temperature": "1"}, r"temperature: expected a finite number >= 0, got '1'"),
        ({"top_p": True}, r"top_p: expected a finite number in \(0, 1\], got True"),
        ({"top_p": np.float32(np.nan)}, r"top_p: expected a finite number in \(0, 1\]"),
        ({"top_k": 2.0}, r"top_k: expected an int >= 1, got 2.0"),
        ({"top_k": True}, r"top_k: expected an int >= 1, got True"),
        ({"max_new_tokens": jnp.float32(2)}, r"max_new_tokens: expected an int >= 1"),
        ({"max_new_tokens": 0}, r"max_new_tokens: expected an int >= 1, got 0"),
        ({"eos_token_id": "2"}, r"eos_token_id: expected token ids in \[0, 16\), got '2'"),
        ({"eos_token_id": 2.0}, r"eos_token_id: expected token ids in \[0, 16\), got 2.0"),
        ({"eos_token_id": [1, 16]}, r"eos_token_id: expected token ids in \[0, 16\)"),
        ({"pad_token_id": -1}, r"pad_token_id: expected token ids in \[0, 16\), got -1"),
        ({"rng": 0}, r"rng: expected a PRNG key"),
    ],
)
def test_generate_and_make_generate_refuse_bad_arguments_naming_them(params, bad, match):
    kw = {"temperature": 0.7, "max_new_tokens": 2, "rng": jax.random.key(1), **bad}
    with pytest.raises(nj.ArgumentError, match=match):
        nj.models.generate(CFG, params, PROMPT, **kw)
    rng = kw.pop("rng")
    if "rng" in bad:
        with pytest.raises(nj.ArgumentError, match=match):
            nj.models.make_generate(CFG, **kw)(params, PROMPT, rng)
        return
    with pytest.raises(nj.ArgumentError, match=match):
        nj.models.make_generate(CFG, **kw)


def test_generate_refuses_strings_and_out_of_vocabulary_prompts(params):
    with pytest.raises(nj.ArgumentError, match=r"prompt_ids: expected integer ids of shape"):
        nj.models.generate(CFG, params, np.array([["a", "b"]]), 2, temperature=0)
    with pytest.raises(nj.ArgumentError, match=r"prompt_ids: expected ids in \[0, 16\)"):
        nj.models.generate(CFG, params, np.array([[1, 99]]), 2, temperature=0)


def test_quantize_bits_and_block_size_by_principle():
    params = {"d": {"kernel": np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)}}
    want = nj.finetune.quantize(params, "d/kernel", bits=4, block_size=16)
    for bits, block in [(np.int64(4), np.int32(16)), (jnp.int32(4), jnp.int16(16))]:
        got = nj.finetune.quantize(params, "d/kernel", bits=bits, block_size=block)
        np.testing.assert_array_equal(got["d"]["kernel"], want["d"]["kernel"])
    for bits in (4.0, True, "4"):
        with pytest.raises(nj.ArgumentError, match=r"quantize: bits: expected an int >= 1"):
            nj.finetune.quantize(params, "d/kernel", bits=bits)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"max_shard_size": True}, r"max_shard_size: expected an int >= 1, got True"),
        ({"max_shard_size": 0}, r"max_shard_size: expected an int >= 1, got 0"),
        ({"max_shard_size": 1.5e6}, r"max_shard_size: expected an int >= 1, got 1500000.0"),
        ({"max_shard_size": "5XB"}, r"max_shard_size: expected bytes or '500MB' / '2GiB'"),
        ({"max_shard_size": "0MB"}, r"max_shard_size: expected an int >= 1, got 0"),
        ({"merge_adapters": "yes"}, r"merge_adapters: expected True or False, got 'yes'"),
    ],
)
def test_save_pretrained_refuses_bad_arguments_before_writing(params, tmp_path, bad, match):
    config = hf.config_from_hf(
        {"model_type": "llama", "vocab_size": 16, "hidden_size": 16, "intermediate_size": 8,
         "num_hidden_layers": 2, "num_attention_heads": 2}
    )  # fmt: skip
    p = nj.models.CausalLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[0]
    with pytest.raises(nj.ArgumentError, match=match):
        hf.save_pretrained(tmp_path / "out", config, p, **bad)
    assert not os.path.exists(tmp_path / "out")
    hf.save_pretrained(tmp_path / "np", config, p, max_shard_size=np.int64(4000))
    hf.save_pretrained(tmp_path / "py", config, p, max_shard_size=4000)
    assert sorted(os.listdir(tmp_path / "np")) == sorted(os.listdir(tmp_path / "py"))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"step": True}, r"save: step: expected an int >= 0, got True"),
        ({"step": 1.0}, r"save: step: expected an int >= 0, got 1.0"),
        ({"step": -1}, r"save: step: expected an int >= 0, got -1"),
        ({"keep": 0}, r"save: keep: expected an int >= 1, got 0"),
        ({"keep": 2.0}, r"save: keep: expected an int >= 1, got 2.0"),
        ({"blocking": "no"}, r"save: blocking: expected True or False, got 'no'"),
        ({"extra": [1]}, r"save: extra must be a dict, got list"),
        ({"extra": {"f": object()}}, r"save: extra must be JSON-able"),
    ],
)
def test_checkpoint_save_refuses_bad_arguments_before_writing(tmp_path, bad, match):
    with pytest.raises(nj.ArgumentError, match=match):
        nj.checkpoint.save(tmp_path / "run", {"w": jnp.ones(2)}, **{"step": 1, **bad})
    assert nj.checkpoint.latest(tmp_path / "run") is None


def test_checkpoint_save_takes_numpy_and_jax_steps_alike(tmp_path):
    for step in (np.int64(3), jnp.int32(4), 5):
        path = nj.checkpoint.save(tmp_path, {"w": jnp.ones(2)}, step=step, keep=np.int64(5))
        assert path.endswith(f"step_{int(step):06d}")
    assert [s for s, _ in nj.checkpoint.all_steps(tmp_path)] == [3, 4, 5]


def test_instruction_packing_arguments_and_data_with_nothing_to_learn():
    tok = nd.ByteTokenizer()
    records = [{"prompt": "a long prompt " * 3, "response": "ok"}] * 4
    with pytest.raises(nj.ArgumentError, match=r"seq_len: expected an int >= 1, got 8.0"):
        nd.load_instruct(records, tok, 8.0)
    with pytest.raises(nj.ArgumentError, match=r"pad_id: expected an int >= 0, got -1"):
        nd.load_instruct(records, tok, 64, pad_id=-1)
    with pytest.raises(nj.ArgumentError, match=r"eos_id: expected an int >= 0, got '0'"):
        nd.load_instruct(records, tok, 64, eos_id="0")
    with pytest.raises(
        nj.DataError,
        match=r"nothing to learn: no target is left in any of the 4 example\(s\) \(every "
        r"response was truncated away at seq_len == 16",
    ):
        nd.load_instruct(records, tok, 16)
    _, targets = nd.load_instruct(records, tok, np.int64(16), overflow="split")
    assert (targets != nd.IGNORE_INDEX).sum() == 4 * 3  # "ok" and the end-of-sequence id
    with pytest.raises(nj.ArgumentError, match=r"batch_size: expected an int >= 1, got 2.0"):
        nd.instruct_batches(records, tok, 64, 2.0)
