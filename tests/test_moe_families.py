"""Mixtral, Qwen2-MoE and Qwen3-MoE folders: from_pretrained (sharded), save_pretrained, PEFT.

References: transformers (its float32 logits, greedy ``generate``, its loading of
nnjax's export) and peft (an adapter nnjax writes loads in peft to the same logits and
merged weights; one peft writes loads in nnjax to the same logits).
"""

import json

import jax
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import hf
from tests import hf_moe

transformers = pytest.importorskip("transformers", reason="transformers builds the references")
torch = pytest.importorskip("torch")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def _ours(config, params, ids):
    return np.asarray(jax.jit(nj.models.CausalLM(config).apply)(params, {}, ids)[0])


# Qwen2-MoE with a dense first layer and experts every other layer after (mixed stack)
MIXED = {"decoder_sparse_step": 2, "mlp_only_layers": [0], "num_hidden_layers": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{name: (transformers model, its folder saved in 2 KB shards)}``."""
    torch.set_num_threads(1)
    out = {}
    for name, family, overrides in [*((f, f, {}) for f in hf_moe.FAMILIES),
                                    ("qwen2_moe_mixed", "qwen2_moe", MIXED)]:  # fmt: skip
        folder = tmp_path_factory.mktemp(name)
        model = hf_moe.build(family, **overrides)
        model.save_pretrained(folder, max_shard_size="20KB")
        out[name] = (model, folder)
    return out


NAMES = (*hf_moe.FAMILIES, "qwen2_moe_mixed")


@pytest.mark.parametrize("name", NAMES)
def test_folder_loads_to_transformers_logits_and_greedy_tokens(name, models):
    model, folder = models[name]
    assert (folder / "model.safetensors.index.json").exists()  # sharded
    config, params = hf.from_pretrained(folder)
    ids = hf_moe.ids((2, hf_moe.SEQ))
    np.testing.assert_allclose(
        _ours(config, params, ids), _logits(model, ids), rtol=2e-4, atol=2e-4
    )
    prompt = hf_moe.ids((2, 5), seed=1)
    want = hf_moe.greedy(model, prompt)
    got = np.asarray(nj.models.generate(config, params, prompt, 8, temperature=0.0))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)


def test_mixed_stack_paths(models):
    config, params = hf.from_pretrained(models["qwen2_moe_mixed"][1])
    assert config.layer_types == ("dense", "moe", "dense", "moe")
    paths = nj.paths.leaf_paths(params)
    assert "blocks/0/mlp/gate/kernel" in paths and "blocks/2/mlp/down/kernel" in paths
    assert "blocks/3/mlp/experts/2/up/kernel" in paths and "blocks/1/mlp/router/kernel" in paths
    assert not any(p.startswith("blocks/0/mlp/experts") for p in paths)


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_transformers_to_the_same_weights(name, models, tmp_path):
    model, folder = models[name]
    config, params = hf.from_pretrained(folder)
    files = hf.save_pretrained(tmp_path, config, params, max_shard_size="20KB")
    assert "model.safetensors.index.json" in files
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    got = again.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in got.items():
        np.testing.assert_array_equal(value.numpy(), want[key], err_msg=key)
    ids = hf_moe.ids((1, hf_moe.SEQ), seed=2)
    # equal weights; torch's fused-expert kernels may sum in another order (~4e-8 seen)
    np.testing.assert_allclose(_logits(again, ids), _logits(model, ids), rtol=1e-6, atol=1e-6)


def test_peft_round_trip_qwen2_moe(models, tmp_path):
    """nnjax's adapter on attention and the shared expert loads in peft to the same logits and
    merged weights; peft's own adapter loads back in nnjax to the same logits."""
    import peft

    model, folder = models["qwen2_moe"]
    config, params = hf.from_pretrained(folder)
    targets = ["blocks/*/attn/query/kernel", "blocks/*/attn/value/kernel",
               "blocks/*/mlp/shared_expert/down/kernel"]  # fmt: skip
    adapted, _ = nj.finetune.add_lora(params, jax.random.key(0), targets, rank=4)
    flat = nj.paths.flatten(adapted)
    for k, path in enumerate(sorted(p for p in flat if p.endswith("lora_b"))):
        flat[path] = 0.3 * jax.random.normal(jax.random.key(k), flat[path].shape)
    adapted = nj.paths.unflatten(flat)
    hf.save_peft_adapter(tmp_path / "ours", config, adapted)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    ids = hf_moe.ids((2, hf_moe.SEQ), seed=3)
    want = _logits(with_adapter, ids)
    assert np.abs(want - _logits(model, ids)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(_ours(config, adapted, ids), want, rtol=2e-4, atol=2e-4)
    back = hf.load_peft_adapter(tmp_path / "ours", config, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapted)
    # peft's own adapter (on the attention output and the shared expert's gate) into nnjax
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj"])
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder), lora)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = hf.load_peft_adapter(tmp_path / "theirs", config, params)
    np.testing.assert_allclose(
        _ours(config, loaded, ids), _logits(theirs.eval(), ids), rtol=2e-4, atol=2e-4
    )
