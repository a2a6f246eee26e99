"""Study: a ~124M-parameter Llama-shaped model in nnjax and in transformers: loading, greedy decoding, training steps.

One random ``LlamaForCausalLM`` (width 768, 12 layers, 12 query / 4 key-value
heads, MLP 2048, vocab 32000, untied head; float32) is saved once with
``save_pretrained``; every measurement then loads that folder, so both sides run
the same weights. Each cell runs in a fresh child process:

- ``load``: ``nj.models.hf.from_pretrained`` against
  ``transformers.AutoModelForCausalLM.from_pretrained``: wall time and peak RSS
  beyond the process's RSS before the call (``/proc/self/status`` ``VmHWM`` after
  ``clear_refs``).
- ``decode``: greedy decoding of 64 new tokens after a 16-token prompt, batch 1 and
  8 (``nj.models.generate(..., temperature=0)`` against ``generate(do_sample=False)``
  with ``min_new_tokens`` so neither stops early), tokens/s over the batch, after a
  warm-up call (nnjax's compilation). ``decode-bf16``: the same with bfloat16 weights
  on both sides (``from_pretrained(dtype=...)``); ``decode-int8``: nnjax with int8
  weights (``nj.finetune.quantize(params, bits=8)``: every kernel, per output channel),
  read against transformers' float32 decode.
- ``train``: one AdamW step on batch 1 x 256 tokens, full and LoRA (rank 16 on every
  attention and MLP projection; transformers with ``peft``), median of the timed
  steps after a first (compiling) step. ``train-bf16``: the full step with float32
  params and bf16 compute (nnjax ``trainer(..., compute_dtype=bfloat16)``, torch
  ``torch.autocast("cpu", bfloat16)``).
- ``limits``: what the machine allows each library (:mod:`benchmarks.limits`): the
  step's matmul in float32 and bf16 (GF/s) and a float32 sum over memory (GB/s).

Targets: load time <= 1.0x and peak RSS <= 0.7x transformers'; decode at batch 1
>= 1.0x transformers' float32 tokens/s with float32 weights and >= 1.5x with int8
weights, batch 8 >= 1.2x; train and LoRA steps <= 0.8x transformers'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.limits import jax_limits, torch_limits
from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import (
    HUGE_PAGES_ENV,
    child_json,
    first_and_median,
    reset_peak_rss,
    rss,
    torch_greedy_decode,
)

__all__ = ["main", "llama_shape", "CELLS"]

CELLS = ("limits", "load", "decode", "decode-bf16", "decode-int8", "train", "train-bf16")
SIDES = ("nnjax", "transformers")
PROMPT, NEW_TOKENS, TRAIN_TOKENS, RANK = 16, 64, 256, 16
_MB = 1e6
_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_shape(quick: bool) -> dict[str, int]:
    """The model's Llama config fields (``quick``: a tiny one)."""
    if quick:
        return dict(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128,
        )  # fmt: skip
    return dict(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, intermediate_size=2048,
    )  # fmt: skip


def make_checkpoint(folder: str, quick: bool) -> dict:
    """Save a random Llama model into ``folder``; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_shape(quick), tie_word_embeddings=False))
    model.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters())}


def _nnjax(cell: str, folder: str, steps: int) -> dict:
    import jax
    import numpy as np
    import optax

    import nnjax as nj

    if cell == "limits":
        return jax_limits()
    rss0, _ = rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    dtype = jax.numpy.bfloat16 if cell == "decode-bf16" else None
    config, params = nj.models.hf.from_pretrained(folder, dtype=dtype)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    if cell == "load":
        load_peak = rss()[1] - rss0
        float(sum(jax.numpy.sum(x) for x in jax.tree.leaves(params)))  # every weight read
        return {"s": load_s, "extra_mb": load_peak / _MB, "touched_mb": (rss()[1] - rss0) / _MB}
    rng = np.random.default_rng(0)
    if cell == "decode-int8":
        params = jax.block_until_ready(nj.finetune.quantize(params, bits=8))
    if cell.startswith("decode"):
        out = {}
        for b in (1, 8):
            prompt = rng.integers(0, config.vocab_size, (b, PROMPT)).astype(np.int32)

            def run(prompt=prompt):
                jax.block_until_ready(
                    nj.models.generate(config, params, prompt, NEW_TOKENS, temperature=0.0)
                )

            first, s = first_and_median(run, steps)
            out[f"b{b} tok/s"] = b * NEW_TOKENS / s
            out[f"b{b} first s"] = first
        return out
    model = nj.models.CausalLM(config)
    ids = rng.integers(0, config.vocab_size, (1, TRAIN_TOKENS + 1)).astype(np.int32)
    batch = (ids[:, :-1], ids[:, 1:])
    out = {}
    bf16 = cell == "train-bf16"  # float32 params, bf16 compute (as torch's autocast)
    for kind in ("full",) if bf16 else ("full", "lora"):
        p, mask = params, None
        if kind == "lora":
            targets = ["blocks/*/attn/*/kernel", "blocks/*/mlp/*/kernel"]
            p, mask = nj.finetune.add_lora(params, jax.random.key(1), targets, rank=RANK)
        tr = nj.trainer(
            model,
            nj.losses.softmax_cross_entropy,
            optax.adamw(1e-4),
            trainable=mask,
            compute_dtype=jax.numpy.bfloat16 if bf16 else None,
        )
        holder = [tr.init(p, {})]

        def step(tr=tr, holder=holder):
            holder[0], m = tr.step(holder[0], batch)
            jax.block_until_ready(m)

        out[f"{kind} first s"], out[f"{kind} step s"] = first_and_median(step, steps)
        del holder
    return out


def _transformers(cell: str, folder: str, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if cell == "limits":
        return torch_limits()
    rss0, _ = rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if cell == "decode-bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    load_s = time.perf_counter() - t0
    if cell == "load":
        load_peak = rss()[1] - rss0
        # transformers maps the safetensors file: its weights enter RSS when first read.
        float(sum(p.sum() for p in model.parameters()))
        return {"s": load_s, "extra_mb": load_peak / _MB, "touched_mb": (rss()[1] - rss0) / _MB}
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if cell.startswith("decode"):
        model.eval()
        return torch_greedy_decode(model, PROMPT, NEW_TOKENS, steps)
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, vocab, (1, TRAIN_TOKENS), generator=gen)
    out = {}
    bf16 = cell == "train-bf16"
    for kind in ("full",) if bf16 else ("full", "lora"):
        m = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        if kind == "lora":
            m = get_peft_model(
                m, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=_LORA_MODULES)
            )
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[f"{kind} first s"], out[f"{kind} step s"] = first_and_median(step, steps)
        del m, opt
    return out


def _sides(cell: str) -> tuple[str, ...]:
    """Who runs ``cell``: int8 weights are nnjax's alone (read against transformers' float32)."""
    return SIDES[:1] if cell == "decode-int8" else SIDES


def child(side: str, cell: str, folder: str, steps: int) -> dict:
    """One cell measured in this (fresh) process."""
    return (_nnjax if side == "nnjax" else _transformers)(cell, folder, steps)


def main(args: argparse.Namespace, machine: dict) -> int:
    steps = 2 if args.quick else 3
    rounds = args.rounds or 1
    folder = tempfile.mkdtemp(prefix="nnjax-llm-study-")
    try:
        n_params = child_json(
            ["benchmarks.study_llm", "make", folder] + (["--quick"] if args.quick else []),
            "llm study checkpoint",
            1800,
        )["params"]
        samples: dict[tuple[str, str], list[dict]] = {(s, c): [] for c in CELLS for s in _sides(c)}
        for r in range(rounds):
            for cell in CELLS:
                sides = _sides(cell)
                for side in sides[r % 2 :] + sides[: r % 2]:
                    argv = ["benchmarks.study_llm", side, cell, folder, str(steps)]
                    huge = side == "nnjax" and cell != "load"  # loading is slower with it
                    env = {"JAX_PLATFORMS": "cpu", **(HUGE_PAGES_ENV if huge else {})}
                    samples[side, cell].append(child_json(argv, f"llm {side} {cell}", 3600, env))
                    print(f"  llm {side} {cell}: {samples[side, cell][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = {
        f"{side} {cell}": {k: statistics.median(x[k] for x in s) for k in s[0]}
        for (side, cell), s in samples.items()
    }
    payload = {
        "machine": machine,
        "rounds": rounds,
        "quick": args.quick,
        "params": n_params,
        "cells": table,
    }
    write_study(args.out, "llm", args.quick, payload, _markdown(table, n_params, machine))
    return 0


def _markdown(t: dict[str, dict], n_params: int, machine: dict) -> str:
    def pair(cell: str, key: str, against: str | None = None) -> str:
        a, b = t[f"nnjax {cell}"][key], t[f"transformers {against or cell}"][key]
        name = f"{cell} {key}" + ("" if against is None else f" (transformers: {against})")
        return f"| {name} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |"

    f32_step, bf16_step = t["nnjax train"]["full step s"], t["nnjax train-bf16"]["full step s"]
    own_bf16 = f"{bf16_step / f32_step:.2f}x"
    rows = [
        pair("load", "s"),
        pair("load", "extra_mb"),
        pair("load", "touched_mb"),
        pair("decode", "b1 tok/s"),
        pair("decode", "b8 tok/s"),
        pair("decode-bf16", "b1 tok/s"),
        pair("decode-bf16", "b8 tok/s"),
        pair("decode-int8", "b1 tok/s", "decode"),
        pair("decode-int8", "b8 tok/s", "decode"),
        pair("train", "full step s"),
        pair("train", "lora step s"),
        pair("train-bf16", "full step s"),
        pair("limits", "matmul f32 GF/s"),
        pair("limits", "matmul bf16 GF/s"),
        pair("limits", "memory GB/s"),
        pair("decode", "b1 first s"),
        pair("train", "full first s"),
    ]
    return (
        "\n".join(
            [
                "# A Llama-shaped model in nnjax and transformers: load, greedy decode, train steps",
                "",
                f"Measured {machine_line(machine)}",
                "",
                f"{n_params / 1e6:.1f}M params, float32, the same weights on both sides (one "
                "`save_pretrained` folder). One fresh process per cell; nnjax's decode and "
                "train cells with glibc's malloc in huge pages "
                "(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, as `examples/pretrain_llm.py` runs), "
                "its load without (0.7 s slower with them); transformers' without (slower "
                "with them). "
                "Decode: 16-token prompt, "
                f"{NEW_TOKENS} greedy tokens; train: AdamW, batch 1 x {TRAIN_TOKENS}; LoRA rank "
                f"{RANK} on every attention and MLP projection (transformers: peft). `extra_mb` is "
                "the peak RSS of the load beyond the RSS before it.",
                "",
                "| measure | nnjax | transformers | nnjax / transformers |",
                "|---|---:|---:|---:|",
                *rows,
                "",
                "`decode-bf16`: bfloat16 weights on both sides (nnjax computes in float32 on "
                "CPU, its native kernel reading the bfloat16 weights as stored); `decode-int8`: "
                "nnjax with int8 weights (`nj.finetune.quantize(params, bits=8)`), against "
                "transformers' float32 decode. nnjax's decode products with up to 16 rows run "
                "in its native kernel (`nnjax.kernels.small_matmul`) where it is built.",
                "",
                "Targets: load time <= 1.0x, load peak RSS <= 0.7x; decode b1 >= 1.0x (float32 "
                "weights) and >= 1.5x (int8 weights) transformers' float32 tokens/s, b8 >= 1.2x; "
                "train and LoRA step <= 0.8x; the bf16 step <= 0.8x torch's autocast step and "
                f"<= 0.6x nnjax's own float32 step: {own_bf16}.",
                "",
                "`limits`: the step's matmul (256 x 768 -> 2048) in float32 and in bf16 (JAX: "
                "bf16 operands, float32 accumulation) and a float32 sum over 256 MiB, each "
                "library on its own; read the step times against the matmul rates and the decode "
                "rates against memory GB/s (every weight is read once per token).",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":  # make FOLDER [--quick] | SIDE CELL FOLDER STEPS
    if sys.argv[1] == "make":
        print(json.dumps(make_checkpoint(sys.argv[2], "--quick" in sys.argv[3:])))
    else:
        side, cell, folder, steps = sys.argv[1:5]
        print(json.dumps(child(side, cell, folder, int(steps))))
