"""nj.checkpoint across real processes: kill -9 mid-save, two writers, and two jax.distributed processes.

The other processes run ``tests/checkpoint_worker.py``; their values come from
NumPy with fixed seeds (``checkpoint_worker.state``, ``sharded_values``), which
this process rebuilds as the reference.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors import safe_open

import nnjax as nj
from nnjax.core.errors import CheckpointError
from tests import checkpoint_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint_worker", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def _target(values):
    return {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in values.items()}


def test_kill_9_mid_save_keeps_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _start("loop", str(run))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill while a save is half written
            names = os.listdir(run) if run.exists() else []
            if "step_000002" in names and any(n.startswith(".tmp-step_") for n in names):
                break
            time.sleep(0.002)
        else:
            pytest.fail("the worker never got to its third save")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(n.startswith(".tmp-step_") for n in os.listdir(run))  # the killed save's folder
    step, path = nj.checkpoint.all_steps(run)[-1]
    assert step >= 2
    got, _ = nj.checkpoint.restore(path, _target(worker.state(step)))
    for name, want in worker.state(step).items():
        np.testing.assert_array_equal(np.asarray(got[name]), want, err_msg=name)
    # The dead writer's lock went with it: this process saves, and clears the leftovers.
    nj.checkpoint.save(run, {"w": np.zeros(2)}, step=10_000, keep=None)
    assert not any(n.startswith(".tmp-") for n in os.listdir(run))
    nj.checkpoint.release(run)


def test_second_writer_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    holder = _start("hold", str(run), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        host = socket.gethostname()
        with pytest.raises(
            CheckpointError,
            match=rf"is being written by another process \(pid {holder.pid} on host {host}, since ",
        ):
            nj.checkpoint.save(run, {"w": np.ones(4)}, step=9, keep=1)
        # The refused writer pruned nothing, and the holder's two newest steps restore.
        assert [s for s, _ in nj.checkpoint.all_steps(run)] == [2, 3]
        got, _ = nj.checkpoint.restore(run, {"w": np.zeros(4, np.float32)})
        np.testing.assert_array_equal(got["w"], np.full(4, 3.0))
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    # Once the first writer has exited, the folder is free.
    nj.checkpoint.save(run, {"w": np.ones(4)}, step=9, keep=1)
    assert [s for s, _ in nj.checkpoint.all_steps(run)] == [9]
    nj.checkpoint.release(run)


def test_a_process_may_save_again_into_its_own_folder_and_release_it(tmp_path):
    nj.checkpoint.save(tmp_path, {"w": np.ones(2)}, step=1)
    nj.checkpoint.save(tmp_path, {"w": np.ones(2)}, step=2)  # the lock is this process's
    nj.checkpoint.release(tmp_path)
    holder = _start("hold", str(tmp_path / "other"), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
    finally:
        holder.communicate("\n", timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_save_their_own_shards_and_restore_on_one_and_on_two(tmp_path):
    run = tmp_path / "run"
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [_start("multi", coordinator, str(i), str(run), str(outs[i])) for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-4000:]
    values = worker.sharded_values()
    # Saved: one array file per process, each holding only that process's shards.
    path = run / "step_000003"
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    assert names == ["arrays.00000-of-00002.safetensors", "arrays.00001-of-00002.safetensors"]
    keys = []
    for name in names:
        with safe_open(path / name, framework="np") as f:
            keys.append(sorted(f.keys()))
            for key in keys[-1]:  # each block equals the reference at its offset
                base, _, start = key.partition("@")
                block = f.get_tensor(key)
                at = [int(s) for s in start.split(",")] if start else [0] * block.ndim
                index = tuple(slice(a, a + n) for a, n in zip(at, block.shape, strict=True))
                np.testing.assert_array_equal(block, values[base][index], err_msg=key)
    assert sum(len(k) for k in keys) == 4 + 4 + 1 + 1  # 4 row blocks, 4 col blocks, bias, step
    assert all(any(k.startswith("rows@") for k in ks) for ks in keys)  # no gather to process 0
    # Restored on two processes, onto a 2 x 2 mesh: each process read only its blocks.
    for i, out in enumerate(outs):
        r = json.loads(out.read_text())
        assert r["devices"] == 4 and r["extra"] == {"who": "two processes"}
        assert r["equal"] == {"rows": True, "cols": True, "bias": True, "step": True}
        rows = {k for k in r["reads"] if k.startswith("rows")}
        mine = {f"rows@{a},0" for a in range(8) if 4 * i <= a < 4 * i + 4}
        assert rows and rows <= mine, (i, rows)
    # Restored on one process (this one, one device).
    for step in (3, 4):
        got, extra = nj.checkpoint.restore(run / f"step_{step:06d}", _target(values))
        assert extra == ({"who": "two processes"} if step == 3 else {})
        for name, want in values.items():
            np.testing.assert_array_equal(np.asarray(got[name]), want, err_msg=name)
