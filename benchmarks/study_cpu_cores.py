"""Study: what a second core buys each framework on nanoGPT's CPU step.

nanoGPT's CPU recipe (batch 12 x context 64, 4 layers, width 128, 4 heads) is
trained one Adam step per call by each framework's gpt-char builder (default:
nnjax, hand-written JAX and PyTorch eager; ``--frameworks`` to choose), each in a
child process held to one core and to every core of this one
(``os.sched_setaffinity`` before the backend starts: XLA:CPU sizes its thread pool
from it, PyTorch gets ``set_num_threads``). Children run one after another,
interleaved in rounds. Per configuration: the median step time, the cores it kept
busy (process CPU time over wall time) and the speedup from one core to all.

The question it answers: is nnjax's gap to PyTorch on this step per-core speed or
use of the second core? (On the 2-core VM of 2026-11-29: use of the second core.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import resource
import statistics
import sys
import time

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.suite import FRAMEWORKS, available
from benchmarks.workloads import Config, child_json, config, median_ms

__all__ = ["NANOGPT", "main", "measure"]

NANOGPT = Config(batch=12, context=64, layers=4, width=128, heads=4)
_DEFAULT = ("nnjax", "jax", "torch")
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, cores: list[int], cfg: Config, steps: int, blocks: int) -> dict:
    """Median step ms and cores kept busy for ``name``, in this process, on ``cores``.

    Must run before this process starts a JAX backend or PyTorch's thread pool.
    """
    os.sched_setaffinity(0, cores)
    if FRAMEWORKS[name].requires == "torch":
        import torch

        torch.set_num_threads(len(cores))
    module = importlib.import_module(FRAMEWORKS[name].module)
    bench = module.build("gpt-char", cfg, **FRAMEWORKS[name].kwargs)
    bench.run(3)  # compile, warm up
    wall, cpu = time.perf_counter(), _cpu_s()
    block_ms = [median_ms(lambda: bench.run(1), steps) for _ in range(blocks)]
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    return {"step ms": statistics.median(block_ms), "cores busy": cpu / wall}


def _child(name: str, cores: list[int], quick: bool) -> dict:
    """:func:`measure` in a fresh process (the affinity must precede the backend)."""
    argv = ["benchmarks.study_cpu_cores", name, ",".join(map(str, cores))]
    return child_json(
        argv + (["--quick"] if quick else []), f"cpu-cores child {name} on cores {cores}", 900
    )


def main(args: argparse.Namespace, machine: dict) -> int:
    all_cores = sorted(os.sched_getaffinity(0))
    settings = {"1 core": all_cores[:1], f"{len(all_cores)} cores": all_cores}
    names = [n for n in (args.frameworks or _DEFAULT) if available(n)]
    for n in [n for n in names if FRAMEWORKS[n].kwargs]:
        print(f"  cpu-cores: {n} skipped (only plain per-step builders)", file=sys.stderr)
    names = [n for n in names if not FRAMEWORKS[n].kwargs]
    rounds = args.rounds or (1 if args.quick else 3)
    samples: dict[tuple[str, str], list[dict]] = {(n, s): [] for n in names for s in settings}
    for r in range(rounds):
        for name, setting in list(samples)[r % len(samples) :] + list(samples)[: r % len(samples)]:
            samples[name, setting].append(_child(name, settings[setting], args.quick))
            print(f"  cpu-cores {name} {setting}: {samples[name, setting][-1]}", file=sys.stderr)
    rows = []
    for name in names:
        row: dict = {"framework": name}
        for setting in settings:
            for key in ("step ms", "cores busy"):
                row[f"{setting} {key}"] = statistics.median(s[key] for s in samples[name, setting])
        one, many = (row[f"{s} step ms"] for s in settings)
        row["speedup"] = one / many
        rows.append(row)
    payload = {"machine": machine, "settings": list(settings), "rows": rows}
    cfg = config("gpt-char", True) if args.quick else NANOGPT
    text = _markdown(rows, list(settings), machine, rounds, cfg)
    write_study(args.out, "cpu-cores", args.quick, payload, text)
    return 0


def _markdown(
    rows: list[dict], settings: list[str], machine: dict, rounds: int, cfg: Config
) -> str:
    out = [
        "# nanoGPT's CPU step on one core and on all",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"Batch {cfg.batch} x context {cfg.context}, {cfg.layers} layers, width {cfg.width}: "
        "one Adam step per call, median ms "
        f"over {rounds} round(s) of one child process per cell; cores busy = the child's "
        "CPU time / wall time.",
        "",
        "| framework | "
        + " | ".join(f"{s}: step ms | {s}: cores busy" for s in settings)
        + " | speedup |",
        "|---|" + "---:|---:|" * len(settings) + "---:|",
    ]
    for r in rows:
        cells = [f"{fmt(r[f'{s} step ms'])} | {r[f'{s} cores busy']:.2f}" for s in settings]
        out.append(f"| {r['framework']} | " + " | ".join(cells) + f" | {r['speedup']:.2f}x |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # one child: framework, comma separated cores, [--quick]
    quick = "--quick" in sys.argv[3:]
    cfg = config("gpt-char", True) if quick else NANOGPT
    steps, blocks = (2, 2) if quick else (10, 5)
    cores = [int(c) for c in sys.argv[2].split(",")]
    print(json.dumps(measure(sys.argv[1], cores, cfg, steps, blocks)))
