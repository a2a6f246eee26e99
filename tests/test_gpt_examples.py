"""The GPT examples run end to end in their smoke mode (subprocesses, as a user runs them)."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, timeout=600):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _float(pattern, text):
    m = re.search(pattern, text)
    assert m, text
    return float(m.group(1))


@pytest.mark.slow
def test_gpt_shakespeare_then_lora_from_its_checkpoint(tmp_path):
    # --onednn-dots: the opt-in XLA:CPU options must compile and train the scanned GPT
    out = _run("gpt_shakespeare.py", "--smoke", "--onednn-dots", "--out", str(tmp_path / "run"))
    assert re.search(r"step 0: train loss \d\.\d{4}, val loss \d\.\d{4}", out)
    val = _float(r"final val loss (\d+\.\d+); wall time [\d.]+ s", out)
    assert 0 < val < 5  # a smoke run barely moves from log(vocab)
    assert (tmp_path / "run" / "params.safetensors").exists()
    assert (tmp_path / "run" / "model.json").exists()

    out = _run(
        "finetune_gpt_lora.py",
        "--smoke",
        "--init",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "ft"),
    )
    assert "base weights unchanged: True" in out
    trainable, total = (
        int(s.replace(",", ""))
        for s in re.search(r"([\d,]+) trainable of ([\d,]+) params", out).groups()
    )
    assert 5 * trainable < total
    # 1 layer, width 16, rank 8: query and value each get a (16, 8) and an (8, 16) matrix
    assert trainable == 2 * (16 * 8 + 8 * 16)
    after = _float(r"after (\d+\.\d+) \(merged", out)
    merged = _float(r"merged into the kernels: (\d+\.\d+)", out)
    assert abs(after - merged) < 1e-3
    assert (tmp_path / "ft" / "adapters.safetensors").exists()


@pytest.mark.slow
def test_finetune_gpt_lora_pretrains_when_no_checkpoint():
    out = _run("finetune_gpt_lora.py", "--smoke")
    assert "pretraining on" in out and "base weights unchanged: True" in out
    assert re.search(r"adapter file [\d.]+ KiB vs full model [\d.]+ KiB", out)


def test_examples_have_help():
    for script in ("gpt_shakespeare.py", "finetune_gpt_lora.py"):
        assert "usage:" in _run(script, "--help")


def test_made_text_stands_in_for_a_missing_file(monkeypatch, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import gpt_shakespeare
    finally:
        sys.path.remove(str(EXAMPLES))
    monkeypatch.setattr(gpt_shakespeare, "DEFAULT_DATA", pathlib.Path("/nonexistent/input.txt"))
    text, source = gpt_shakespeare.load_data(None)
    assert source == "a text made by code"
    assert "training on a text made by code instead" in capsys.readouterr().out
    assert len(text.train) > 10 * len(text.val) // 2 > 1000
    assert text.decode(text.encode("KING:\n")) == "KING:\n"
    with pytest.raises(SystemExit, match="no such file"):
        gpt_shakespeare.load_data("/nonexistent/other.txt")


def test_nanogpt_torch_reference_runs_and_starts_near_uniform():
    """The PyTorch side of the README's nanoGPT pair, run without training steps.

    GPT-2's init (weights N(0, 0.02)) predicts close to uniform over the 65
    characters, so its loss is close to ln(65).
    """
    pytest.importorskip("torch")
    from benchmarks import nanogpt_torch

    if not nanogpt_torch.DATA.exists():
        pytest.skip(f"{nanogpt_torch.DATA} is absent (a clone without ../shared/data)")
    # one thread, as the torch fixture: two OpenMP threads spin-wait on a busy machine
    # (228 s for the 400 forward passes there, against seconds on one thread)
    out = nanogpt_torch.main(["--iters", "0", "--threads", "1"])
    assert abs(out["val_loss"] - np.log(65)) < 0.02
    assert out["wall_s"] > 0
