import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import generate, hf
from nnjax.models.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=32)


def _ids(shape, vocab=100, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@pytest.fixture
def hf_model(torch, tmp_path):
    """A small random GPT-2 (as minGPT's test), saved with save_pretrained (safetensors)."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers (test-only) is the GPT-2 reference"
    )
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, initializer_range=0.2
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "gpt2")
    assert (tmp_path / "gpt2" / "model.safetensors").exists()
    return transformers, model, tmp_path / "gpt2"


def test_gpt2_from_transformers_same_logits_generation_and_export(torch, hf_model, tmp_path):
    transformers, model, folder = hf_model
    config, params = hf.load_gpt2(folder)
    assert config == TINY
    ids = _ids((2, 12))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits.numpy()
    logits, _ = jax.jit(GPT(config).apply)(params, {}, ids)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)

    prompt = ids[:, :5]
    with torch.no_grad():
        ref_gen = model.generate(
            torch.from_numpy(prompt).long(),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(generate(config, params, prompt, 20, temperature=0), ref_gen)

    # export back: the same state dict, bit for bit; a saved folder transformers loads
    exported = hf.params_to_gpt2(params, config)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(exported) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    hf.save_gpt2(tmp_path / "back", config, params)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    for name, value in again.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), want[name], err_msg=name)

    # a torch state dict loads as well (GPT2Model names, no prefix)
    _, from_sd = hf.load_gpt2(model.transformer.state_dict(), config)
    jax.tree.map(np.testing.assert_array_equal, from_sd, params)


def _state_dict(seed=0):
    params = GPT(TINY).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))[0]
    return params, hf.params_to_gpt2(params, TINY)


def test_gpt2_round_trip_and_shape_checks(tmp_path):
    params, sd = _state_dict()
    # names and layouts as GPT-2's: Conv1D (in, out), q|k|v fused along out
    assert sd["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)
    np.testing.assert_array_equal(
        sd["transformer.h.1.attn.c_attn.weight"][:, 32:64],
        params["blocks"]["stacked"]["attn"]["key"]["kernel"][1],
    )
    np.testing.assert_array_equal(sd["lm_head.weight"], params["tok_embed"]["embedding"])
    hf.save_gpt2(tmp_path / "m", TINY, params)
    config, back = hf.load_gpt2(tmp_path / "m")
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, back, params)
    _, back_file = hf.load_gpt2(tmp_path / "m" / "model.safetensors", TINY)
    jax.tree.map(np.testing.assert_array_equal, back_file, params)

    bad = dict(sd)
    bad["transformer.h.0.attn.c_attn.weight"] = np.zeros((32, 64), np.float32)
    with pytest.raises(
        nj.CheckpointError,
        match=r"state dict: tensor 'transformer.h.0.attn.c_attn.weight' -> blocks/0/attn/query/kernel: "
        r"expected shape \(32, 96\), got \(32, 64\)",
    ):
        hf.gpt2_to_params(bad, TINY)
    missing = {k: v for k, v in sd.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(
        nj.CheckpointError, match=r"missing tensor\(s\) \['transformer.ln_f.bias'\]"
    ):
        hf.gpt2_to_params(missing, TINY)
    with pytest.raises(
        nj.CheckpointError, match=r"unexpected tensor\(s\) \['transformer.h.2.ln_1.weight'\]"
    ):
        hf.gpt2_to_params({**sd, "h.2.ln_1.weight": np.ones(32)}, TINY)
    with pytest.raises(ValueError, match=r"pass config="):
        hf.load_gpt2(sd)
    # adapters are merged on export: the same tensors as merging first (NumPy's sum)
    lora, _ = nj.finetune.add_lora(params, jax.random.key(1), rank=2)
    flat = nj.core.paths.flatten(lora)
    b = "blocks/stacked/attn/query/lora_b"
    flat[b] = jax.random.normal(jax.random.key(2), flat[b].shape)
    lora = nj.core.paths.unflatten(flat)
    exported = hf.params_to_gpt2(lora, TINY)
    a = np.asarray(flat["blocks/stacked/attn/query/lora_a"][1])
    want = np.asarray(params["blocks"]["stacked"]["attn"]["query"]["kernel"][1]) + a @ np.asarray(
        flat[b][1]
    )
    np.testing.assert_allclose(
        exported["transformer.h.1.attn.c_attn.weight"][:, :32], want, rtol=1e-5, atol=1e-6
    )


def test_gpt2_config_from_a_config_json():
    cfg = hf.gpt2_config(
        {
            "vocab_size": 50257,
            "n_positions": 1024,
            "n_layer": 12,
            "n_head": 12,
            "n_embd": 768,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "n_inner": None,
        }
    )
    assert cfg == GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    # GPT-2 small plans without memory: 124M params
    shapes, _ = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert nj.paths.count_params(shapes) == 124_439_808


@pytest.mark.parametrize("field", ["vocab_size", "n_positions", "n_layer", "n_head", "n_embd"])
def test_gpt2_config_without_a_size_field_names_it(field):
    sizes = {"vocab_size": 16, "n_positions": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}
    del sizes[field]
    with pytest.raises(ValueError, match=f"gpt2_config: the config has no '{field}'"):
        hf.gpt2_config(sizes)


def test_load_torch_state_dict_linear_and_conv(torch):
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = nj.serial(nj.Dense(8), jax.nn.relu, nj.Dense(3))
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 5)))
    name_map = {
        "0.weight": "dense_0/kernel",
        "0.bias": "dense_0/bias",
        "2.weight": "dense_1/kernel",
        "2.bias": "dense_1/bias",
    }
    loaded = hf.load_torch_state_dict(params, net.state_dict(), name_map)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.apply(loaded, {}, x)[0], ref, rtol=1e-5, atol=1e-6)
    back = hf.to_torch_state_dict(loaded, name_map)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy())

    conv = torch.nn.Conv2d(3, 4, (3, 2))
    layer = nj.Conv(4, (3, 2), padding="VALID")
    p, _ = layer.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    p = hf.load_torch_state_dict(p, conv.state_dict(), {"weight": "kernel", "bias": "bias"})
    img = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = conv(torch.from_numpy(img)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(layer.apply(p, {}, img.transpose(0, 2, 3, 1))[0], ref, atol=1e-5)


def test_load_torch_state_dict_stacked_copies_and_errors(torch):
    model = nj.repeat(nj.Dense(4), 3)
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    lin = torch.nn.Linear(4, 4)
    sd = {"layers.1.weight": lin.weight, "layers.1.bias": lin.bias}
    loaded = hf.load_torch_state_dict(
        params, sd, {"layers.1.weight": "1/kernel", "layers.1.bias": "1/bias"}, strict=False
    )
    kernel = np.asarray(loaded["stacked"]["kernel"])
    np.testing.assert_array_equal(kernel[1], lin.weight.detach().numpy().T)
    np.testing.assert_array_equal(kernel[[0, 2]], np.asarray(params["stacked"]["kernel"])[[0, 2]])

    with pytest.raises(
        nj.CheckpointError,
        match=r"tensor 'layers.1.weight' -> 1/kernel: expected shape \(4, 4\), got \(5, 4\)",
    ):
        hf.load_torch_state_dict(
            params,
            {"layers.1.weight": np.zeros((4, 5))},
            {"layers.1.weight": "1/kernel"},
            strict=False,
        )
    with pytest.raises(
        nj.CheckpointError,
        match=r"no tensor for param\(s\) \['0/bias', '2/bias', '0/kernel', '2/kernel'\]",
    ):
        hf.load_torch_state_dict(
            params, sd, {"layers.1.weight": "1/kernel", "layers.1.bias": "1/bias"}
        )
    with pytest.raises(nj.CheckpointError, match=r"\['layers.1.bias'\] have no entry in name_map"):
        hf.load_torch_state_dict(params, sd, {"layers.1.weight": "1/kernel"})
    with pytest.raises(
        nj.CheckpointError, match=r"map to path\(s\) \['7/kernel'\] that are not params"
    ):
        hf.load_torch_state_dict(params, sd, {"layers.1.weight": "7/kernel"}, strict=False)
    with pytest.raises(
        nj.CheckpointError, match=r"tensor\(s\) \['nope'\] that are not in the state dict"
    ):
        hf.load_torch_state_dict(params, sd, {"nope": "1/kernel"}, strict=False)
    with pytest.raises(ValueError, match=r"transform must be one of"):
        hf.load_torch_state_dict(
            params, sd, {"layers.1.weight": ("1/kernel", "flip")}, strict=False
        )
    # "none": the tensor as it is (GPT-2's Conv1D is already (in, out))
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    kept = hf.load_torch_state_dict(params, {"w": w}, {"w": ("2/kernel", "none")}, strict=False)
    np.testing.assert_array_equal(kept["stacked"]["kernel"][2], w)


def test_load_gpt2_and_from_pretrained_read_one_config_and_the_same_weights(hf_model):
    import dataclasses
    import json

    from nnjax.models.gpt import causal_lm_config

    _, _, folder = hf_model
    gpt_config, gpt_params = hf.load_gpt2(folder)
    config, params = hf.from_pretrained(folder)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    ids["initializer_range"] = 0.02  # for training from scratch; GPTConfig does not hold it
    assert dataclasses.replace(config, **ids) == dataclasses.replace(
        causal_lm_config(gpt_config), **ids
    )
    for a, b in zip(jax.tree.leaves(gpt_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    hf_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf_json, "add_cross_attention": True}))
    for load in (hf.load_gpt2, hf.from_pretrained):  # one reader: both refuse, alike
        with pytest.raises(nj.CheckpointError, match="add_cross_attention=True is not supported"):
            load(folder)
