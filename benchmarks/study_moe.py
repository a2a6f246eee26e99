"""Study: a Qwen3-MoE-shaped mixture of experts in nnjax and in transformers: train step, greedy decode.

One random ``Qwen3MoeForCausalLM`` (width 512, 8 layers, 8 query / 4 key-value heads of
64, 8 experts of width 1024, top-2 renormalised, vocab 32000, untied head; float32,
about 140M parameters) and its *dense-compute equivalent* (a ``Qwen3ForCausalLM`` of the
same shape whose MLP is ``top_k * 1024`` wide: the same multiply-adds per token, no
routing) are saved once with ``save_pretrained``; each cell loads its folder in a fresh
child process, so both sides run the same weights:

- ``train``: one AdamW step on batch 2 x 256 tokens, median of the timed steps after a
  first (compiling) step. transformers' loss includes its load-balancing loss
  (``output_router_logits=True``, coefficient 0.001) and nnjax's objective does too.
- ``decode``: greedy decoding of 64 new tokens after a 16-token prompt, batch 1 and 8,
  tokens/s over the batch, after a warm-up call.

The dense rows show what the routing and dispatch cost: MoE time over dense time, on
each side. Targets: nnjax's MoE train step <= 0.8x transformers', decode >= 1.2x its
tokens/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import child_json, first_and_median, torch_greedy_decode

__all__ = ["main", "moe_shape", "CELLS"]

CELLS = ("train", "decode")
SIDES = ("nnjax", "transformers")
MODELS = ("moe", "dense")
PROMPT, NEW_TOKENS, BATCH, TRAIN_TOKENS = 16, 64, 2, 256
AUX_COEF = 0.001


def moe_shape(quick: bool) -> dict[str, int]:
    """The Qwen3-MoE config fields (``quick``: a tiny one)."""
    if quick:
        return dict(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
    return dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, moe_intermediate_size=1024, num_experts=8,
        num_experts_per_tok=2,
    )  # fmt: skip


def make_checkpoints(folder: str, quick: bool) -> dict:
    """Save the random MoE model to ``folder/moe`` and its dense equivalent to ``folder/dense``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = moe_shape(quick)
    torch.manual_seed(0)
    moe = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **shape,
            intermediate_size=shape["moe_intermediate_size"],
            norm_topk_prob=True,
            router_aux_loss_coef=AUX_COEF,
            output_router_logits=True,
            tie_word_embeddings=False,
        )
    )
    moe.save_pretrained(f"{folder}/moe")
    dense_shape = {
        k: v
        for k, v in shape.items()
        if k not in ("moe_intermediate_size", "num_experts", "num_experts_per_tok")
    }
    dense = Qwen3ForCausalLM(
        Qwen3Config(
            **dense_shape,
            intermediate_size=shape["moe_intermediate_size"] * shape["num_experts_per_tok"],
            tie_word_embeddings=False,
        )
    )
    dense.save_pretrained(f"{folder}/dense")
    count = sum(p.numel() for p in moe.parameters())
    return {"moe params": count, "dense params": sum(p.numel() for p in dense.parameters())}


def _nnjax(cell: str, folder: str, steps: int) -> dict:
    import jax
    import numpy as np
    import optax

    import nnjax as nj

    config, params = nj.models.hf.from_pretrained(folder)
    rng = np.random.default_rng(0)
    if cell == "decode":
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
    ids = rng.integers(0, config.vocab_size, (BATCH, TRAIN_TOKENS + 1)).astype(np.int32)
    batch = (ids[:, :-1], ids[:, 1:])
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adamw(1e-4))
    holder = [tr.init(params, {})]

    def step():
        holder[0], m = tr.step(holder[0], batch)
        jax.block_until_ready(m)

    first, s = first_and_median(step, steps)
    return {"step s": s, "first s": first}


def _transformers(cell: str, folder: str, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if cell == "decode":
        model.eval()
        model.config.output_router_logits = False  # decoding needs no router logits
        return torch_greedy_decode(model, PROMPT, NEW_TOKENS, steps)
    ids = torch.randint(0, vocab, (BATCH, TRAIN_TOKENS + 1), generator=gen)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    first, s = first_and_median(step, steps)
    return {"step s": s, "first s": first}


def child(side: str, cell: str, folder: str, steps: int) -> dict:
    """One cell measured in this (fresh) process."""
    return (_nnjax if side == "nnjax" else _transformers)(cell, folder, steps)


def main(args: argparse.Namespace, machine: dict) -> int:
    steps = 2 if args.quick else 3
    rounds = args.rounds or 1
    folder = tempfile.mkdtemp(prefix="nnjax-moe-study-")
    try:
        counts = child_json(
            ["benchmarks.study_moe", "make", folder] + (["--quick"] if args.quick else []),
            "moe study checkpoints",
            1800,
        )
        samples: dict[tuple[str, str, str], list[dict]] = {
            (s, m, c): [] for s in SIDES for m in MODELS for c in CELLS
        }
        for r in range(rounds):
            for cell in CELLS:
                for m in MODELS:
                    for side in SIDES[r % 2 :] + SIDES[: r % 2]:
                        argv = ["benchmarks.study_moe", side, cell, f"{folder}/{m}", str(steps)]
                        samples[side, m, cell].append(
                            child_json(
                                argv, f"moe {side} {m} {cell}", 3600, {"JAX_PLATFORMS": "cpu"}
                            )
                        )
                        print(
                            f"  moe {side} {m} {cell}: {samples[side, m, cell][-1]}",
                            file=sys.stderr,
                        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = {
        f"{side} {m} {cell}": {k: statistics.median(x[k] for x in s) for k in s[0]}
        for (side, m, cell), s in samples.items()
    }
    payload = {"machine": machine, "rounds": rounds, "quick": args.quick, **counts, "cells": table}
    write_study(args.out, "moe", args.quick, payload, _markdown(table, counts, machine))
    return 0


def _markdown(t: dict[str, dict], counts: dict, machine: dict) -> str:
    def row(model: str, cell: str, key: str) -> str:
        a, b = t[f"nnjax {model} {cell}"][key], t[f"transformers {model} {cell}"][key]
        return f"| {model} | {cell} {key} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |"

    def overhead(side: str, cell: str, key: str) -> str:
        a, b = t[f"{side} moe {cell}"][key], t[f"{side} dense {cell}"][key]
        return f"| {side} | {cell} {key} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |"

    keys = (("train", "step s"), ("decode", "b1 tok/s"), ("decode", "b8 tok/s"))
    return (
        "\n".join(
            [
                "# A Qwen3-MoE-shaped model in nnjax and transformers: train step, greedy decode",
                "",
                f"Measured {machine_line(machine)}",
                "",
                f"MoE: {counts['moe params'] / 1e6:.1f}M params (8 experts, top-2), float32; its "
                f"dense-compute equivalent: {counts['dense params'] / 1e6:.1f}M params (MLP "
                "2 x 1024 wide: the same multiply-adds per token). The same weights on both "
                "sides (one `save_pretrained` folder each), one fresh process per cell. Train: "
                f"AdamW, batch {BATCH} x {TRAIN_TOKENS}, load-balancing loss included; decode: "
                f"{PROMPT}-token prompt, {NEW_TOKENS} greedy tokens.",
                "",
                "| model | measure | nnjax | transformers | nnjax / transformers |",
                "|---|---|---:|---:|---:|",
                *(row(m, c, k) for m in MODELS for c, k in keys),
                "",
                "Dispatch overhead (MoE over its dense-compute equivalent, each side):",
                "",
                "| side | measure | MoE | dense | MoE / dense |",
                "|---|---|---:|---:|---:|",
                *(overhead(s, c, k) for s in SIDES for c, k in keys),
                "",
                "Targets: MoE train step <= 0.8x transformers', decode tokens/s >= 1.2x.",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":  # make FOLDER [--quick] | SIDE CELL FOLDER STEPS
    if sys.argv[1] == "make":
        print(json.dumps(make_checkpoints(sys.argv[2], "--quick" in sys.argv[3:])))
    else:
        side, cell, folder, steps = sys.argv[1:5]
        print(json.dumps(child(side, cell, folder, int(steps))))
