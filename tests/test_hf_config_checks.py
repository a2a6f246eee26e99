"""config.json, generation_config.json and adapter_config.json are input: each bad field is a
CheckpointError naming the file and the field, raised before any tensor is read."""

import json
import shutil

import jax
import jax.numpy as jnp
import pytest

import nnjax as nj
from nnjax.models import hf
from nnjax.models.hf import files, peft_adapters

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model folder with an adapter folder, both written by nnjax."""
    root = tmp_path_factory.mktemp("saved")
    config = hf.config_from_hf(LLAMA)
    params, _ = nj.models.CausalLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    hf.save_pretrained(root / "model", config, params)
    lora, _ = nj.finetune.add_lora(params, jax.random.key(1), "**/query/kernel", rank=2)
    hf.save_peft_adapter(root / "adapter", config, lora)
    return root, config, params


@pytest.fixture
def no_reads(monkeypatch):
    """Fail if a safetensors header or tensor is read: the checks come first."""

    def fail(*args, **kwargs):
        raise AssertionError("read weights before checking the config")

    for module in (files, peft_adapters):
        monkeypatch.setattr(module, "read_headers", fail)
        monkeypatch.setattr(module, "read_tensor", fail)
    monkeypatch.setattr(hf.pretrained, "read_headers", fail)


def _with(base, **change):
    out = {**base, **change}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()

BAD_CONFIGS = [
    ("{not json", r"config.json: not valid JSON"),
    ([1, 2], r"config.json: expected a JSON object, got list"),
    (_with(LLAMA, vocab_size=_DROP), r"config.json: lacks the field 'vocab_size'"),
    (_with(LLAMA, model_type=_DROP), r"config.json: lacks the field 'model_type'"),
    (_with(LLAMA, hidden_size="16"), r"config.json: field 'hidden_size': expected an int, got '16'"),
    (_with(LLAMA, num_hidden_layers=2.0), r"field 'num_hidden_layers': expected an int, got 2.0"),
    (_with(LLAMA, num_hidden_layers=True), r"field 'num_hidden_layers': expected an int, got True"),
    (_with(LLAMA, num_hidden_layers=-1), r"field 'num_hidden_layers': expected a value >= 1, got -1"),
    (_with(LLAMA, num_attention_heads=0), r"field 'num_attention_heads': expected a value >= 1, got 0"),
    (_with(LLAMA, num_key_value_heads=3), r"field 'num_key_value_heads': 3 does not divide num_attention_heads \(4\)"),
    (_with(LLAMA, hidden_size=18), r"field 'hidden_size': 18 is not divisible by the 4 heads"),
    (_with(LLAMA, rope_scaling={"rope_type": "wavy", "factor": 2.0}), r"field 'rope_scaling': rope_type 'wavy' is not one of"),
    (_with(LLAMA, hidden_act="swish2"), r"field 'hidden_act': activation 'swish2' is not one of"),
    (_with(LLAMA, rms_norm_eps=0), r"field 'rms_norm_eps': expected a value > 0, got 0"),
    (_with(LLAMA, rope_theta=float("nan")), r"field 'rope_theta': expected a finite number, got nan"),
    (_with(LLAMA, tie_word_embeddings="yes"), r"field 'tie_word_embeddings': expected true or false"),
    (_with(LLAMA, eos_token_id=-1), r"field 'eos_token_id': expected a token id >= 0 or a list of them, got -1"),
    (_with(LLAMA, rope_scaling=[1]), r"field 'rope_scaling': expected a dict, got \[1\]"),
    (_with(LLAMA, model_type="bert"), r"config.json: model_type 'bert' is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "match"), BAD_CONFIGS)
def test_bad_config_json_names_the_file_and_the_field_before_reading(
    saved, tmp_path, no_reads, config, match
):
    folder = tmp_path / "m"
    shutil.copytree(saved[0] / "model", folder)
    text = config if isinstance(config, str) else json.dumps(config, allow_nan=True)
    (folder / "config.json").write_text(text)
    with pytest.raises(nj.CheckpointError, match=match):
        hf.from_pretrained(folder)


def test_bad_generation_config_names_its_file(saved, tmp_path, no_reads):
    folder = tmp_path / "m"
    shutil.copytree(saved[0] / "model", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(
        nj.CheckpointError,
        match=r"generation_config.json: field 'eos_token_id': expected a token id",
    ):
        hf.from_pretrained(folder)
    (folder / "generation_config.json").write_text("[]")
    with pytest.raises(nj.CheckpointError, match=r"generation_config.json: expected a JSON object"):
        hf.from_pretrained(folder)


def test_bad_gpt2_config_json_names_the_field(tmp_path, no_reads):
    folder = tmp_path / "g"
    folder.mkdir()
    gpt2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 0}
    (folder / "config.json").write_text(json.dumps({**gpt2, "n_positions": 32}))
    with pytest.raises(
        nj.CheckpointError, match=r"config.json: field 'n_head': expected a value >= 1"
    ):
        hf.load_gpt2(folder)
    (folder / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(nj.CheckpointError, match=r"config.json: lacks the field 'n_positions'"):
        hf.from_pretrained(folder)


BAD_ADAPTER_CONFIGS = [
    ("{", r"adapter_config.json: not valid JSON"),
    ("[]", r"adapter_config.json: expected a JSON object, got list"),
    ({"r": _DROP}, r"adapter_config.json: lacks the field 'r'"),
    ({"r": 0}, r"adapter_config.json: field 'r': expected a value >= 1, got 0"),
    ({"r": "2"}, r"field 'r': expected an int, got '2'"),
    ({"lora_alpha": "16"}, r"field 'lora_alpha': expected a finite number, got '16'"),
    ({"use_rslora": "yes"}, r"field 'use_rslora': expected true or false"),
    ({"target_modules": 5}, r"field 'target_modules': expected a name or a list of names"),
    ({"alpha_pattern": {"q_proj": -1}}, r"field 'alpha_pattern'\['q_proj'\]: expected a value > 0"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "match"), BAD_ADAPTER_CONFIGS)
def test_bad_adapter_config_json_names_the_file_and_the_field_before_reading(
    saved, tmp_path, no_reads, change, match
):
    root, config, params = saved
    folder = tmp_path / "a"
    shutil.copytree(root / "adapter", folder)
    file = folder / "adapter_config.json"
    if isinstance(change, str):
        file.write_text(change)
    else:
        file.write_text(json.dumps(_with(json.loads(file.read_text()), **change)))
    with pytest.raises(nj.CheckpointError, match=match):
        hf.load_peft_adapter(folder, config, params)


def test_good_folders_still_load(saved):
    root, config, params = saved
    assert hf.from_pretrained(root / "model")[0] == config
    back = hf.load_peft_adapter(root / "adapter", config, params)
    assert back["blocks"]["stacked"]["attn"]["query"]["lora_a"].shape == (2, 16, 2)
