"""PEFT adapter folders both ways, against the real ``peft`` library on a tiny transformers Llama."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import hf
from tests import hf_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama folder and nnjax's ``(config, params)`` of it."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("base")
    hf_tiny.build("llama", folder)
    return (folder, *hf.from_pretrained(folder))


def _hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _randomise(params, seed=1):
    """Non-zero ``lora_b`` (and a changed DoRA magnitude), so the adapters change the outputs."""
    flat = nj.core.paths.flatten(params)
    for k, path in enumerate(sorted(flat)):
        key = jax.random.key(seed + k)
        if path.endswith("lora_b"):
            flat[path] = 0.3 * jax.random.normal(key, flat[path].shape)
        if path.endswith("dora_magnitude"):
            flat[path] = flat[path] * (1 + 0.2 * jax.random.uniform(key, flat[path].shape))
    return nj.core.paths.unflatten(flat)


def _nnjax_logits(config, params, token_ids):
    return np.asarray(jax.jit(nj.models.CausalLM(config).apply)(params, {}, token_ids)[0])


def _merged(config, params):
    """nnjax's export of the params with adapters merged: ``{HF name: array}``."""
    from nnjax.models.hf.convert import params_to_tensors
    from nnjax.models.hf.pretrained import param_template

    table = hf.FAMILIES[config.family].table
    tensors = params_to_tensors(params, table, config, param_template(config))
    return {t.name: t.produce() for t in tensors}


def _agrees_with_peft(model, folder, config, adapted, token_ids):
    """nnjax's logits and merged weights equal peft's, and the adapters change the logits."""
    want = hf_tiny.logits(model.eval(), token_ids)
    assert np.abs(want - hf_tiny.logits(_hf_model(folder), token_ids)).max() > 1e-2  # it matters
    np.testing.assert_allclose(
        _nnjax_logits(config, adapted, token_ids), want, rtol=1e-4, atol=1e-4
    )
    merged = model.merge_and_unload().state_dict()
    for name, value in _merged(config, adapted).items():
        np.testing.assert_allclose(merged[name].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_nnjax_adapter_loads_in_peft_to_the_same_logits(kind, base, tmp_path):
    folder, config, params = base
    add = nj.finetune.add_dora if kind == "dora" else nj.finetune.add_lora
    targets = ["**/attn/query/kernel", "**/attn/value/kernel", "**/mlp/down/kernel"]
    adapted = _randomise(add(params, jax.random.key(0), targets, rank=4, alpha=8.0)[0])
    assert hf.save_peft_adapter(tmp_path, config, adapted) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (saved["r"], saved["lora_alpha"], saved["use_dora"]) == (4, 4, kind == "dora")
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path).eval()
    _agrees_with_peft(model, folder, config, adapted, hf_tiny.ids((2, hf_tiny.SEQ)))
    back = hf.load_peft_adapter(tmp_path, config, params)  # and back, bit for bit
    jax.tree.map(np.testing.assert_array_equal, back, adapted)


def test_peft_made_adapter_loads_in_nnjax_to_the_same_logits(base, tmp_path):
    folder, config, params = base
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        use_rslora=True,  # scale alpha / sqrt(r)
        alpha_pattern={"k_proj": 4},
        rank_pattern={"o_proj": 2},
        layers_to_transform=[1],  # layer 0 has none: nnjax gives it zeros
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(_hf_model(folder), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    adapted = hf.load_peft_adapter(tmp_path, config, params)
    attn = adapted["blocks"]["stacked"]["attn"]
    assert attn["out"]["lora_a"].shape == (2, 32, 2) and attn["query"]["lora_a"].shape == (2, 32, 4)
    assert not np.any(np.asarray(attn["query"]["lora_b"][0]))
    _agrees_with_peft(model, folder, config, adapted, hf_tiny.ids((2, hf_tiny.SEQ), seed=3))


def test_errors(base, tmp_path):
    _, config, params = base
    with pytest.raises(nj.CheckpointError, match=r"params hold no adapters"):
        hf.save_peft_adapter(tmp_path, config, params)
    ia3, _ = nj.finetune.add_ia3(params)
    with pytest.raises(
        nj.CheckpointError, match=r"adapters at \['blocks/stacked/attn/key'.*no PEFT LoRA"
    ):
        hf.save_peft_adapter(tmp_path, config, ia3)
    with pytest.raises(nj.CheckpointError, match=r"adapter_config.json does not exist"):
        hf.load_peft_adapter(tmp_path, config, params)
    lora, _ = nj.finetune.add_lora(params, jax.random.key(0), rank=2)
    hf.save_peft_adapter(tmp_path, config, lora)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(
        nj.CheckpointError, match=r"adapter_config.json: lora_bias=True is not supported"
    ):
        hf.load_peft_adapter(tmp_path, config, params)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    small = dataclasses.replace(config, num_layers=1)
    with pytest.raises(
        nj.CheckpointError,
        match=r"tensor 'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight' is not a "
        r"LoRA tensor of a module of this model",
    ):
        hf.load_peft_adapter(tmp_path, small, params)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 folder (n_embd 32, 2 layers, 4 heads) and nnjax's ``(config, params)``."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("gpt2")
    hf_tiny.build("gpt2", folder, vocab_size=64)
    return (folder, *hf.from_pretrained(folder))


def test_gpt2_nnjax_adapter_loads_in_peft_to_the_same_logits(gpt2, tmp_path):
    folder, config, params = gpt2
    targets = ["**/attn/query/kernel", "**/attn/value/kernel", "**/attn/out/kernel"]
    targets += ["**/mlp/fc/kernel", "**/mlp/proj/kernel"]
    adapted = _randomise(nj.finetune.add_lora(params, jax.random.key(0), targets, rank=4)[0])
    hf.save_peft_adapter(tmp_path, config, adapted)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert (saved["r"], saved["rank_pattern"], saved["fan_in_fan_out"]) == (4, {"c_attn": 12}, True)
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path).eval()
    state = model.state_dict()
    a = state["base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight"]
    b = state["base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight"]
    assert (tuple(a.shape), tuple(b.shape)) == ((12, 32), (96, 12))
    assert not b[32:64].any()  # no key adapter: its block of B is zero
    _agrees_with_peft(model, folder, config, adapted, hf_tiny.ids((2, hf_tiny.SEQ)) % 64)
    back = hf.load_peft_adapter(tmp_path, config, params)  # and back: the same updates
    for part in ("query", "key", "value", "out"):
        got, ref = back["blocks"]["stacked"]["attn"][part], adapted["blocks"]["stacked"]["attn"]
        delta = np.asarray(got["lora_a"] @ got["lora_b"])
        want_delta = (
            np.asarray(ref[part]["lora_a"] @ ref[part]["lora_b"]) if part != "key" else 0 * delta
        )
        np.testing.assert_allclose(delta, want_delta, rtol=1e-6, atol=1e-6, err_msg=part)


def test_gpt2_peft_made_adapter_loads_in_nnjax_to_the_same_logits(gpt2, tmp_path):
    folder, config, params = gpt2
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={"c_fc": 2},
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(_hf_model(folder), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0, 0.3)
    model.save_pretrained(tmp_path)
    adapted = hf.load_peft_adapter(tmp_path, config, params)
    blocks = adapted["blocks"]["stacked"]
    assert blocks["attn"]["key"]["lora_b"].shape == (2, 4, 32)
    assert blocks["mlp"]["fc"]["lora_a"].shape == (2, 32, 2)
    _agrees_with_peft(model, folder, config, adapted, hf_tiny.ids((2, hf_tiny.SEQ), seed=3) % 64)


def test_gpt2_dora_on_fused_c_attn_is_refused(gpt2, tmp_path):
    _, config, params = gpt2
    dora, _ = nj.finetune.add_dora(params, jax.random.key(0), ["**/attn/query/kernel"], rank=2)
    with pytest.raises(nj.CheckpointError, match=r"DoRA on the fused .*h\.0\.attn\.c_attn"):
        hf.save_peft_adapter(tmp_path, config, dora)
    assert not (tmp_path / "adapter_config.json").exists()  # refused before writing


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """A tiny Gemma 2 folder (alternating window layers: a mixed stack) and nnjax's load of it."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("gemma2")
    hf_tiny.build("gemma2", folder)
    return (folder, *hf.from_pretrained(folder))


def test_gemma2_adapters_both_ways_with_peft(gemma2, tmp_path):
    folder, config, params = gemma2
    assert sorted(params["blocks"]) == ["stacked[0::2]", "stacked[1::2]"]
    targets = ["**/attn/query/kernel", "**/attn/value/kernel", "**/mlp/down/kernel"]
    adapted = _randomise(nj.finetune.add_lora(params, jax.random.key(0), targets, rank=4)[0])
    hf.save_peft_adapter(tmp_path / "nnjax", config, adapted)
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path / "nnjax").eval()
    ids = hf_tiny.ids((2, hf_tiny.SEQ))
    _agrees_with_peft(model, folder, config, adapted, ids)
    back = hf.load_peft_adapter(tmp_path / "nnjax", config, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapted)
    lora = peft.LoraConfig(  # and peft's own adapter on some layers of each kind
        r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj"],
        layers_to_transform=[1, 2], task_type="CAUSAL_LM",
    )  # fmt: skip
    made = peft.get_peft_model(_hf_model(folder), lora)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    made.save_pretrained(tmp_path / "peft")
    loaded = hf.load_peft_adapter(tmp_path / "peft", config, params)
    assert not np.any(np.asarray(loaded["blocks"]["stacked[0::2]"]["attn"]["key"]["lora_b"][0]))
    assert np.any(np.asarray(loaded["blocks"]["stacked[0::2]"]["attn"]["key"]["lora_b"][1]))
    _agrees_with_peft(made, folder, config, loaded, hf_tiny.ids((2, hf_tiny.SEQ), seed=3))


def test_phi3_fused_qkv_and_gate_up_adapters_both_ways_with_peft(tmp_path):
    """Phi-3's qkv_proj is q | k | v of unequal widths (grouped-query k/v), gate_up_proj gate | up."""
    torch.set_num_threads(1)
    folder = tmp_path / "phi3"
    hf_tiny.build("phi3", folder)
    config, params = hf.from_pretrained(folder)
    targets = ["**/attn/query/kernel", "**/attn/value/kernel", "**/mlp/up/kernel"]
    adapted = _randomise(nj.finetune.add_lora(params, jax.random.key(0), targets, rank=2)[0])
    hf.save_peft_adapter(tmp_path / "nnjax", config, adapted)
    saved = json.loads((tmp_path / "nnjax" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["gate_up_proj", "qkv_proj"]
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path / "nnjax").eval()
    _agrees_with_peft(model, folder, config, adapted, hf_tiny.ids((2, hf_tiny.SEQ)))
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj", "gate_up_proj"],
                           task_type="CAUSAL_LM")  # fmt: skip
    made = peft.get_peft_model(_hf_model(folder), lora)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    made.save_pretrained(tmp_path / "peft")
    loaded = hf.load_peft_adapter(tmp_path / "peft", config, params)
    assert loaded["blocks"]["stacked"]["attn"]["key"]["lora_b"].shape == (3, 2, 16)  # KV * hd
    _agrees_with_peft(made, folder, config, loaded, hf_tiny.ids((2, hf_tiny.SEQ), seed=3))
