"""Study: the GPT's training throughput at a larger size (tokens/s and model FLOP/s).

A character GPT of context 256, 6 layers, width 384, 6 heads (about 10.8M
params), batch 8, trained with Adam, built by each framework's gpt-char builder
(default: nnjax, hand-written JAX and PyTorch eager; ``--frameworks`` to choose),
interleaved in rounds. Model FLOPs per token use the usual estimate
``6 N + 12 L T d`` (N = non-embedding params; forward + backward).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.suite import FRAMEWORKS, UnavailableError, available, time_rounds
from benchmarks.workloads import Config, Timing, config, expected_params

__all__ = ["main", "SCALE", "flops_per_token"]

SCALE = Config(batch=8, context=256, layers=6, width=384, heads=6)
_TIMING = Timing(block=2, warmup=1, fused=1)
_QUICK_TIMING = Timing(block=2, warmup=1, fused=1)
_DEFAULT = ("nnjax", "jax", "torch")


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: ``6 N + 12 L T d`` (N without the embedding tables)."""
    n = expected_params("gpt-char", cfg) - (cfg.vocab + cfg.context) * cfg.width
    return 6.0 * n + 12.0 * cfg.layers * cfg.context * cfg.width


def main(args: argparse.Namespace, machine: dict) -> int:
    cfg = config("gpt-char", True) if args.quick else SCALE
    tim = _QUICK_TIMING if args.quick else _TIMING
    rounds = args.rounds or (1 if args.quick else 3)
    names = [n for n in (args.frameworks or _DEFAULT) if not FRAMEWORKS[n].kwargs.get("fused")]
    rows, benches = [], {}
    for name in names:
        row = {"framework": name, "status": "ok"}
        rows.append(row)
        try:
            if not available(name):
                raise UnavailableError(f"{FRAMEWORKS[name].requires} is not installed")
            module = importlib.import_module(FRAMEWORKS[name].module)
            bench = module.build("gpt-char", cfg, **FRAMEWORKS[name].kwargs)
            t0 = time.perf_counter()
            bench.run(1)
            row["first_call_s"] = time.perf_counter() - t0
            bench.run(tim.warmup)
            row["params"] = bench.n_params
            benches[name] = bench
            print(f"  gpt-scale {name:15s} built", file=sys.stderr)
        except UnavailableError as err:
            row.update(status="skipped", reason=str(err))
    stats = time_rounds(benches, tim, rounds, label="gpt-scale")
    tokens = cfg.batch * cfg.context
    for row in rows:
        if row["status"] != "ok":
            continue
        row.update(stats[row["framework"]])
        row["tokens_per_s"] = tokens / (row["step_ms"] * 1e-3)
        row["model_gflops_per_s"] = row["tokens_per_s"] * flops_per_token(cfg) / 1e9
    payload = {"machine": machine, "config": cfg._asdict(), "rows": rows}
    write_study(args.out, "gpt-scale", args.quick, payload, _markdown(rows, cfg, machine, rounds))
    return 0


def _markdown(rows, cfg, machine, rounds) -> str:
    jax_ms = next((r["step_ms"] for r in rows if r["framework"] == "jax" and "step_ms" in r), None)
    out = [
        "# GPT throughput at a larger size",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"GPT vocab {cfg.vocab}, context {cfg.context}, {cfg.layers} layers, width {cfg.width}, "
        f"{cfg.heads} heads, batch {cfg.batch} ({expected_params('gpt-char', cfg):,} params); "
        f"full Adam train step, median of {rounds} interleaved rounds. Model FLOP/s use "
        f"{flops_per_token(cfg) / 1e6:.1f} MFLOP per token (6N + 12LTd).",
        "",
        "| framework | step ms | x jax | tokens/s | model GFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['framework']} | {r['status']} | | | |")
            continue
        ratio = f"{r['step_ms'] / jax_ms:.2f}x" if jax_ms else "-"
        out.append(
            f"| {r['framework']} | {fmt(r['step_ms'])} | {ratio} | {fmt(r['tokens_per_s'])} | "
            f"{fmt(r['model_gflops_per_s'])} |"
        )
    return "\n".join(out) + "\n"
