"""``nnjax demo --quick``: the first thing a user runs; its table must tell the truth."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo's images are scikit-learn's digits")

METHODS = [
    "from scratch",
    "pretrained, not fine-tuned",
    "full fine-tune",
    "head only",
    "LoRA r=4 + head",
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from nnjax.app import demo

    out = tmp_path_factory.mktemp("demo")
    cfg = demo.DemoConfig(out=str(out), progress=False, language_model=False).quick()
    lines = []
    rows = demo.run(cfg, print_fn=lines.append)
    return cfg, rows, "\n".join(lines), out


def test_rows_count_exactly_what_each_method_trains_and_stores(quick):
    _, rows, _, out = quick
    assert [r["method"] for r in rows] == METHODS
    scratch, frozen, full, head, lora = rows
    # The CNN by hand: conv 3x3 1->32, conv 3x3 32->32, dense 4*4*32 -> 128, head 128 -> 10.
    head_params = 128 * 10 + 10
    total = (9 * 32 + 32) + (9 * 32 * 32 + 32) + (512 * 128 + 128) + head_params
    assert scratch["trainable"] == full["trainable"] == total
    assert head["trainable"] == head_params
    assert lora["trainable"] == head_params + 4 * (512 + 128)
    assert frozen["trainable"] == 0 and frozen["checkpoint_bytes"] == 0
    for r in (scratch, full, head, lora):
        # Adam: two float32 moments per trainable scalar, plus its int32 step count.
        assert r["opt_state_bytes"] == 2 * 4 * r["trainable"] + 4
        # safetensors: the float32 values plus a header of a few hundred bytes
        assert 4 * r["trainable"] < r["checkpoint_bytes"] < 4 * r["trainable"] + 2000
    for name in ["pretrained.safetensors", "results.md", "accuracy.png"]:
        assert os.path.getsize(out / name) > 0


def test_fine_tuning_beats_scratch_with_few_labels(quick):
    cfg, rows, _, _ = quick
    fewest = 10 * cfg.shots[0]
    acc = {r["method"]: np.asarray(r["accuracy"][fewest]) for r in rows}
    assert all(len(a) == cfg.seeds for a in acc.values())
    # Measured with these seeds: scratch 0.41 ± 0.04, the fine-tuned ones 0.78-0.80.
    for name in ["full fine-tune", "head only", "LoRA r=4 + head"]:
        assert acc[name].mean() > acc["from scratch"].mean() + 0.2, name
        assert acc[name].min() > acc["from scratch"].max(), name
    # the untrained pretrained model does not depend on the seed
    assert np.ptp(acc["pretrained, not fine-tuned"]) == 0
    most = 10 * cfg.shots[-1]
    full = rows[2]["accuracy"]
    assert np.mean(full[most]) > np.mean(full[fewest])  # more labels help


def test_printed_table_shows_the_rows(quick):
    _, rows, text, _ = quick
    for r in rows:
        line = next(li for li in text.splitlines() if li.startswith(r["method"] + "  "))
        cells = re.split(r"\s{2,}", line.strip())
        assert cells[1] == f"{r['trainable']:,}"
        want = [f"{np.mean(a):.3f} ± {np.std(a):.3f}" for a in r["accuracy"].values()]
        assert cells[-len(want) :] == want
    assert f"mean ± std over {len(rows[0]['accuracy'][10])} seeds" in text


def test_cli_help_is_truthful():
    out = subprocess.run(
        [sys.executable, "-m", "nnjax", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    help_text = " ".join(out.stdout.split())
    assert "five ways" in help_text and len(METHODS) == 5
    for words in ["from scratch", "full fine-tuning", "head only", "LoRA + head"]:
        assert words in help_text
    for flag in ["--quick", "--out", "--seeds", "--no-text", "--no-progress"]:
        assert flag in help_text


@pytest.mark.slow  # about 40 s of CPU: two compiled LM trainers
def test_language_model_story_fine_tuning_lowers_docs_perplexity(tmp_path):
    import nnjax as nj
    from nnjax.app import demo, demo_lm

    if not hasattr(nj.models, "CausalLM"):
        pytest.skip("nj.models.CausalLM has not landed")
    cfg = demo.DemoConfig(out=str(tmp_path), progress=False)
    sizes = demo_lm.LMSizes(code_bytes=60_000, pretrain_steps=60, finetune_steps=30)
    lines = []
    rows = demo_lm.run(cfg, lines.append, sizes)
    before, full, lora = rows[:3]
    assert [r["method"] for r in rows[:3]] == [
        "pretrained, not fine-tuned",
        "full fine-tune",
        "LoRA r=8",
    ]
    # counted by hand: d = 64, 2 blocks, MLP 170 wide, vocab 256, untied head
    d, m, v = 64, 170, 256
    block = 2 * d + 4 * d * d + 3 * d * m
    assert full["trainable"] == 2 * v * d + 2 * block + d
    # LoRA r=8 on q, k, v, out (d -> d) and gate, up (d -> m), down (m -> d), both blocks
    assert lora["trainable"] == 2 * 8 * (4 * 2 * d + 3 * (d + m))
    if hasattr(nj.finetune, "quantize"):
        assert rows[3]["method"] == "LoRA r=8 on an int8 base"
        assert rows[3]["trainable"] == lora["trainable"]
    for r in rows[1:]:
        assert r["opt_state_bytes"] == 2 * 4 * r["trainable"] + 4
        assert r["doc_ppl"] < before["doc_ppl"], r["method"]
    assert 1 < before["code_ppl"] < before["doc_ppl"] < 256  # pretrained on code, not on docs
    assert any(li.startswith("LoRA r=8  ") for li in "\n".join(lines).splitlines())
    for name in ["results_lm.md", "perplexity.png", "stdlib_code.bin"]:
        assert os.path.getsize(tmp_path / name) > 0
