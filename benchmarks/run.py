"""Command line: ``python -m benchmarks [--quick] [--workloads ...] [--frameworks ...] ...``.

Runs the main suite (every framework on every workload, see ``benchmarks.suite``)
or, with ``--study``, one of the further studies, and writes markdown, JSON and
a PNG chart into ``--out`` (``benchmarks/results``). ``--quick`` uses tiny sizes,
a few steps and XLA's cheapest optimisation level: a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import time

from benchmarks.machine import describe
from benchmarks.report import markdown, write_chart, write_json
from benchmarks.suite import FRAMEWORKS, available, run_workload
from benchmarks.workloads import WORKLOADS

__all__ = ["main", "parse_args", "STUDIES", "DEFAULT_OUT"]

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"
STUDIES = {
    "compile-depth": "benchmarks.study_compile_depth",
    "finetune": "benchmarks.study_finetune",
    "gpt-scale": "benchmarks.study_gpt_scale",
    "cpu-conv": "benchmarks.study_cpu_conv",
    "cpu-matmul": "benchmarks.study_cpu_matmul",
    "cpu-cores": "benchmarks.study_cpu_cores",
    "checkpoint": "benchmarks.study_checkpoint",
    "llm": "benchmarks.study_llm",
    "llm-finetune": "benchmarks.study_llm_finetune",
    "llm-long": "benchmarks.study_llm_long",
    "moe": "benchmarks.study_moe",
    "dpo": "benchmarks.study_dpo",
    "decode-products": "benchmarks.study_decode_products",
}
_QUICK_SKIP = ("torch-compile",)  # its first compile takes ~40 s per model on a small CPU
# --quick checks that everything runs, not how fast: compile with XLA's cheapest
# CPU optimisation level (halves the run). Set before jax starts its backend.
_QUICK_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.replace(",", " ").split() if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Train-step benchmarks: nnjax beside hand-written JAX, Flax (linen, NNX), "
        "Equinox, Haiku and PyTorch, interleaved in rounds. Writes <out>/<name>.{md,json,png}.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, few steps, cheap XLA compiles: a smoke run",
    )
    p.add_argument(
        "--workloads",
        type=_csv(WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma/space separated subset of {', '.join(WORKLOADS)} (default: all)",
    )
    p.add_argument(
        "--frameworks",
        type=_csv(FRAMEWORKS),
        default=None,
        help=f"subset of {', '.join(FRAMEWORKS)} (default: every installed one; "
        "--quick leaves out torch-compile unless named)",
    )
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; quick 2)")
    p.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})"
    )
    p.add_argument(
        "--name",
        default=None,
        help="output file stem (default 'suite', 'quick-suite' with --quick)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each timed block wait up to S seconds for other processes to go idle",
    )
    p.add_argument(
        "--study",
        action="append",
        choices=list(STUDIES),
        default=None,
        help="run a further study instead of the main suite (repeatable): "
        "compile-depth (GPT compile time vs depth, repeat vs unrolled), "
        "finetune (full vs frozen backbone vs LoRA), gpt-scale (tokens/s of a bigger GPT), "
        "cpu-conv (XLA convolution vs im2col by input channels), "
        "cpu-matmul (one matmul, XLA:CPU vs PyTorch on 1 and all threads), "
        "cpu-cores (nanoGPT's step on one core and on all, per framework)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=2,
        metavar="N",
        help="XLA CPU devices in this process (jax_num_cpu_devices, default 2): "
        "single-device rows run on the first, nnjax-dp splits the batch over all",
    )
    p.add_argument(
        "--render",
        type=pathlib.Path,
        metavar="JSON",
        help="only rewrite the markdown and PNG of an earlier suite run from its JSON",
    )
    p.add_argument(
        "--depths",
        default=None,
        help="compile-depth: comma separated layer counts (default 2,4,8,16,32; quick 2,4)",
    )
    return p.parse_args(argv)


def _frameworks(args: argparse.Namespace) -> list[str]:
    if args.frameworks is not None:  # in table order, each once
        return [n for n in FRAMEWORKS if n in args.frameworks]
    names = [n for n in FRAMEWORKS if available(n)]
    return [n for n in names if not (args.quick and n in _QUICK_SKIP)]


def _write(out: pathlib.Path, name: str, payload: dict) -> str:
    """``<out>/<name>.{json,md,png}`` of a suite run; returns the markdown."""
    machine, rows = payload["machine"], payload["rows"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", payload)
    text = markdown(rows, machine, quick=payload["quick"], rounds=payload["rounds"])
    (out / f"{name}.md").write_text(text)
    write_chart(
        out / f"{name}.png",
        rows,
        title_text=f"{machine['cpu']}, {machine['usable_cores']} cores, {machine['date']}",
    )
    return text


def _set_cpu_devices(n: int) -> None:
    """``jax_num_cpu_devices``; it only takes before JAX starts its backends."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:  # backends already started (an in-process caller)
        print(f"--cpu-devices {n} not applied: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        print(_write(args.render.parent, args.render.stem, payload))
        return 0
    if args.quick and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "").split()
        extra = [f for f in _QUICK_XLA_FLAGS if f.split("=")[0] not in " ".join(flags)]
        os.environ["XLA_FLAGS"] = " ".join([*flags, *extra])
    _set_cpu_devices(args.cpu_devices)
    machine = describe()
    if args.study:
        rc = 0
        for study in args.study:
            module = importlib.import_module(STUDIES[study])
            rc |= module.main(args, machine)
        return rc
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    frameworks = _frameworks(args)
    name = args.name or ("quick-suite" if args.quick else "suite")
    print(f"frameworks: {', '.join(frameworks)}; rounds: {rounds}", file=sys.stderr)
    t0 = time.perf_counter()
    rows = []
    for workload in args.workloads:
        rows += run_workload(
            workload, frameworks, quick=args.quick, rounds=rounds, wait_idle_s=args.wait_idle
        )
    machine["load_average_end"] = describe()["load_average"]
    machine["wall_s"] = time.perf_counter() - t0
    payload = {"quick": args.quick, "rounds": rounds, "machine": machine, "rows": rows}
    print(_write(args.out, name, payload))
    print(f"wrote {args.out / name}.{{md,json,png}} in {machine['wall_s']:.0f} s", file=sys.stderr)
    return 1 if any(r["status"] == "error" for r in rows) else 0
