"""Smoke test of ``python -m benchmarks --study checkpoint --quick``: it runs and writes every row."""

from __future__ import annotations

import json

import pytest

from tests.test_benchmarks_smoke import _run as run_benchmarks


@pytest.mark.slow
def test_checkpoint_study_quick_writes_every_format(tmp_path):
    proc = run_benchmarks(tmp_path, "--study", "checkpoint", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "quick-checkpoint.json").read_text())
    formats = [r["format"] for r in payload["rows"]]
    assert formats[:3] == ["old", "nnjax", "nnjax-async"]
    for r in payload["rows"]:  # each child restored the values bit for bit, or it would fail
        assert r["save s"] > 0 and r["restore s"] > 0
        assert r["state_mb"] == pytest.approx(7.87, rel=0.01)
    # The streamed save holds at most about one tensor beyond the state; the old format the
    # whole state. Held = host buffers allocated during the save (tracemalloc), which other
    # processes cannot disturb; RSS (the full study's figure) on a state this small is noise.
    rows = {r["format"]: r for r in payload["rows"]}
    assert rows["nnjax"]["save held_mb"] < rows["nnjax"]["largest_mb"] * 1.2
    assert rows["old"]["save held_mb"] > rows["old"]["state_mb"]
    assert rows["nnjax"]["restore held_mb"] < rows["nnjax"]["state_mb"] / 2
    assert "| nnjax |" in (tmp_path / "quick-checkpoint.md").read_text()
