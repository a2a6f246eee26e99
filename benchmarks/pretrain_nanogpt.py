"""The pretraining recipe against nanoGPT's train.py, and a 124M Llama step's throughput.

    flock /tmp/nnjax-heavy.lock python benchmarks/pretrain_nanogpt.py
    python benchmarks/pretrain_nanogpt.py --smoke        # seconds: checks the plumbing

Part 1, side by side in one run on one machine, each a fresh process timed from the
outside (interpreter start, imports, data preparation, compilation, evaluation and
saving included): nanoGPT's CPU recipe for ``config/train_shakespeare_char.py``
(``benchmarks/nanogpt_torch.py``, PyTorch) and the same model, data, optimizer,
schedule and steps through ``examples/pretrain_llm.py --preset nanogpt-char``: as it
runs by default (on a CPU, one XLA device per core, the batch split over them: data
parallel; bfloat16 compute where the CPU has AMX or AVX-512 BF16), and in float32
(``--dtype float32``). The runs alternate,
``--repeats`` times.

Part 2: ``examples/pretrain_llm.py --preset llama-124m`` (GPT-2 small's sizes in Llama
blocks, 124M params): the tokens/s and MFU it reports, over the windows without
compilation.

Writes ``benchmarks/results/pretrain.json`` and ``pretrain.md``; the load average is
recorded beside every run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/tinyshakespeare/input.txt"
RESULTS = ROOT / "benchmarks/results"


def _load() -> float:
    return float(pathlib.Path("/proc/loadavg").read_text().split()[0])


def _run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its wall time from outside, its final val loss."""
    load = _load()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    losses = re.findall(r"final val loss ([0-9.]+)", proc.stdout)
    dtype = re.search(r"; compute (\w+)", proc.stdout)
    phases = re.search(r"wall time [0-9.]+ s: (.*)", proc.stdout)
    return {
        "phases": phases.group(1) if phases else None,  # the recipe's own account
        "compute": dtype.group(1) if dtype else "float32",
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),  # user + system over all threads: less sensitive to load
        "val_loss": float(losses[-1]),
        "load_before": load,
        "load_after": _load(),
        "tail": proc.stdout.strip().splitlines()[-4:],
        "stdout": proc.stdout,
    }


def side_by_side(data: str, repeats: int, smoke: bool, float32: bool = True) -> dict:
    py = sys.executable
    iters = ["--iters", "20"] if smoke else []
    steps = ["--steps", "50", "--eval-every", "25", "--log-every", "25"] if smoke else []
    runs: dict[str, list] = {"nanogpt_torch": [], "nnjax_default": [], "nnjax_float32": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs["nanogpt_torch"].append(
                _run([py, str(ROOT / "benchmarks/nanogpt_torch.py"), "--data", data, *iters])
            )
            recipe = [py, str(ROOT / "examples/pretrain_llm.py"), "--preset", "nanogpt-char"]
            recipe += ["--data", data, *steps]
            runs["nnjax_default"].append(_run([*recipe, "--out", f"{tmp}/default"]))
            if float32:
                runs["nnjax_float32"].append(
                    _run([*recipe, "--out", f"{tmp}/f32", "--dtype", "float32"])
                )
    for r in (r for v in runs.values() for r in v):
        r.pop("stdout")
    runs = {k: v for k, v in runs.items() if v}
    best = {k: min(r["wall_s"] for r in v) for k, v in runs.items()}
    return {"runs": runs, "best_wall_s": best}


def throughput_124m(data: str, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "examples/pretrain_llm.py"), "--preset", "llama-124m"]
        cmd += ["--data", data, "--out", tmp, "--no-export"]
        if smoke:
            cmd += ["--hidden-size", "64", "--layers", "2", "--heads", "4", "--kv-heads", "4"]
            cmd += ["--mlp-hidden", "128", "--vocab-size", "512", "--seq-len", "64"]
        run = _run(cmd)
        lines = pathlib.Path(f"{tmp}/logs/throughput.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
    timed = [r for r in records if "tokens_per_s" in r and not r["compile_included"]]
    params = re.search(r"([0-9.]+)M params", run.pop("stdout"))
    return {
        "wall_s": run["wall_s"],
        "compute": run["compute"],
        "load_before": run["load_before"],
        "load_after": run["load_after"],
        "windows": timed,
        "tokens_per_s": max(r["tokens_per_s"] for r in timed),
        "mfu": max(r["mfu"] for r in timed),
        "params_M": float(params.group(1)) if params else None,
        "log": run["tail"],
    }


def report(result: dict) -> str:
    sb = result["side_by_side"]
    torch_best = sb["best_wall_s"]["nanogpt_torch"]
    lines = [
        "# The pretraining recipe against nanoGPT's train.py",
        "",
        f"Machine: {result['machine']}. Whole-process wall time (fresh process, timed from "
        "outside), final val loss over 2,400 windows of 64 tokens (nanoGPT: 200 batches of 12; the recipe: 40 of 60).",
        "",
        "| run | compute | wall time (s) | x nanoGPT | CPU time (s) | val loss | load avg before/after |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, runs in sb["runs"].items():
        for r in runs:
            ratio = r["wall_s"] / torch_best
            lines.append(
                f"| {name} | {r['compute']} | {r['wall_s']:.1f} | {ratio:.2f} | {r.get('cpu_s', 0):.1f} | "
                f"{r['val_loss']:.4f} | {r['load_before']:.1f} / {r['load_after']:.1f} |"
            )
    medians = {k: statistics.median(r["wall_s"] for r in v) for k, v in sb["runs"].items()}
    lines.append(
        "\nMedian wall time: "
        + ", ".join(
            f"{k} {v:.1f} s ({v / medians['nanogpt_torch']:.3f}x)" for k, v in medians.items()
        )
        + "."
    )
    for name, runs in sb["runs"].items():
        for r in runs:
            if r.get("phases"):
                lines.append(f"\n{name}, inside the process: {r['phases']}.")
    t = result.get("throughput_124m")
    if t:
        lines += [
            "",
            f"124M Llama-shaped training step ({t['params_M']}M params, 4 x 512 tokens, "
            f"{t.get('compute', 'float32')} compute on the CPU): {t['tokens_per_s']:,.0f} "
            f"tokens/s, MFU {100 * t['mfu']:.2f}% of the assumed float32 CPU peak (load "
            f"{t['load_before']:.1f} / "
            f"{t['load_after']:.1f}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a few steps: the plumbing only")
    p.add_argument("--skip-124m", action="store_true")
    p.add_argument("--skip-float32", action="store_true", help="only the default recipe")
    p.add_argument("--out", default=str(RESULTS / "pretrain"), help="OUT.json and OUT.md")
    args = p.parse_args(argv)
    result: dict = {"machine": f"{os.cpu_count()} CPU cores ({os.uname().machine})"}
    result["side_by_side"] = side_by_side(
        args.data, args.repeats, args.smoke, float32=not args.skip_float32
    )
    if not args.skip_124m:
        result["throughput_124m"] = throughput_124m(args.data, args.smoke)
    text = report(result)
    print(text)
    if not args.smoke:
        pathlib.Path(args.out + ".json").write_text(json.dumps(result, indent=2))
        pathlib.Path(args.out + ".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
