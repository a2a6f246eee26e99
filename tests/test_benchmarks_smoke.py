"""Smoke tests of the benchmark suite: ``python -m benchmarks --quick`` in a subprocess.

They check that the suite runs and writes complete outputs, not timings: every
expected (workload, framework) row is there, every framework's model has the
same parameter count, losses are finite, and the markdown, JSON and PNG exist.
Frameworks that are not installed are left out.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks.suite import FRAMEWORKS, available
from benchmarks.workloads import WORKLOADS, config, expected_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(out: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    # The suite times other libraries' code (hand-written JAX, Flax, Equinox), written
    # with implicit rank promotion; the "raise" rule of conftest.py is nnjax's own.
    env = {
        **{k: v for k, v in os.environ.items() if k != "JAX_NUMPY_RANK_PROMOTION"},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _check_outputs(out: pathlib.Path, workloads: list[str], frameworks: list[str]) -> None:
    payload = json.loads((out / "quick-suite.json").read_text())
    assert payload["quick"] is True
    assert payload["machine"]["cpu"] and payload["machine"]["versions"]["jax"]
    rows = {(r["workload"], r["framework"]): r for r in payload["rows"]}
    expected = {(w, f) for w in workloads for f in frameworks if w in FRAMEWORKS[f].workloads}
    assert set(rows) == expected
    text = (out / "quick-suite.md").read_text()
    for (workload, framework), row in rows.items():
        assert row["status"] == "ok", row
        assert row["params"] == expected_params(workload, config(workload, quick=True))
        assert row["step_ms"] > 0 and row["compile_s"] >= 0
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        if "jax" in frameworks:
            assert row["ratio_jax"] == pytest.approx(
                row["step_ms"] / rows[workload, "jax"]["step_ms"]
            )
        assert f"| {framework} | {row['params']:,} |" in text
    for workload in workloads:
        assert f"## {workload}" in text
        if (workload, "nnjax-dp") in rows:  # the same steps, the batch split over devices
            for key in ("loss_first", "loss_last"):
                assert rows[workload, "nnjax-dp"][key] == pytest.approx(
                    rows[workload, "nnjax"][key], rel=1e-5
                )
    assert (out / "quick-suite.png").stat().st_size > 1000


def test_help_lists_every_option():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--quick", "--workloads", "--frameworks", "--rounds", "--out", "--study"):
        assert option in proc.stdout


def test_unknown_framework_is_rejected(tmp_path):
    proc = _run(tmp_path, "--quick", "--frameworks", "jax,tensorflow")
    assert proc.returncode == 2
    assert "unknown ['tensorflow']" in proc.stderr


@pytest.mark.slow
def test_quick_suite_every_installed_framework(tmp_path):
    frameworks = [f for f in FRAMEWORKS if available(f) and f != "torch-compile"]
    proc = _run(tmp_path, "--quick", "--rounds", "1")  # every row, one timing round
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_outputs(tmp_path, list(WORKLOADS), frameworks)
    rows = json.loads((tmp_path / "quick-suite.json").read_text())["rows"]
    fused = [r for r in rows if r["framework"].endswith("-fused")]
    assert fused and all(r["steps_per_call"] > 1 and "loop_ms" not in r for r in fused)
    assert all(
        "loop_ms" in r for r in rows if r["steps_per_call"] == 1 and r["workload"] == "tiny-mlp"
    )
    # --render rewrites the markdown from the JSON alone, the same text
    text = (tmp_path / "quick-suite.md").read_text()
    (tmp_path / "quick-suite.md").unlink()
    proc = _run(tmp_path, "--render", str(tmp_path / "quick-suite.json"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "quick-suite.md").read_text() == text


def test_quick_cpu_conv_study_writes_both_forms(tmp_path):
    proc = _run(tmp_path, "--quick", "--study", "cpu-conv")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "quick-cpu-conv.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["lenet conv1 (C=1)", "3x3 (C=8)"]
    for r in rows:
        for form in ("xla-conv", "im2col"):
            for part in ("fwd ms", "fwd+bwd ms", "fwd+bwd compile s"):
                assert r[f"{form} {part}"] > 0
        assert r["fwd ratio"] == pytest.approx(r["im2col fwd ms"] / r["xla-conv fwd ms"])
    assert "| lenet conv1 (C=1) | 1 |" in (tmp_path / "quick-cpu-conv.md").read_text()


def test_quick_cpu_matmul_study_times_every_form(tmp_path):
    proc = _run(tmp_path, "--quick", "--study", "cpu-matmul")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads((tmp_path / "quick-cpu-matmul.json").read_text())["rows"]
    assert row["shape"] == [768, 128, 512]
    forms = ["jax f32", "jax bf16"] + [
        k[:-3] for k in row if k.startswith("torch") and k.endswith(" ms")
    ]
    for form in forms:
        assert row[f"{form} GFLOP/s"] == pytest.approx(
            2 * 768 * 128 * 512 / row[f"{form} ms"] / 1e6
        )
    assert "| nanoGPT mlp up | 768x128x512 |" in (tmp_path / "quick-cpu-matmul.md").read_text()


def test_quick_cpu_cores_study_times_one_core_and_all(tmp_path):
    proc = _run(tmp_path, "--quick", "--study", "cpu-cores", "--frameworks", "nnjax")
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((tmp_path / "quick-cpu-cores.json").read_text())
    (row,) = payload["rows"]
    one, many = payload["settings"]
    assert (row["framework"], one) == ("nnjax", "1 core")
    assert 0 < row[f"{one} cores busy"] <= 1.2  # held to one core (a little slack for sampling)
    assert row["speedup"] == pytest.approx(row[f"{one} step ms"] / row[f"{many} step ms"])
    assert "| nnjax |" in (tmp_path / "quick-cpu-cores.md").read_text()


def test_quick_decode_products_study_times_every_form(tmp_path):
    # the study itself checks the kernel's products against XLA's before timing them
    proc = _run(tmp_path, "--quick", "--study", "decode-products")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "quick-decode-products.json").read_text())["rows"]
    assert [(r["storage"], r["rows"]) for r in rows] == [
        (s, n) for s in ("float32", "bfloat16", "int8") for n in (1, 2)
    ]
    assert all(r["XLA dot ms"] > 0 and r["nnjax kernel ms"] > 0 for r in rows)
    assert all(("torch ms" in r) == (available("torch") and r["storage"] != "int8") for r in rows)
    assert "| int8 | 2 |" in (tmp_path / "quick-decode-products.md").read_text()


@pytest.mark.parametrize("study", ["compile-depth", "finetune", "gpt-scale"])
def test_quick_study_writes_its_report(tmp_path, study):
    proc = _run(tmp_path, "--quick", "--study", study)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / f"quick-{study}.json").read_text())["rows"]
    assert (tmp_path / f"quick-{study}.md").read_text().startswith("#")
    cfg = config("gpt-char", True)
    if study == "compile-depth":
        assert [(r["layers"], r["variant"]) for r in rows] == [
            (n, v) for n in (2, 4) for v in ("nnjax-repeat", "nnjax-unrolled", "jax-unrolled")
        ]
        assert (tmp_path / "quick-compile-depth.png").stat().st_size > 0
    elif study == "finetune":
        by = {r["variant"]: r for r in rows}
        assert by["full"]["trainable"] == by["full"]["params"] == expected_params("gpt-char", cfg)
        # rank-8 LoRA on each layer's query and value kernels: 2 x (d x 8 + 8 x d)
        assert by["lora-qv-r8"]["trainable"] == cfg.layers * 2 * (2 * cfg.width * 8)
    else:
        assert {r["framework"]: r["params"] for r in rows if r["status"] == "ok"} == {
            name: expected_params("gpt-char", cfg)
            for name in ("nnjax", "jax", "torch")
            if available(name)
        }
