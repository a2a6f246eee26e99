"""The main suite: build every framework's step for a workload, then time them in rounds.

Per workload: each framework's step is built and called once (that first call
compiles: ``compile_s`` is the first call's wall time minus the steady per-call
median), warmed up, and then timed in rounds. Each round times a block of
individually waited-for calls of every framework, in an order that rotates by
one each round, so slow drift of the machine hits every framework alike.
``step_ms`` is the median over all rounds of the per-optimizer-step time.
For tiny-mlp each round also times a plain Python loop of ``loop`` steps
(one wait at the end): ``loop_ms`` is its per-step median.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import sys
import time
import traceback
from typing import Any, NamedTuple

import numpy as np

from benchmarks.machine import LoadMeter, wait_idle
from benchmarks.workloads import (
    WORKLOADS,
    Bench,
    Timing,
    UnavailableError,
    config,
    expected_params,
    timing,
)

__all__ = [
    "Framework",
    "FRAMEWORKS",
    "UnavailableError",
    "available",
    "run_workload",
    "time_rounds",
]


class Framework(NamedTuple):
    module: str  # benchmarks.fw_* module with build(workload, cfg, **kwargs) -> Bench
    requires: str  # top-level package that must be importable
    kwargs: dict  # extra build arguments; "fused": True is replaced by the workload's k
    workloads: tuple[str, ...] = WORKLOADS  # the workloads it applies to (others: no row)


FRAMEWORKS: dict[str, Framework] = {
    "nnjax": Framework("benchmarks.fw_nnjax", "nnjax", {}),
    "nnjax-fused": Framework("benchmarks.fw_nnjax", "nnjax", {"fused": True}),
    "nnjax-onednn": Framework(
        "benchmarks.fw_nnjax", "nnjax", {"onednn": True}, workloads=("gpt-char",)
    ),
    "nnjax-unrolled": Framework(
        "benchmarks.fw_nnjax", "nnjax", {"stack": "unrolled"}, workloads=("gpt-char",)
    ),
    "nnjax-dp": Framework(
        "benchmarks.fw_nnjax",
        "nnjax",
        {"data_parallel": True},
        workloads=("lenet-cnn", "gpt-char"),
    ),
    "jax": Framework("benchmarks.fw_jax", "jax", {}),
    "jax-fused": Framework("benchmarks.fw_jax", "jax", {"fused": True}),
    "flax-linen": Framework("benchmarks.fw_linen", "flax", {}),
    "flax-nnx": Framework("benchmarks.fw_nnx", "flax", {"style": "jit"}),
    "flax-nnx-split": Framework("benchmarks.fw_nnx", "flax", {"style": "split"}),
    "equinox": Framework("benchmarks.fw_equinox", "equinox", {}),
    "haiku": Framework("benchmarks.fw_haiku", "haiku", {}),
    "torch": Framework("benchmarks.fw_torch", "torch", {}),
    "torch-compile": Framework("benchmarks.fw_torch", "torch", {"compile": True}),
}
"""Every framework the suite knows, in table order. ``jax`` is the baseline."""


def available(name: str) -> bool:
    """Whether ``name``'s package is installed (without importing it)."""
    return importlib.util.find_spec(FRAMEWORKS[name].requires) is not None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _last(loss: Any) -> float:
    """The last loss of a call (fused calls may return all ``k``)."""
    return float(np.asarray(loss).reshape(-1)[-1])


def _build(name: str, workload: str, quick: bool) -> Bench:
    fw = FRAMEWORKS[name]
    if not available(name):
        raise UnavailableError(f"{fw.requires} is not installed")
    kwargs = dict(fw.kwargs)
    if kwargs.get("fused"):
        kwargs["fused"] = timing(workload, quick).fused
    module = importlib.import_module(fw.module)
    return module.build(workload, config(workload, quick), **kwargs)


def run_workload(
    workload: str,
    frameworks: list[str],
    *,
    quick: bool,
    rounds: int,
    wait_idle_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Build, compile, warm up and time ``frameworks`` on ``workload``; one row per framework."""
    cfg, tim = config(workload, quick), timing(workload, quick)
    expected = expected_params(workload, cfg)
    rows: dict[str, dict[str, Any]] = {}
    benches: dict[str, Bench] = {}
    # A throwaway hand-written JAX step first, so that the one-time costs of the first
    # compile and first run in this process are not charged to whichever framework is first.
    if not quick:  # (--quick compile times are not measurements anyway)
        importlib.import_module("benchmarks.fw_jax").build(workload, cfg).run(1)
    for name in [f for f in frameworks if workload in FRAMEWORKS[f].workloads]:
        row: dict[str, Any] = {"workload": workload, "framework": name, "status": "ok"}
        row["expected_params"] = expected
        rows[name] = row
        try:
            t0 = time.perf_counter()
            bench = _build(name, workload, quick)
            row["build_s"] = time.perf_counter() - t0
            row.update(params=bench.n_params, steps_per_call=bench.steps_per_call, note=bench.note)
            if bench.n_params != expected:
                raise ValueError(f"{bench.n_params} params, expected {expected}")
            t0 = time.perf_counter()
            row["loss_first"] = _last(bench.run(1))
            row["first_call_s"] = bench.first_call_s or time.perf_counter() - t0
            bench.run(tim.warmup)
            benches[name] = bench
            _log(
                f"  {workload:10s} {name:15s} built in {row['build_s']:.2f} s, "
                f"first call {row['first_call_s']:.2f} s"
            )
        except UnavailableError as err:
            row.update(status="skipped", reason=str(err))
            _log(f"  {workload:10s} {name:15s} skipped: {err}")
        except Exception as err:
            row.update(status="error", reason=f"{type(err).__name__}: {err}")
            _log(f"  {workload:10s} {name:15s} ERROR {err}\n{traceback.format_exc()}")

    stats = time_rounds(benches, tim, rounds, wait_idle_s=wait_idle_s, label=workload)
    for name, bench in benches.items():
        row = rows[name]
        row.update(stats[name])
        per_call_s = row["step_ms"] * 1e-3 * bench.steps_per_call
        row["compile_s"] = max(row["first_call_s"] - per_call_s, 0.0)
        row["loss_last"] = _last(bench.run(1))
    _add_ratios(list(rows.values()))
    return list(rows.values())


def time_rounds(
    benches: dict[str, Bench],
    tim: Timing,
    rounds: int,
    *,
    wait_idle_s: float = 0.0,
    label: str = "",
) -> dict[str, dict[str, Any]]:
    """Time compiled, warmed-up ``benches`` in ``rounds`` rounds of rotating order.

    Returns per bench: ``step_ms`` (median per optimizer step), ``step_ms_min``,
    ``samples``, ``loop_ms`` (if ``tim.loop``; per-step bench only), ``own_cores`` and
    ``other_cores`` (mean cores this / other processes used while it was timed).
    """
    times: dict[str, list[float]] = {n: [] for n in benches}
    loops: dict[str, list[float]] = {n: [] for n in benches}
    meters = {n: LoadMeter() for n in benches}
    names = list(benches)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            bench = benches[name]
            if wait_idle_s:
                wait_idle(wait_idle_s)
            meters[name].start()
            for _ in range(tim.block):
                t0 = time.perf_counter()
                bench.run(1)
                times[name].append((time.perf_counter() - t0) / bench.steps_per_call)
            if tim.loop and bench.steps_per_call == 1:
                t0 = time.perf_counter()
                bench.run(tim.loop)
                loops[name].append((time.perf_counter() - t0) / tim.loop)
            meters[name].stop()
        _log(f"  {label:10s} round {r + 1}/{rounds} done")
    stats = {}
    for name in names:
        stats[name] = {
            "step_ms": 1e3 * statistics.median(times[name]),
            "step_ms_min": 1e3 * min(times[name]),
            "samples": len(times[name]),
            "own_cores": meters[name].own(),
            "other_cores": meters[name].total(),
        }
        if loops[name]:
            stats[name]["loop_ms"] = 1e3 * statistics.median(loops[name])
    return stats


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    ok = {r["framework"]: r for r in rows if r["status"] == "ok"}
    for base in ("jax", "torch"):
        ref = ok.get(base)
        for row in ok.values():
            row[f"ratio_{base}"] = row["step_ms"] / ref["step_ms"] if ref else None
            if base == "jax":
                row["compile_ratio_jax"] = (
                    row["compile_s"] / ref["compile_s"] if ref and ref["compile_s"] > 0 else None
                )
