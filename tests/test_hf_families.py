"""from_pretrained / save_pretrained for every family against transformers' own models.

Each tiny random model is built once (module fixture); the reference for every number
is transformers (its logits, its greedy generate, its loading of nnjax's export).
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import hf
from tests import hf_tiny

pytest.importorskip("transformers", reason="transformers builds the reference models")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{family: (transformers model, its saved folder)}``."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in hf_tiny.FAMILIES:
        folder = root / family
        out[family] = (hf_tiny.build(family, folder), folder)
    return out


@pytest.fixture(scope="module")
def loaded(models):
    """``{family: (config, params)}`` loaded by nnjax."""
    return {family: hf.from_pretrained(folder) for family, (_, folder) in models.items()}


def _nnjax_logits(config, params, token_ids):
    return np.asarray(jax.jit(nj.models.CausalLM(config).apply)(params, {}, token_ids)[0])


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_same_logits_as_transformers(family, models, loaded):
    model, _ = models[family]
    config, params = loaded[family]
    token_ids = hf_tiny.ids((2, hf_tiny.SEQ))
    np.testing.assert_allclose(
        _nnjax_logits(config, params, token_ids),
        hf_tiny.logits(model, token_ids),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_greedy_generate_same_tokens_as_transformers(family, models, loaded):
    model, _ = models[family]
    config, params = loaded[family]
    prompt = hf_tiny.ids((2, 5), seed=1)
    with torch.no_grad():
        want = model.generate(
            torch.from_numpy(prompt).long(),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    got = nj.models.generate(config, params, prompt, 10, temperature=0.0)
    # a row ends at eos (2) and then pads (0), as transformers does; it stops once all rows end
    got = np.asarray(got)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert not got[:, want.shape[1] :].any()


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_export_loads_in_transformers_to_the_same_logits(family, models, loaded, tmp_path):
    import transformers

    model, _ = models[family]
    config, params = loaded[family]
    files = hf.save_pretrained(tmp_path, config, params, max_shard_size="16KB")
    assert "model.safetensors.index.json" in files and len(files) > 2  # sharded
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, value in again.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), want[name], err_msg=name)
    token_ids = hf_tiny.ids((1, hf_tiny.SEQ), seed=2)
    np.testing.assert_allclose(  # the reference runs eager attention, the reload sdpa
        hf_tiny.logits(again, token_ids), hf_tiny.logits(model, token_ids), rtol=1e-5, atol=1e-5
    )
    back_config, back = hf.from_pretrained(tmp_path)  # and nnjax reads its own export
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_config_mapping(loaded):
    llama, _ = loaded["llama"]
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 8)
    assert (llama.rope_theta, llama.rope_scaling, llama.tie_embeddings) == (500.0, None, False)
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 0)
    assert loaded["mistral"][0].sliding_window == 4
    assert loaded["qwen2"][0].qkv_bias and not loaded["qwen2"][0].out_bias
    assert loaded["qwen3"][0].qk_norm
    gemma = loaded["gemma"][0]
    assert gemma.norm_scale_plus_one and gemma.embed_scale and gemma.tie_embeddings
    assert gemma.activation == "gelu_pytorch_tanh"
    gpt2 = loaded["gpt2"][0]
    assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.tie_embeddings) == (
        "learned",
        "layer",
        "plain",
        True,
    )
    params = loaded["qwen2"][1]
    assert params["blocks"]["stacked"]["attn"]["key"]["kernel"].shape == (
        2,
        32,
        16,
    )  # (n, in, KV*hd)
    assert "lm_head" not in loaded["gemma"][1]
    assert pickle.loads(pickle.dumps(llama)) == llama  # configs travel to subprocesses
    assert llama.extra["model_type"] == "llama" and hash(llama) == hash(
        pickle.loads(pickle.dumps(llama))
    )


def test_config_rope_scaling_and_windows_from_config_json():
    base = hf_tiny.build("llama").config.to_dict()
    scaled = {
        **base,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    c = hf.config_from_hf(scaled)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == (
        ("factor", 8.0),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 8192),
        ("rope_type", "llama3"),
    )
    legacy = {
        **base,
        "rope_parameters": None,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    c = hf.config_from_hf(legacy)
    assert (c.rope_theta, c.rope_scaling) == (1e6, (("factor", 2.0), ("rope_type", "linear")))
    assert hf.config_from_hf(hf.config_to_hf(c)) == c  # written back both ways, read the same
    gen = hf.config_from_hf(base, {"eos_token_id": [2, 7]})
    assert gen.eos_token_id == (2, 7)
    qwen = hf_tiny.build(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0
    ).config
    assert hf.config_from_hf(qwen.to_dict()).sliding_window == 4
    mixed = hf.config_from_hf(
        {**qwen.to_dict(), "layer_types": ["full_attention", "sliding_attention"]}
    )
    assert mixed.layer_types == ("full_attention", "sliding_attention")
    assert mixed.kind_config("sliding_attention").sliding_window == 4
    assert mixed.kind_config("full_attention").sliding_window is None
    with pytest.raises(nj.CheckpointError, match=r"model_type 'bert' is not supported"):
        hf.config_from_hf({**base, "model_type": "bert"})
    c = hf.config_from_hf({**base, "model_type": "qwen2"})
    import dataclasses

    with pytest.raises(
        nj.CheckpointError, match=r"an HF qwen2 config cannot express qkv_bias=False"
    ):
        hf.config_to_hf(dataclasses.replace(c, qkv_bias=False))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_windows_on_some_layers_are_a_mixed_stack(family, tmp_path):
    """Qwen's max_window_layers: full attention below, a window above (transformers' own)."""
    import transformers

    model = hf_tiny.build(
        family, tmp_path / "m", num_hidden_layers=5, use_sliding_window=True, sliding_window=3,
        max_window_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    assert model.config.layer_types[1:3] == ["full_attention", "sliding_attention"]
    config, params = hf.from_pretrained(tmp_path / "m")
    assert sorted(params["blocks"]) == ["stacked", "stacked[2::1]"]  # layers 0-1, then 2-4
    token_ids = hf_tiny.ids((2, hf_tiny.SEQ))
    np.testing.assert_allclose(
        _nnjax_logits(config, params, token_ids), hf_tiny.logits(model, token_ids),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    prompt = hf_tiny.ids((2, 5), seed=1)
    with torch.no_grad():
        want = model.generate(
            torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False, pad_token_id=0
        ).numpy()
    got = np.asarray(nj.models.generate(config, params, prompt, 8, temperature=0.0))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    hf.save_pretrained(tmp_path / "out", config, params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.layer_types == model.config.layer_types
    np.testing.assert_allclose(
        hf_tiny.logits(again, token_ids), hf_tiny.logits(model, token_ids), rtol=1e-5, atol=1e-5
    )


def test_windowed_layers_keep_ring_caches_and_long_generation_needs_every_layer(loaded):
    import dataclasses

    config, params = loaded["gemma2"]  # sliding (window 4) and full layers alternate
    model = nj.models.CausalLM(config, decode=True)
    _, state = model.init(jax.random.key(0), jnp.zeros((2, 20), jnp.int32))
    attn = state["blocks"]
    assert attn["stacked[0::2]"]["attn"]["cached_key"].shape[:3] == (2, 2, 4)  # the window
    assert attn["stacked[1::2]"]["attn"]["cached_key"].shape[:3] == (2, 2, 20)  # everything
    short = dataclasses.replace(config, max_position=12)
    prompt = hf_tiny.ids((1, 8))
    with pytest.raises(nj.ArgumentError, match=r"max_position == 12"):
        nj.models.generate(short, params, prompt, 8, temperature=0.0)  # full layers cannot
    windowed = dataclasses.replace(short, layer_types=None, layer_kinds=None, sliding_window=4)
    out = nj.models.generate(windowed, _uniform(params), prompt, 8, temperature=0.0)
    assert np.asarray(out).shape == (1, 16)  # every layer windowed: past max_position


def _uniform(params):
    """A mixed stack's params restacked as one uniform stack (the same layers, in order)."""
    blocks = params["blocks"]
    a, b = blocks["stacked[0::2]"], blocks["stacked[1::2]"]
    both = jax.tree.map(lambda x, y: jnp.stack([x, y], 1).reshape(-1, *x.shape[1:]), a, b)
    return {**params, "blocks": {"stacked": both}}


def test_sharded_and_bf16_checkpoints(tmp_path):
    import transformers

    model = hf_tiny.build("llama", tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    config, params = hf.from_pretrained(tmp_path / "bf16")
    leaf = params["blocks"]["stacked"]["mlp"]["down"]["kernel"]
    assert leaf.dtype == jnp.bfloat16  # dtype=None: the checkpoint's
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    w = ref.model.layers[1].mlp.down_proj.weight.detach().T.contiguous().view(torch.int16).numpy()
    np.testing.assert_array_equal(np.asarray(leaf[1]).view(np.int16), w)  # bit for bit
    _, f32 = hf.from_pretrained(tmp_path / "bf16", dtype=jnp.float32)
    assert f32["blocks"]["stacked"]["mlp"]["down"]["kernel"].dtype == jnp.float32
    token_ids = hf_tiny.ids((2, hf_tiny.SEQ))
    np.testing.assert_allclose(  # the float32 model of the bf16-rounded weights
        _nnjax_logits(config, f32, token_ids),
        hf_tiny.logits(model, token_ids),
        rtol=1e-4,
        atol=1e-4,
    )


def test_placed_by_sharding_rules(models):
    mesh = nj.sharding.mesh({"data": 1, "model": 1})
    P = jax.sharding.PartitionSpec
    rules = {"**/attn/query/kernel": P(None, "model"), "**/attn/out/kernel": P("model"), "**": P()}
    _, params = hf.from_pretrained(models["llama"][1], mesh=mesh, rules=rules)
    q = params["blocks"]["stacked"]["attn"]["query"]["kernel"]
    assert q.sharding.spec == P(None, None, "model")
    assert params["blocks"]["stacked"]["attn"]["out"]["kernel"].sharding.spec == P(None, "model")
    assert params["tok_embed"]["embedding"].sharding.spec == P()
    with pytest.raises(ValueError, match=r"rules= needs mesh="):
        hf.from_pretrained(models["llama"][1], rules=rules)


def test_adapters_are_merged_on_export(models, loaded, tmp_path):
    import transformers

    config, params = loaded["qwen3"]
    lora, _ = nj.finetune.add_lora(params, jax.random.key(0), ["**/attn/*/kernel"], rank=2)
    flat = nj.core.paths.flatten(lora)
    for path in flat:
        if path.endswith("lora_b"):
            flat[path] = 0.3 * jax.random.normal(jax.random.key(1), flat[path].shape)
    lora = nj.core.paths.unflatten(flat)
    with pytest.raises(nj.CheckpointError, match=r"params hold adapters at .*save_peft_adapter"):
        hf.save_pretrained(tmp_path / "no", config, lora, merge_adapters=False)
    hf.save_pretrained(tmp_path / "m", config, lora)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    a = np.asarray(flat["blocks/stacked/attn/value/lora_a"][1])
    b = np.asarray(flat["blocks/stacked/attn/value/lora_b"][1])
    kernel = np.asarray(params["blocks"]["stacked"]["attn"]["value"]["kernel"][1])
    np.testing.assert_allclose(
        again.model.layers[1].self_attn.v_proj.weight.detach().numpy(),
        (kernel + a @ b).T,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kernels_are_exported_dequantized(loaded, tmp_path, bits):
    import transformers

    config, params = loaded["qwen2"]
    quantized = nj.finetune.quantize(params, "**/mlp/*/kernel", bits=bits, block_size=32)
    lora, _ = nj.finetune.add_lora(quantized, jax.random.key(0), "**/mlp/down/kernel", rank=2)
    hf.save_pretrained(tmp_path, config, lora)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    want = nj.finetune.dequantize(quantized)["blocks"]["stacked"]["mlp"]  # lora_b = 0: no change
    for name in ("up", "down"):
        got = getattr(again.model.layers[1].mlp, f"{name}_proj").weight.detach().numpy()
        np.testing.assert_allclose(got, np.asarray(want[name]["kernel"][1]).T, rtol=1e-6, atol=1e-7)
