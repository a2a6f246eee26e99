"""``nnjax demo --quick``: the README's main job, end to end."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo's default data is scikit-learn's digits")


def test_demo_quick_table_and_outputs(tmp_path):
    from nnjax.app import demo

    cfg = demo.DemoConfig(out=str(tmp_path / "out"), progress=False).quick()
    lines = []
    rows = demo.run(cfg, print_fn=lines.append)
    assert [r["method"] for r in rows] == [
        "from scratch",
        "full fine-tune",
        "frozen backbone + new head",
        "LoRA r=4 + new head",
    ]
    full, frozen, lora = rows[1], rows[2], rows[3]
    head = 128 * 5 + 5
    # The CNN: conv 3x3 1->32, conv 3x3 32->32, dense 4*4*32 -> 128, head 128 -> 5.
    total = (9 * 32 + 32) + (9 * 32 * 32 + 32) + (512 * 128 + 128) + head
    assert full["trainable"] == total
    assert frozen["trainable"] == head
    assert lora["trainable"] == head + 4 * (512 + 128)
    # Adam keeps two float32 moments per trainable scalar, plus its int32 step count.
    for r in rows:
        assert r["opt_state_bytes"] == 2 * 4 * r["trainable"] + 4
        assert 0.0 <= r["test_accuracy"] <= 1.0
    table = "\n".join(lines)
    for r in rows:
        assert f"| {r['method']}" in table
    for name in ["pretrained.safetensors", "results.md", "loss_curves.png"] + [
        f"finetune_{i}.safetensors" for i in range(4)
    ]:
        assert os.path.getsize(tmp_path / "out" / name) > 0
    # an adapter-only file is a small fraction of the full checkpoint
    assert lora["checkpoint_bytes"] < 0.1 * full["checkpoint_bytes"]


def test_cli_demo_help_and_module_entry():
    out = subprocess.run(
        [sys.executable, "-m", "nnjax", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--quick" in out.stdout and "--out" in out.stdout
