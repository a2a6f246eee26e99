"""The other processes of ``tests/test_checkpoint_processes.py``: ``python -m tests.checkpoint_worker MODE ...``.

- ``hold DIR``: save steps 1-3 into DIR, print ``ready``, wait for a line on stdin, exit.
- ``loop DIR``: save ``state(k)`` for k = 1, 2, ... into DIR until killed (kill -9 test).
- ``multi COORDINATOR PROCESS_ID DIR OUT``: one of two ``jax.distributed`` CPU processes
  with 2 devices each: save a sharded state (blocking and not), restore it onto
  another mesh, and write what this process saw to ``OUT``.

Values come from :func:`state` and :func:`sharded_values` (NumPy, fixed seeds),
which the test process rebuilds as its reference.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

LEAVES = 8  # x (512, 1024) float32 = 2 MiB each: a save takes a noticeable moment


def state(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    out = {f"w{i}": rng.standard_normal((512, 1024), np.float32) for i in range(LEAVES)}
    out["step"] = np.asarray(k, np.int32)
    return out


def sharded_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "rows": rng.standard_normal((8, 6)).astype(np.float32),  # P("data")
        "cols": rng.standard_normal((4, 8)).astype(np.float32),  # P(None, "data")
        "bias": rng.standard_normal(6).astype(np.float32),  # replicated
        "step": np.asarray(3, np.int32),
    }


def hold(directory: str) -> None:
    import jax.numpy as jnp

    import nnjax as nj

    for k in (1, 2, 3):
        nj.checkpoint.save(directory, {"w": jnp.full(4, float(k))}, step=k, keep=2)
    print("ready", flush=True)
    sys.stdin.readline()


def loop(directory: str) -> None:
    import jax.numpy as jnp

    import nnjax as nj

    for k in range(1, 10_000):
        ts = {p: jnp.asarray(v) for p, v in state(k).items()}
        print(f"saving {k}", flush=True)
        nj.checkpoint.save(directory, ts, step=k, keep=2)


def _shardings(mesh: Any, specs: dict[str, Any]) -> dict[str, Any]:
    from jax.sharding import NamedSharding

    return {p: NamedSharding(mesh, s) for p, s in specs.items()}


def multi(coordinator: str, process_id: int, directory: str, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator, 2, process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    import nnjax as nj
    from nnjax.checkpoint import arrayfile

    values = sharded_values()
    mesh = nj.sharding.mesh({"data": 4})
    specs = {"rows": P("data"), "cols": P(None, "data"), "bias": P(), "step": P()}
    shardings = _shardings(mesh, specs)
    ts = {
        p: jax.make_array_from_callback(v.shape, shardings[p], lambda i, v=v: v[i])
        for p, v in values.items()
    }
    nj.checkpoint.save(directory, ts, step=3, extra={"who": "two processes"})
    nj.checkpoint.save(directory, ts, step=4, blocking=False)
    nj.checkpoint.wait(directory)
    multihost_utils.sync_global_devices("saved")
    # Restore onto another mesh, 2 x 2: each process needs half the rows and half the cols.
    mesh2 = nj.sharding.mesh({"data": 2, "model": 2})
    specs2 = {"rows": P("data"), "cols": P("model", "data"), "bias": P("model"), "step": P()}
    target = {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in values.items()}
    reads = []
    tensor, block = arrayfile.Reader.tensor, arrayfile.Reader.block

    def read_tensor(self: Any, key: str) -> np.ndarray:
        reads.append(key)
        return tensor(self, key)

    def read_block(self: Any, key: str, index: Any) -> np.ndarray:
        reads.append(key)
        return block(self, key, index)

    arrayfile.Reader.tensor, arrayfile.Reader.block = read_tensor, read_block
    got, extra = nj.checkpoint.restore(
        f"{directory}/step_000003", target, _shardings(mesh2, specs2)
    )
    arrayfile.Reader.tensor, arrayfile.Reader.block = tensor, block
    equal = {
        p: all(np.array_equal(np.asarray(s.data), values[p][s.index]) for s in a.addressable_shards)
        for p, a in got.items()
    }
    result = {
        "equal": equal,
        "extra": extra,
        "reads": reads,
        "shards": {p: len(a.addressable_shards) for p, a in got.items()},
        "devices": jax.device_count(),
    }
    with open(out, "w") as f:
        json.dump(result, f)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "hold":
        hold(*args)
    elif mode == "loop":
        loop(*args)
    else:
        multi(args[0], int(args[1]), args[2], args[3])
