"""nj.checkpoint faults: a background save on a script's last line, pieces that do not tile.

The scripts run in fresh interpreters (the fault is in interpreter shutdown); the
reference values are the arrays the scripts save, rebuilt here with NumPy.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import nnjax as nj
from nnjax.checkpoint import metadata

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAST_LINE = """
import sys
import threading
import jax.numpy as jnp
import nnjax as nj
{setup}
nj.checkpoint.save(sys.argv[1], {{"w": jnp.arange(6.0).reshape(2, 3)}}, step=1, blocking=False)
"""

FULL_DISK = """
from nnjax.checkpoint import arrayfile, saving
def write(path, tensors):
    raise OSError(28, "No space left on device")
arrayfile.write = write
"""


def _run(script: str, folder: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_background_save_on_a_scripts_last_line_is_written(tmp_path):
    """Before: 7 of 8 such runs wrote nothing (the hashing pool could not start at shutdown)."""
    for run in range(2):
        folder = tmp_path / f"run{run}"
        done = _run(LAST_LINE.format(setup=""), folder)
        assert done.returncode == 0, done.stderr
        assert "FAILED" not in done.stderr
        ts, _ = nj.checkpoint.restore(folder, {"w": jnp.zeros((2, 3))})
        np.testing.assert_array_equal(ts["w"], np.arange(6.0).reshape(2, 3))


def test_a_background_save_that_fails_at_exit_says_so_on_stderr(tmp_path):
    """A failure no ``save``/``wait`` raised is reported at exit, never only inside a future."""
    done = _run(LAST_LINE.format(setup=FULL_DISK), tmp_path)
    assert "background checkpoint save into" in done.stderr
    assert "FAILED, nothing was written: OSError: [Errno 28] No space left on device" in done.stderr
    assert nj.checkpoint.latest(tmp_path) is None


def _split_checkpoint(folder: pathlib.Path, starts: list[int], size: int) -> pathlib.Path:
    """A sealed checkpoint of ``w = arange(8)`` stored as pieces ``w[s:s+size]`` for each start."""
    path = pathlib.Path(nj.checkpoint.save(folder, {"w": jnp.arange(8.0)}, step=1))
    w = np.arange(8.0, dtype=np.float32)
    tensors = {f"w@{s}": w[s : s + size].copy() for s in starts}
    file = path / "arrays.safetensors"
    save_file(tensors, file)
    meta = json.loads((path / "metadata.json").read_text())
    data = file.read_bytes()
    meta["files"] = {
        "arrays.safetensors": {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "pieces": {f"w@{s}": {"path": "w", "start": [s], "shape": [size]} for s in starts},
        }
    }
    (path / "metadata.json").write_text(json.dumps(metadata.seal(meta)))
    return path


def test_pieces_that_overlap_or_leave_holes_are_refused(tmp_path):
    """Before: pieces [0, 4) and [2, 6) of an 8-element leaf (8 elements in all) restored
    ``w[6:8]`` from uninitialised memory, silently."""
    good = _split_checkpoint(tmp_path / "good", [0, 4], 4)
    ts, _ = nj.checkpoint.restore(good, {"w": jnp.zeros(8)})
    np.testing.assert_array_equal(ts["w"], np.arange(8.0))
    bad = _split_checkpoint(tmp_path / "bad", [0, 2], 4)
    with pytest.raises(
        nj.CheckpointError, match=r"corrupt metadata: leaf w: pieces w@0 and w@2 overlap"
    ):
        nj.checkpoint.restore(bad, {"w": jnp.zeros(8)})


def test_threads_saving_into_one_folder_each_save_or_get_a_checkpoint_error(tmp_path):
    """Before: a save's start removed the temporary folder another thread was writing,
    which failed with a raw FileNotFoundError (3 of 12 here)."""
    outcomes: dict[int, object] = {}

    def work(i: int) -> None:
        state = {"w": jnp.full((64, 64), float(i))}
        try:
            nj.checkpoint.save(tmp_path, state, step=i % 5, keep=None, blocking=i % 2 == 0)
            outcomes[i] = "saved"
        except Exception as e:
            outcomes[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nj.checkpoint.wait(tmp_path)
    errors = [e for e in outcomes.values() if e != "saved"]
    assert all(isinstance(e, nj.CheckpointError) for e in errors), errors
    assert all("exists already" in str(e) for e in errors)
    saved = [i for i, e in outcomes.items() if e == "saved"]
    assert sorted(i % 5 for i in saved) == [0, 1, 2, 3, 4]  # one winner per step
    for i in saved:
        ts, _ = nj.checkpoint.restore(tmp_path / f"step_{i % 5:06d}", {"w": jnp.zeros((64, 64))})
        np.testing.assert_array_equal(ts["w"], np.full((64, 64), float(i)))


SAVER = """
import sys
import threading
import jax.numpy as jnp
import nnjax as nj
k = int(sys.argv[2])
try:
    nj.checkpoint.save(sys.argv[1], {"w": jnp.full(4, float(k))}, step=k, keep=None)
    print("saved")
except nj.CheckpointError as e:
    print("refused:", e)
"""


def test_processes_saving_into_one_folder_each_save_or_are_told_who_holds_it(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, str(tmp_path), str(k)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for (out, err), p in zip(results, procs, strict=True):
        assert p.returncode == 0, err
        assert out.startswith("saved") or (
            out.startswith("refused:") and "is being written by another process (pid" in out
        ), out + err
    saved = [k for k, (out, _) in enumerate(results) if out.startswith("saved")]
    assert saved
    for k in saved:
        ts, _ = nj.checkpoint.restore(tmp_path / f"step_{k:06d}", {"w": jnp.zeros(4)})
        np.testing.assert_array_equal(ts["w"], np.full(4, float(k)))
