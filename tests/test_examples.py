"""The examples run end to end: ``--help``, and ``--smoke`` (a few steps, tiny sizes) as a user runs them."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

# example -> (extra smoke arguments, a line its output must hold)
SMOKE = {
    "regression.py": ([], r"max |learned - true|: "),
    "image_classification.py": ([], "test accuracy: "),
    "text_classification.py": ([], "test accuracy: "),
    "transfer_cnn.py": ([], "frozen backbone accuracy: "),
    "custom_layer.py": ([], "final loss: "),
    "finetune_llm.py": ([], "held-out perplexity: before "),
    "llm_generate.py": (["--family", "qwen3"], "generated: "),
    "dpo_llm.py": ([], "held-out rewards/accuracies: before "),
    "grpo_toy.py": ([], "held-out exact match: before "),
}


def _load(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(EXAMPLES / name), "--smoke", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--smoke" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke(name):
    args, line = SMOKE[name]
    out = _run(name, *args)
    assert line in out, out


@pytest.mark.slow
def test_image_classification_reads_mnist_idx_files(data_dir):
    mnist = data_dir / "mnist"
    if not mnist.is_dir():
        pytest.skip(f"no MNIST files in {mnist}")
    out = _run("image_classification.py", "--data-dir", str(mnist))
    assert "60000 train, 10000 test images of (28, 28, 1)" not in out  # --smoke trims them
    assert "256 train, 200 test images of (28, 28, 1)" in out, out
    assert "test accuracy: " in out


@pytest.mark.slow
def test_text_classification_reads_the_uci_files(data_dir):
    path = data_dir / "sentiment_labelled_sentences"
    if not path.is_dir():
        pytest.skip(f"no sentiment files in {path}")
    out = _run("text_classification.py", "--data-path", str(path))
    assert "test accuracy: " in out, out
