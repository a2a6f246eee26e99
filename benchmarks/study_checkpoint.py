"""Study: saving and restoring a ~2 GB train state, nnjax's checkpoints against the old format and orbax.

The state is an LLM-like float32 train state: params (a 32768 x 2048 embedding,
the largest tensor at 268 MB, and 3 blocks of attention and MLP kernels, 168M
params) with Adam's ``mu`` and ``nu`` (random, like a state in training, so no
format gains from compression), 2.0 GB in all. Each (format, operation) runs in a
fresh child process on one CPU device, which builds the state (save) or the
abstract target (restore), resets its peak RSS (``/proc/self/clear_refs``), then
times the operation and reads the peak (``VmHWM``). Extra RSS = the peak minus
the RSS before, less the state itself for a restore. Held = the peak of the host
buffers Python and NumPy allocated during the operation (``tracemalloc``, which
NumPy reports its array data to): what the format holds, a figure other processes
cannot disturb, unlike RSS (the quick run's smoke test checks this one).

Formats: ``old`` (nnjax before streaming: ``nnjax/checkpoint.py`` at commit
c563c31, taken from git into a temporary module),
``nnjax`` (``nj.checkpoint.save`` / ``restore``, streamed), ``nnjax-async``
(``blocking=False``: the time until ``save`` returns, then the total after
``wait``), ``orbax`` (``orbax.checkpoint.StandardCheckpointer``, its default
async save then ``wait_until_finished``). Targets: nnjax's extra RSS <= 1.2x the
largest tensor; nnjax's time <= orbax's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import child_json, reset_peak_rss, rss

__all__ = ["main", "state_shapes"]

FORMATS = ("old", "nnjax", "nnjax-async", "orbax")
OLD_COMMIT = "c563c31"  # the last commit with the one-bytes-object format
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_MB = 1e6


def state_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """``{param path: shape}``: an embedding and 3 blocks (1/16 of each width with ``quick``)."""
    d, v, f = (128, 2048, 256) if quick else (2048, 32768, 4096)
    shapes = {"embed/embedding": (v, d)}
    for b in range(3):
        shapes |= {
            f"blocks/{b}/attn/qkv/kernel": (d, 3 * d),
            f"blocks/{b}/attn/out/kernel": (d, d),
            f"blocks/{b}/mlp/up/kernel": (d, f),
            f"blocks/{b}/mlp/down/kernel": (f, d),
            f"blocks/{b}/norm/scale": (d,),
        }
    return shapes


def _build(quick: bool, abstract: bool):
    """The train state (params, Adam state over them) on device, or its ShapeDtypeStructs."""
    import jax
    import numpy as np
    import optax

    from nnjax.core.paths import unflatten
    from nnjax.training.trainer import TrainState

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = state_shapes(quick)
    rng = np.random.default_rng(0)

    def tree(seed_offset: int):
        if abstract:
            return unflatten(
                {p: jax.ShapeDtypeStruct(s, np.float32, sharding=device) for p, s in shapes.items()}
            )
        return unflatten(
            {p: jax.device_put(rng.random(s, dtype=np.float32), device) for p, s in shapes.items()}
        )

    params, mu, nu = tree(0), tree(1), tree(2)
    scalar = (
        jax.ShapeDtypeStruct((), np.int32, sharding=device)
        if abstract
        else jax.device_put(np.int32(1000), device)
    )
    opt_state = (optax.ScaleByAdamState(count=scalar, mu=mu, nu=nu), optax.EmptyState())
    return TrainState(scalar, params, {}, opt_state)


def _old_format() -> Any:
    """The pre-streaming module, from git, its two imports moved to today's floors."""
    text = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:nnjax/checkpoint.py"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    text = text.replace("from nnjax.errors import", "from nnjax.core.errors import")
    text = text.replace("from nnjax.paths import", "from nnjax.core.paths import")
    path = pathlib.Path(tempfile.mkdtemp()) / "nnjax_old_checkpoint.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("nnjax_old_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(fmt_name: str, folder: str, ts, old: Any) -> dict:
    import jax

    import nnjax as nj

    t0 = time.perf_counter()
    row = {}
    if fmt_name == "old":
        old.save(folder, ts, keep=None)
    elif fmt_name == "nnjax":
        nj.checkpoint.save(folder, ts, keep=None)
    elif fmt_name == "nnjax-async":
        nj.checkpoint.save(folder, ts, keep=None, blocking=False)
        row["returned s"] = time.perf_counter() - t0
        nj.checkpoint.wait(folder)
    else:
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(folder, "orbax"), ts)
        row["returned s"] = time.perf_counter() - t0
        ckptr.wait_until_finished()
    jax.effects_barrier()
    return {"s": time.perf_counter() - t0, **row}


def _restore(fmt_name: str, folder: str, target, old: Any):
    import jax

    import nnjax as nj

    if fmt_name == "old":
        ts, _ = old.restore(folder, target)
    elif fmt_name.startswith("nnjax"):
        ts, _ = nj.checkpoint.restore(folder, target)
    else:
        import orbax.checkpoint as ocp

        ts = ocp.StandardCheckpointer().restore(os.path.join(folder, "orbax"), target)
    return jax.block_until_ready(ts)


def child(fmt_name: str, op: str, folder: str, quick: bool) -> dict:
    """One measurement in this (fresh) process: ``{"s", "extra_mb", ...}``."""
    import jax

    from nnjax.core.report import param_bytes

    state = _build(quick, abstract=op == "restore")
    state_bytes = param_bytes(state)
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    old = _old_format() if fmt_name == "old" else None
    rss0, _ = rss()
    reset_peak_rss()
    tracemalloc.start()
    if op == "save":
        row = _save(fmt_name, folder, state, old)
        extra = rss()[1] - rss0
    else:
        t0 = time.perf_counter()
        got = _restore(fmt_name, folder, state, old)
        row = {"s": time.perf_counter() - t0}
        extra = rss()[1] - rss0 - state_bytes
    held = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if op == "restore":
        want = _build(quick, abstract=False)  # the same seeds: a bit-exact round trip
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            if not bool((a == b).all()):
                raise AssertionError(f"{fmt_name}: restored values differ")
    return {
        **row,
        "extra_mb": extra / _MB,
        "held_mb": held / _MB,
        "state_mb": state_bytes / _MB,
        "largest_mb": largest / _MB,
    }


def _run_child(fmt_name: str, op: str, folder: str, quick: bool) -> dict:
    argv = ["benchmarks.study_checkpoint", fmt_name, op, folder] + (["--quick"] if quick else [])
    return child_json(argv, f"checkpoint child {fmt_name} {op}", 1800, {"JAX_PLATFORMS": "cpu"})


def main(args: argparse.Namespace, machine: dict) -> int:
    formats = [f for f in FORMATS if f != "orbax" or _has_orbax()]
    rounds = args.rounds or 1
    samples: dict[tuple[str, str], list[dict]] = {
        (f, o): [] for f in formats for o in ("save", "restore")
    }
    for r in range(rounds):
        for fmt_name in formats[r % len(formats) :] + formats[: r % len(formats)]:
            folder = tempfile.mkdtemp(prefix=f"nnjax-ckpt-study-{fmt_name}-")
            try:
                for op in ("save", "restore"):
                    samples[fmt_name, op].append(_run_child(fmt_name, op, folder, args.quick))
                    print(
                        f"  checkpoint {fmt_name} {op}: {samples[fmt_name, op][-1]}",
                        file=sys.stderr,
                    )
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for fmt_name in formats:
        row = {"format": fmt_name}
        for op in ("save", "restore"):
            s = samples[fmt_name, op]
            for key in ("s", "returned s", "extra_mb", "held_mb"):
                if key in s[0]:
                    row[f"{op} {key}"] = statistics.median(x[key] for x in s)
            row["state_mb"], row["largest_mb"] = s[0]["state_mb"], s[0]["largest_mb"]
        rows.append(row)
    payload = {"machine": machine, "rounds": rounds, "quick": args.quick, "rows": rows}
    write_study(args.out, "checkpoint", args.quick, payload, _markdown(rows, machine, rounds))
    return 0


def _has_orbax() -> bool:
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        print(
            "  checkpoint: orbax-checkpoint is not installed; its row is left out", file=sys.stderr
        )
        return False
    return True


def _markdown(rows: list[dict], machine: dict, rounds: int) -> str:
    r0 = rows[0]
    out = [
        "# Saving and restoring a train state: nnjax, its old format, orbax",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"A float32 train state (params + Adam mu and nu) of {r0['state_mb']:,.0f} MB; the "
        f"largest tensor is {r0['largest_mb']:,.0f} MB. One fresh process per cell, median of "
        f"{rounds} round(s). Extra RSS = peak RSS during the operation minus the RSS before "
        "(for a restore, less the restored state). Held = peak host buffers allocated "
        "during the operation (tracemalloc). Async rows: time until `save` returned, then "
        "the total.",
        "",
        "| format | save s | save returned s | save extra RSS MB | x largest | save held MB | "
        "restore s | restore extra RSS MB | x largest | restore held MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        big = r["largest_mb"]
        out.append(
            f"| {r['format']} | {fmt(r['save s'])} | {fmt(r.get('save returned s'))} | "
            f"{fmt(r['save extra_mb'])} | {r['save extra_mb'] / big:.2f} | "
            f"{fmt(r.get('save held_mb'))} | "
            f"{fmt(r['restore s'])} | {fmt(r['restore extra_mb'])} | "
            f"{r['restore extra_mb'] / big:.2f} | {fmt(r.get('restore held_mb'))} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # one child: format, save|restore, folder, [--quick]
    fmt_name, op, folder = sys.argv[1:4]
    print(json.dumps(child(fmt_name, op, folder, "--quick" in sys.argv[4:])))
