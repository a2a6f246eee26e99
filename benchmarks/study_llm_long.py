"""Study: long sequences on the Qwen2-0.5B shape: nnjax LoRA beside transformers+peft LoRA.

The ``llm-finetune`` study's rows (LoRA rank 16 on every projection, AdamW, random
weights; :mod:`benchmarks.study_llm_finetune` builds both sides) at long sequences,
each cell in a fresh process:

- **step at 2,048 tokens**: nnjax (attention ``None``: blockwise on CPU; no remat)
  beside transformers+peft (its default attention, no gradient checkpointing); the
  median of the timed steps. Target: nnjax <= 0.8x.
- **peak memory at 4,096 tokens**: nnjax with ``remat=True`` (each block keeps its
  input; the loss never holds the ``(T, V)`` logits) beside transformers+peft. peft's
  24-layer peak at 4,096 tokens does not fit beside the other work on a 24 GB
  machine, so it is extrapolated from measured 4- and 8-layer models (peak memory is
  linear in depth: the params and each layer's saved activations); nnjax is measured
  at 24 layers. Target: nnjax <= 0.5x.
- **the longest sequence that trains in 8 GB** (the whole process's peak RSS,
  compilation included): each side's lengths in order until one passes 8 GB (nnjax's
  list ends at 4,096 tokens, so its figure is a lower bound). Target: nnjax >= 2x.

Peak RSS is ``VmHWM`` (libraries included). Load averages are recorded per cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import child_json

__all__ = ["main", "cells"]

LIMIT_MB = 8000.0
_STEP_TOKENS, _MEMORY_TOKENS = 2048, 4096
_PEFT_LENGTHS = (512, 768, 1024)
_NNJAX_LENGTHS = (2048, 4096)


def cells(quick: bool) -> list[dict[str, Any]]:
    """The measured cells, in run order (``quick``: a tiny model, short sequences): each
    ``{"name", "side", "tokens", "layers" (None: the model's), "remat", "steps"}``."""
    scale = 16 if quick else 1
    step, mem = _STEP_TOKENS // scale, _MEMORY_TOKENS // scale
    out = [
        dict(name="step nnjax", side="nnjax", tokens=step, layers=None, remat=False, steps=2),
        dict(name="step peft", side="peft", tokens=step, layers=None, remat=False, steps=2),
        dict(name="memory nnjax", side="nnjax", tokens=mem, layers=None, remat=True, steps=1),
    ]
    for layers in (4, 8):
        name = f"memory peft {layers} layers"
        out.append(dict(name=name, side="peft", tokens=mem, layers=layers, remat=False, steps=1))
    return out


def _child(spec: dict[str, Any]) -> dict:
    import os

    from benchmarks import study_llm_finetune as ft

    shape = ft.qwen2_05b_shape(spec.get("quick", False))
    shape["tokens"] = spec["tokens"]
    if spec["layers"]:
        shape["num_layers"] = spec["layers"]
    if spec["side"] == "nnjax":
        out = ft._nnjax("nnjax lora", shape, spec["steps"], remat=spec["remat"])
    else:
        out = ft._torch(shape, spec["steps"])
    return {**out, "layers": shape["num_layers"], "load": os.getloadavg()[0]}


def _run(spec: dict[str, Any], quick: bool) -> dict:
    argv = ["benchmarks.study_llm_long", json.dumps({**spec, "quick": quick})]
    what = f"llm-long child {spec['name']} {spec['tokens']}"
    out = child_json(argv, what, 3600, {"JAX_PLATFORMS": "cpu"})
    print(f"  llm-long {spec['name']} {spec['tokens']}: {out}", file=sys.stderr)
    return {**spec, **out, "whole_peak_mb": max(out["peak_mb"], out["first_peak_mb"])}


def _longest(side: str, lengths: tuple[int, ...], quick: bool, known: list[dict]) -> list[dict]:
    """Cells at each length in order until one passes the limit (reusing ``known`` cells)."""
    rows = []
    for t in lengths:
        hit = [
            r
            for r in known
            if r["side"] == side and r["tokens"] == t and r["name"] == "memory nnjax"
        ]
        spec = dict(name=f"8 GB {side}", side=side, tokens=t, layers=None, steps=1)
        spec["remat"] = side == "nnjax"
        if hit and hit[0]["remat"] == spec["remat"]:
            row = {**hit[0], "name": spec["name"]}  # the cell already measured
        else:
            row = _run(spec, quick)
        rows.append(row)
        if row["whole_peak_mb"] > LIMIT_MB:
            break
    return rows


def main(args: argparse.Namespace, machine: dict) -> int:
    quick = args.quick
    rows = [_run(spec, quick) for spec in cells(quick)]
    scale = 16 if quick else 1
    rows += _longest("peft", tuple(t // scale for t in _PEFT_LENGTHS), quick, rows)
    rows += _longest("nnjax", tuple(t // scale for t in _NNJAX_LENGTHS), quick, rows)
    payload = {"machine": machine, "quick": quick, "rows": rows, "summary": _summary(rows)}
    write_study(args.out, "llm-long", quick, payload, _markdown(rows, payload["summary"], machine))
    return 0


def _summary(rows: list[dict]) -> dict[str, Any]:
    def one(name: str) -> dict:
        return next(r for r in rows if r["name"] == name)

    def per_24(side: str) -> float:
        p4, p8 = one(f"memory {side} 4 layers"), one(f"memory {side} 8 layers")
        return p8["peak_mb"] + (24 - 8) * (p8["peak_mb"] - p4["peak_mb"]) / 4

    def longest(side: str) -> int:
        tried = [r for r in rows if r["name"] == f"8 GB {side}"]
        return max((r["tokens"] for r in tried if r["whole_peak_mb"] <= LIMIT_MB), default=0)

    step_ratio = one("step nnjax")["step_s"] / one("step peft")["step_s"]
    peft_24 = per_24("peft")
    return {
        "step_ratio": step_ratio,
        "nnjax_memory_mb": one("memory nnjax")["peak_mb"],
        "peft_memory_24_from_layers_mb": peft_24,
        "memory_ratio": one("memory nnjax")["peak_mb"] / peft_24,
        "longest_nnjax": longest("nnjax"),
        "longest_peft": longest("peft"),
    }


def _markdown(rows: list[dict], s: dict, machine: dict) -> str:
    out = [
        "# Long sequences: LoRA on a Qwen2-0.5B-shaped model, nnjax beside transformers+peft",
        "",
        f"Measured {machine_line(machine)}",
        "",
        "Width 896, vocab 151,936, batch 1, LoRA rank 16 on every "
        "attention and MLP projection, AdamW. One fresh process per cell. nnjax's attention is "
        "its CPU default (blockwise from 256 keys); `remat` keeps only each block's input "
        "for the backward pass. Peak RSS while training (after the first step) and over the "
        "whole process (compilation included); load is the 1-minute average at the end.",
        "",
        "| cell | tokens | layers | remat | step s | peak RSS MB | whole-process peak MB | load |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['tokens']} | {r['layers']} | {r['remat']} | "
            f"{fmt(r['step_s'])} | {fmt(r['peak_mb'])} | {fmt(r['whole_peak_mb'])} | "
            f"{r['load']:.1f} |"
        )
    longest_ratio = s["longest_nnjax"] / max(s["longest_peft"], 1)
    out += [
        "",
        f"- Step at {rows[0]['tokens']} tokens: nnjax / peft = {s['step_ratio']:.2f}x "
        "(target <= 0.8x).",
        f"- Peak at {rows[2]['tokens']} tokens: nnjax {fmt(s['nnjax_memory_mb'])} MB measured; peft "
        f"{fmt(s['peft_memory_24_from_layers_mb'])} MB extrapolated from 4 and 8 layers: "
        f"{s['memory_ratio']:.2f}x (target <= 0.5x).",
        f"- Longest that trains in {LIMIT_MB / 1000:.0f} GB (lengths tried in order): nnjax "
        f">= {s['longest_nnjax']}, peft {s['longest_peft']} (< the next length tried): "
        f"{longest_ratio:.1f}x (target >= 2x).",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # one cell: its JSON spec
    print(json.dumps(_child(json.loads(sys.argv[1]))))
