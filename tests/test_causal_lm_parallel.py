"""CausalLM's paths under LoRA globs, masks and tensor-parallel rules (grouped-query heads included)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

import nnjax as nj
import nnjax.sharding as sh
from nnjax.models import GPT, CausalLM, CausalLMConfig, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA = CausalLMConfig(
    vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=48
)
GPT_CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=32)
TP_GQA = dict(column=sh.GATED_COLUMN, row=sh.GATED_ROW, kv_heads=2)


def _plan(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))[0]


def _specs(params, mesh, rules):
    out = {}
    for path, s in nj.paths.flatten(sh.param_specs(params, mesh, rules)).items():
        spec = list(s)
        while spec and spec[-1] is None:
            spec.pop()
        out[path] = tuple(spec)
    return out


def test_lora_and_mask_globs_are_the_same_for_gpt_and_llama():
    for model in (GPT(GPT_CFG), CausalLM(LLAMA)):
        params = _plan(model)
        adapted, _ = jax.eval_shape(
            lambda p: nj.finetune.add_lora(p, jax.random.key(0), "blocks/*/attn/*/kernel", rank=2),
            params,
        )
        paths = nj.paths.flatten(adapted)
        for name in ("query", "key", "value", "out"):
            assert f"blocks/stacked/attn/{name}/lora_a" in paths
        trainable = nj.paths.flatten(nj.finetune.mask(adapted, "blocks/*/attn/*/lora_*"))
        assert sorted(p for p, v in trainable.items() if v) == sorted(
            f"blocks/stacked/attn/{n}/lora_{ab}"
            for n in ("query", "key", "value", "out")
            for ab in "ab"
        )


def test_tensor_parallel_rules_split_gqa_kv_heads_only_when_they_divide():
    params = _plan(CausalLM(LLAMA))
    params, _ = jax.eval_shape(
        lambda p: nj.finetune.add_lora(p, jax.random.key(0), "blocks/*/attn/*/kernel", rank=2),
        params,
    )
    col, row = (None, None, "model"), (None, "model")
    # model axis 2: the 2 k/v heads split one per device, like the 4 query heads
    specs = _specs(
        params, AbstractMesh((4, 2), ("data", "model")), sh.tensor_parallel_rules(**TP_GQA)
    )
    for name in ("query", "key", "value"):
        assert specs[f"blocks/stacked/attn/{name}/kernel"] == col
        assert specs[f"blocks/stacked/attn/{name}/lora_b"] == col
    assert specs["blocks/stacked/attn/out/kernel"] == row
    assert specs["blocks/stacked/mlp/gate/kernel"] == specs["blocks/stacked/mlp/up/kernel"] == col
    assert specs["blocks/stacked/mlp/down/kernel"] == row
    # model axis 4 > 2 k/v heads: k and v replicated, q still split by heads
    specs = _specs(
        params, AbstractMesh((2, 4), ("data", "model")), sh.tensor_parallel_rules(**TP_GQA)
    )
    assert specs["blocks/stacked/attn/query/kernel"] == col
    for name in ("key", "value"):
        assert specs[f"blocks/stacked/attn/{name}/kernel"] == ()
        assert specs[f"blocks/stacked/attn/{name}/lora_b"] == ()
    rest = [p for p in specs if "/attn/" not in p and "/mlp/" not in p]
    assert rest and all(specs[p] == () for p in rest)  # embeddings, norms, head


WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import nnjax as nj, nnjax.sharding as sh
    from nnjax.models import CausalLM, CausalLMConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = CausalLMConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, mlp_hidden=48)
    model = CausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (4, 9)), jnp.int32)
    params, _ = jax.jit(model.init)(jax.random.key(0), ids[:, :-1])

    def loss(p, ids):
        logits, _ = model.apply(p, {}, ids[:, :-1])
        return nj.losses.softmax_cross_entropy(logits, ids[:, 1:])

    step = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grad = step(params, ids)
    out = {}
    for data, tp in ((4, 2), (2, 4)):
        mesh = sh.mesh({"data": data, "model": tp})
        rules = sh.tensor_parallel_rules(column=sh.GATED_COLUMN, row=sh.GATED_ROW, kv_heads=2)
        sharded = sh.shard_params(params, mesh, rules)
        got_loss, got_grad = step(sharded, sh.shard_batch(ids, mesh))
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)))
        k = sharded["blocks"]["stacked"]["attn"]["key"]["kernel"].sharding.spec
        out[f"{data}x{tp}"] = {"loss": abs(float(got_loss - ref_loss)), "grad": diff,
                               "key_spec": str(k)}
    json.dump(out, open(sys.argv[1], "w"))
    """
)


def test_gqa_tensor_parallel_on_eight_devices_equals_one_device(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    for mesh in ("4x2", "2x4"):
        assert r[mesh]["loss"] < 1e-5 and r[mesh]["grad"] < 1e-5, (mesh, r[mesh])
    assert "model" in r["4x2"]["key_spec"] and "model" not in r["2x4"]["key_spec"]
