"""examples/pretrain_llm.py in its --smoke form, and the FLOPs its MFU is built on.

References: an uninterrupted run (for the resumed one), transformers' own model loading
the exported folder (for the logits), a count of every matmul by hand and XLA's cost
analysis of the compiled forward pass (for the FLOPs).
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.training import throughput

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pretrain_llm.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("pretrain_llm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hand_count(c, t):
    """Training FLOPs per token: every matmul of one token's forward pass, times 3."""
    q = c.hidden_size // c.num_heads
    kv = c.num_kv_heads or c.num_heads
    per_layer = [
        (c.hidden_size, c.num_heads * q),  # query
        (c.hidden_size, kv * q),  # key
        (c.hidden_size, kv * q),  # value
        (c.num_heads * q, c.hidden_size),  # out
        (c.hidden_size, c.mlp_hidden),  # gate
        (c.hidden_size, c.mlp_hidden),  # up
        (c.mlp_hidden, c.hidden_size),  # down
    ]
    forward = sum(2 * a * b for a, b in per_layer) * c.num_layers
    forward += 2 * c.hidden_size * c.vocab_size  # the head
    forward += c.num_layers * c.num_heads * (2 * t * q + 2 * t * q)  # q.k over t keys, p.v
    return 3 * forward


def test_flops_per_token_equal_a_hand_count_and_xla():
    c = nj.models.CausalLMConfig(
        vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, mlp_hidden=96
    )
    b, t = 4, 64
    assert throughput.flops_per_token(c, t) == pytest.approx(_hand_count(c, t), rel=1e-12)
    unrolled = nj.models.CausalLM(c.__class__(**{**c.__dict__, "scan_unroll": 3}))
    params, _ = unrolled.init(jax.random.key(0), jnp.zeros((1, t), jnp.int32))
    forward = jax.jit(lambda p, x: unrolled.apply(p, {}, x)[0])
    cost = forward.lower(params, jnp.zeros((b, t), jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = throughput.flops_per_token(c, t, training=False) * b * t
    assert abs(cost["flops"] - ours) / ours < 0.05  # XLA also counts norms, softmax, adds


def test_peak_given_and_assumed():
    peak = throughput.device_peak(2.5)
    assert peak.flops == pytest.approx(len(jax.devices()) * 2.5e12)
    cpu = throughput.device_peak()
    assert cpu.flops > 0 and "assumed CPU peak" in cpu.source
    with pytest.raises(nj.ArgumentError, match="peak_tflops"):
        throughput.device_peak(-1)


def test_training_dtype_follows_the_devices_instructions(monkeypatch):
    """bfloat16 on accelerators and on CPUs whose flags list AMX or AVX-512 BF16."""

    class Device:
        def __init__(self, platform):
            self.platform = platform

    assert throughput.training_dtype([Device("gpu")]) == jnp.bfloat16
    for flags, expected in [({"avx2", "amx_bf16"}, jnp.bfloat16), ({"avx512_bf16"}, jnp.bfloat16)]:
        monkeypatch.setattr(throughput, "_cpu_info", lambda f=flags: (2000.0, f))
        assert throughput.training_dtype([Device("cpu")]) == expected
    monkeypatch.setattr(throughput, "_cpu_info", lambda: (2000.0, {"avx2", "avx512f"}))
    assert throughput.training_dtype([Device("cpu")]) is None


def _text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_recipe().made_text(600))
    return path


@pytest.mark.slow  # five short compiled runs and a transformers load: ~60 s on 2 cores
def test_smoke_loss_falls_resumes_exactly_and_exports(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    recipe = _recipe()
    text = _text(tmp_path)
    common = ["--smoke", "--data", str(text), "--tokenizer", "bytes"]
    whole = recipe.main([*common, "--out", str(tmp_path / "whole")])
    losses = whole["history"]["loss"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3

    cut = [*common, "--out", str(tmp_path / "cut")]
    first = recipe.main([*cut, "--stop-after", "6"])
    assert len(first["history"]["loss"]) == 6 and first["hf_dir"] is None
    resumed = recipe.main(cut)
    assert resumed["history"]["loss"] == losses  # bit for bit: same batches, rng, state

    reports = [r for r in whole["reports"] if "tokens_per_s" in r]
    assert reports and all(r["mfu"] > 0 for r in reports)
    assert whole["flops_per_step"] == throughput.flops_per_token(whole["config"], 32) * 4 * 32
    assert any("val_perplexity" in r for r in whole["reports"])
    lines = (tmp_path / "whole/logs/metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["kind"] for line in lines} >= {"train", "eval"}

    # the same run data-parallel and tensor-parallel over two host devices: the same losses
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = str(EXAMPLE.parents[1])
    env["JAX_LOG_COMPILES"] = "1"  # jax logs each compilation on stderr
    expected = [(r["step"], r["loss"]) for r in whole["reports"][:2]]
    for mesh, parallel in (("data=2", "dp"), ("data=1,model=2", "tp")):
        cmd = [sys.executable, str(EXAMPLE), *common, "--stop-after", "6", "--no-export"]
        cmd += ["--out", str(tmp_path / parallel), "--mesh", mesh, "--parallel", parallel]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"({parallel})" in proc.stdout
        assert ("2 replicas" in proc.stdout) == (parallel == "dp")  # trainer(replicas=2)
        # compiled from shapes while the text was tokenized, and found by fit: once each
        for fn in ("step", "evaluate"):
            assert proc.stderr.count(f"Finished XLA compilation of jit({fn})") == 1, fn
        if sys.platform == "linux":  # the script restarted itself with huge pages
            assert "malloc in huge pages" in proc.stdout
        got = [
            (int(a), float(b)) for a, b in re.findall(r"step (\d+), loss ([0-9.]+)", proc.stdout)
        ]
        assert [g[0] for g in got] == [e[0] for e in expected]
        assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], abs=2e-4)

    hf = transformers.AutoModelForCausalLM.from_pretrained(whole["hf_dir"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(whole["hf_dir"])
    ids = np.asarray([tok("KING:\nthe sea doth weep")["input_ids"]])
    assert ids.tolist()[0] == list(b"KING:\nthe sea doth weep")
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours, _ = nj.models.CausalLM(whole["config"]).apply(whole["params"], {}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)


def test_help_names_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _recipe().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--smoke", "--stop-after", "--mesh", "--peak-tflops", "--accumulate", "--remat"):
        assert flag in out
