"""Saving HF folders never destroys what was there; bfloat16 saves; adapters are checked before reading.

The references are independent readers: ``safetensors.torch`` (bfloat16 bits),
``transformers`` (the folder loads), and the params saved before a failed save.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import hf
from nnjax.models.hf import files, peft_adapters

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

HF_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@pytest.fixture(scope="module")
def model():
    config = hf.config_from_hf(HF_CONFIG)
    init = nj.models.CausalLM(config).init
    old = init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[0]
    new = init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))[0]
    return config, old, new


def _same(a, b):
    """Bit-identical trees (same dtypes)."""
    fa, fb = nj.paths.flatten(a), nj.paths.flatten(b)
    assert sorted(fa) == sorted(fb)
    return all(
        fa[p].dtype == fb[p].dtype and np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))
        for p in fa
    )


def _weight_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(("model", ".old")))


def _bf16(params):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)


@pytest.mark.parametrize("shard", [None, "8KB"])
def test_bfloat16_save_pretrained_writes_the_bits_and_replaces_a_float32_model(
    model, tmp_path, shard
):
    """Before: ``cannot include dtype 'E' in a buffer`` after the old file was truncated."""
    config, old, new = model
    hf.save_pretrained(tmp_path, config, old)
    kw = {"max_shard_size": shard} if shard else {}
    written = hf.save_pretrained(tmp_path, config, _bf16(new), **kw)
    assert _weight_files(tmp_path) == sorted(written)
    torch_tensors = {}
    for name in written:
        if name.endswith(".safetensors"):
            torch_tensors.update(safetensors_torch.load_file(tmp_path / name))
    assert torch_tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    want = np.asarray(new["tok_embed"]["embedding"].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(torch_tensors["model.embed_tokens.weight"].float().numpy(), want)
    assert _same(hf.from_pretrained(tmp_path)[1], _bf16(new))
    transformers = pytest.importorskip("transformers")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(again.model.embed_tokens.weight.float().detach().numpy(), want)


def test_bfloat16_save_peft_adapter_writes_the_bits(model, tmp_path):
    config, old, _ = model
    lora, _ = nj.finetune.add_lora(_bf16(old), jax.random.key(2), "**/query/kernel", rank=2)
    hf.save_peft_adapter(tmp_path, config, lora)
    tensors = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert a.dtype == torch.bfloat16
    want = np.asarray(lora["blocks"]["stacked"]["attn"]["query"]["lora_a"][1], np.float32).T
    np.testing.assert_array_equal(a.float().numpy(), want)
    back = hf.load_peft_adapter(tmp_path, config, _bf16(old))
    np.testing.assert_array_equal(
        np.asarray(back["blocks"]["stacked"]["attn"]["query"]["lora_a"], np.float32),
        np.asarray(lora["blocks"]["stacked"]["attn"]["query"]["lora_a"], np.float32),
    )


def _fail_mid_write(monkeypatch):
    """A full disk: the second weight file stops half-way with ENOSPC."""
    real = files.write_file
    calls = []

    def write_file(path, tensors):
        calls.append(path)
        if len(calls) == 2 or len(tensors) == 1:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(28, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(files, "write_file", write_file)


@pytest.mark.parametrize("old_shard", [None, "8KB"])
@pytest.mark.parametrize("failure", ["disk full", "adapter shape", "dtype"])
def test_a_failed_save_pretrained_keeps_the_old_model_loadable(
    model, tmp_path, monkeypatch, old_shard, failure
):
    """Before: the old weight files were removed before the new set was complete."""
    config, old, new = model
    hf.save_pretrained(
        tmp_path, config, old, **({"max_shard_size": old_shard} if old_shard else {})
    )
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    if failure == "disk full":
        _fail_mid_write(monkeypatch)
        bad, match, error = new, "No space left", OSError
    elif failure == "adapter shape":
        bad, _ = nj.finetune.add_lora(new, jax.random.key(3), "**/query/kernel", rank=2)
        lora_b = bad["blocks"]["stacked"]["attn"]["query"]["lora_b"]
        bad["blocks"]["stacked"]["attn"]["query"]["lora_b"] = lora_b[:, :1]
        match = r"blocks/stacked/attn/query: expected adapter param 'lora_b'"
        error = nj.CheckpointError
    else:
        bad = jax.tree.map(lambda a: a.astype(jnp.float8_e4m3fnuz), new)
        match, error = "dtype float8_e4m3fnuz has no safetensors name", nj.CheckpointError
    with pytest.raises(error, match=match):
        hf.save_pretrained(tmp_path, config, bad, max_shard_size="8KB")
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert _same(hf.from_pretrained(tmp_path)[1], old)


class _CrashError(Exception):
    pass


@pytest.mark.parametrize(("old_shard", "new_shard"), [("8KB", "8KB"), (None, "8KB"), ("8KB", None)])
def test_save_pretrained_is_atomic_at_every_step_of_moving_files_in(
    model, tmp_path, monkeypatch, old_shard, new_shard
):
    """A crash after any rename, link or removal of the move-in leaves a folder that loads
    to the old params or the new ones, never a mix or nothing."""
    config, old, new = model
    kw_old = {"max_shard_size": old_shard} if old_shard else {}
    kw_new = {"max_shard_size": new_shard} if new_shard else {}
    outcomes = set()
    for k in range(1, 40):
        folder = tmp_path / f"f{k}"
        hf.save_pretrained(folder, config, old, **kw_old)
        count = [0]
        with monkeypatch.context() as m:
            for name in ("replace", "remove", "link"):
                real = getattr(os, name)

                def fake(*args, _real=real, _count=count, _k=k, **kwargs):
                    _count[0] += 1
                    if _count[0] == _k:
                        raise _CrashError
                    return _real(*args, **kwargs)

                m.setattr(os, name, fake)
            try:
                hf.save_pretrained(folder, config, new, **kw_new)
                done = True
            except _CrashError:
                done = False
        loaded = hf.from_pretrained(folder)[1]
        outcome = "new" if _same(loaded, new) else "old" if _same(loaded, old) else "mixed"
        assert outcome != "mixed", k
        outcomes.add(outcome)
        if done:
            assert outcome == "new"
            assert not [f for f in os.listdir(folder) if f.startswith(".")]
            break
    assert outcomes == {"old", "new"}


def test_save_peft_adapter_never_touches_the_models_weights(model, tmp_path):
    """Before: writing an adapter into a model's folder deleted ``model.safetensors``."""
    config, old, _ = model
    for shard in (None, "8KB"):
        folder = tmp_path / str(shard)
        hf.save_pretrained(folder, config, old, **({"max_shard_size": shard} if shard else {}))
        before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
        lora, _ = nj.finetune.add_lora(old, jax.random.key(4), "**/value/kernel", rank=2)
        assert hf.save_peft_adapter(folder, config, lora) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        after = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
        assert {f: after[f] for f in before} == before
        assert sorted(set(after) - set(before)) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert _same(hf.from_pretrained(folder)[1], old)
        hf.load_peft_adapter(folder, config, old)


@pytest.fixture
def dora_folder(model, tmp_path):
    config, old, _ = model
    dora, _ = nj.finetune.add_dora(old, jax.random.key(5), "**/query/kernel", rank=2)
    hf.save_peft_adapter(tmp_path, config, dora)
    return tmp_path


def _rewrite(folder, change):
    file = folder / "adapter_model.safetensors"
    tensors = safetensors_numpy.load_file(file)
    change(tensors)
    safetensors_numpy.save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def no_reads(monkeypatch):
    def read(name, info):
        raise AssertionError(f"read {name} before checking every tensor")

    monkeypatch.setattr(peft_adapters, "read_tensor", read)


MAGNITUDE = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
LORA_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {MAGNITUDE: np.ones(1, np.float32)},
            r"q_proj.lora_magnitude_vector has shape \(1,\), expected \(16,\)",
        ),
        (
            {MAGNITUDE: np.ones(17, np.float32)},
            r"q_proj.lora_magnitude_vector has shape \(17,\), expected \(16,\)",
        ),
        (
            {LORA_B: np.ones((16, 3), np.float32)},
            r"q_proj.lora_B.weight has shape \(16, 3\), expected \(16, 2\)",
        ),
        (
            {LORA_B: np.ones((16, 2), np.int32)},
            r"q_proj.lora_B.weight has dtype int32, expected a floating",
        ),
    ],
)
def test_load_peft_adapter_checks_every_tensor_against_the_model_before_reading(
    model, dora_folder, no_reads, change, match
):
    """Before: a DoRA magnitude ``(1,)`` was broadcast over all columns; a wrong length
    gave a raw NumPy error after other tensors were read."""
    config, old, _ = model
    _rewrite(dora_folder, lambda t: t.update(change))
    with pytest.raises(nj.CheckpointError, match=match):
        hf.load_peft_adapter(dora_folder, config, old)
