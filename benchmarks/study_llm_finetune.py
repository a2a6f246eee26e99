"""Study: fine-tuning a Qwen2-0.5B-shaped model on the CPU: memory and step time of full, LoRA and quantized-base LoRA.

Rows (each in a fresh child process, batch 1 x 256 tokens, AdamW):

- ``nnjax full``: every param trained.
- ``nnjax lora``: LoRA rank 16 on every attention and MLP projection
  (``blocks/*/attn/{query,key,value,out}``, ``blocks/*/mlp/{gate,up,down}``), the base frozen.
- ``nnjax lora int8`` / ``nnjax lora nf4``: the same adapters on a base whose
  block kernels are stored quantized by ``nj.finetune.quantize`` (int8 per output
  channel; NF4 in blocks of 64); embeddings and norms stay float32.
- ``transformers+peft lora``: ``Qwen2ForCausalLM`` with a ``peft`` LoRA of the same
  rank on the same modules (``q,k,v,o,gate,up,down_proj``), ``torch.optim.AdamW``.
- the QLoRA memory rows of :mod:`benchmarks.llm_qlora`: an int8 token table, loading
  quantized from a checkpoint (the load's own peak beside the quantized params).

Weights are random (the same shapes on both sides; the values do not change the
cost). Each child builds its model, runs one step (nnjax: the compilation; then, as
``nj.fit`` does, ``nj.release_host_memory()`` gives the compiler's freed heap back), resets
its peak RSS (``/proc/self/clear_refs``), runs ``--steps`` timed steps, and reports
the median step time and the peak RSS while training (``VmHWM``: the params, the
optimizer state and the step's temporaries; the process's libraries included).
Targets: LoRA <= 0.6x full; NF4-base LoRA <= 0.35x full; nnjax LoRA <= 0.8x
transformers+peft LoRA (memory); nnjax LoRA step <= 0.8x transformers+peft; NF4
step <= 1.3x nnjax's float LoRA step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.llm_qlora import EXTRA, QLORA_ROWS, profile, qlora_child, qlora_markdown
from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import child_json, reset_peak_rss, rss

__all__ = ["main", "ROWS", "qwen2_05b_shape"]

ROWS = (
    "nnjax full",
    "nnjax lora",
    "nnjax lora int8",
    "nnjax lora nf4",
    "transformers+peft lora",
    *QLORA_ROWS,
)
RANK = 16
_MB = 1e6


def qwen2_05b_shape(quick: bool) -> dict[str, Any]:
    """Qwen2-0.5B's shape (494M params); ``quick``: a tiny model of the same family."""
    if quick:
        return dict(
            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            mlp_hidden=128, tokens=32,
        )  # fmt: skip
    return dict(
        vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        mlp_hidden=4864, tokens=256,
    )  # fmt: skip


def _config(shape: dict, attention: str | None = None, remat: bool = False) -> Any:
    import nnjax as nj

    return nj.models.CausalLMConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        mlp_hidden=shape["mlp_hidden"],
        qkv_bias=True,
        tie_embeddings=True,
        rope_theta=1e6,
        family="qwen2",
        attention_implementation=attention,
        remat=remat,
    )


def _batch(shape: dict) -> tuple[Any, Any]:
    import numpy as np

    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (1, shape["tokens"] + 1))
    return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)


def _nnjax(
    row: str,
    shape: dict,
    steps: int,
    *,
    attention: str | None = None,
    remat: bool = False,
    profiled: bool = False,
) -> dict:
    import jax

    import nnjax as nj

    config = _config(shape, attention, remat)
    model = nj.models.CausalLM(config)
    x, y = _batch(shape)
    params, _ = model.init(jax.random.key(0), x)
    targets = [f"blocks/*/{m}/kernel" for m in ("attn/*", "mlp/*")]
    mask = None
    if row != "nnjax full":
        if row.endswith("int8") or row.endswith("nf4"):
            bits = 8 if row.endswith("int8") else 4
            params = nj.finetune.quantize(params, targets, bits=bits)
        params, mask = nj.finetune.add_lora(params, jax.random.key(1), targets, rank=RANK)
    box = [params]  # _train holds the only reference: tr.init's copy replaces it
    del params
    return _train(model, box, mask, (x, y), steps, profiled)


def _train(
    model: Any, box: list, mask: Any, batch: tuple[Any, Any], steps: int, profiled: bool
) -> dict:
    """Train the params in ``box`` (a one-element list, emptied: no caller keeps them
    beside the train state's copy) ``steps`` timed steps after a first; with
    ``profiled``, also what the compiled step holds (:func:`benchmarks.llm_qlora.profile`:
    one more compilation, after the peak is read)."""
    import jax
    import optax

    import nnjax as nj

    x, y = batch
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adamw(1e-4), trainable=mask)
    params = box.pop()
    ts = tr.init(params, {})
    del params
    t0 = time.perf_counter()
    ts, m = tr.step(ts, (x, y))
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    first_peak = rss()[1]
    nj.release_host_memory()  # the compiler's freed heap, as nj.fit does after its first step
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ts, m = tr.step(ts, (x, y))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    peak = rss()[1]
    costs = profile(tr, ts, (x, y), mask) if profiled else {}  # after: not in the peak
    return {
        "first_s": first,
        "step_s": statistics.median(times),
        "peak_mb": peak / _MB,
        "first_peak_mb": first_peak / _MB,
        "loss": float(m["loss"]),
        "trainable": nj.count_params(ts.params) if mask is None else _count(ts.params, mask),
        **costs,
    }


def _count(params: Any, mask: Any) -> int:
    import jax
    import numpy as np

    leaves = jax.tree.leaves(jax.tree.map(lambda p, t: np.size(p) if t else 0, params, mask))
    return int(sum(leaves))


def _torch(shape: dict, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        intermediate_size=shape["mlp_hidden"],
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    model = Qwen2ForCausalLM(cfg)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(
        0, cfg.vocab_size, (1, shape["tokens"]), generator=torch.Generator().manual_seed(0)
    )

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    first_peak = rss()[1]
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "first_s": first,
        "step_s": statistics.median(times),
        "peak_mb": rss()[1] / _MB,
        "first_peak_mb": first_peak / _MB,
        "loss": loss,
        "trainable": int(trainable),
    }


def child(row: str, quick: bool, steps: int) -> dict:
    """One row measured in this (fresh) process."""
    shape = qwen2_05b_shape(quick)
    if row in QLORA_ROWS:
        import nnjax as nj

        model = nj.models.CausalLM(_config(shape))
        return qlora_child(
            row,
            _config(shape),
            _batch(shape),
            steps,
            quick,
            lambda box, m: _train(model, box, m, _batch(shape), steps, True),
        )
    if row.startswith("nnjax"):
        return _nnjax(row, shape, steps, profiled=True)
    return _torch(shape, steps)


def main(args: argparse.Namespace, machine: dict) -> int:
    steps = 2 if args.quick else 3
    rounds = args.rounds or 1
    samples: dict[str, list[dict]] = {r: [] for r in ROWS}
    for _ in range(rounds):
        for row in ROWS:
            argv = ["benchmarks.study_llm_finetune", row, str(steps)] + (
                ["--quick"] if args.quick else []
            )
            samples[row].append(
                child_json(argv, f"llm-finetune child {row}", 3600, {"JAX_PLATFORMS": "cpu"})
            )
            print(f"  llm-finetune {row}: {samples[row][-1]}", file=sys.stderr)
    rows = []
    for row in ROWS:
        s = samples[row]
        rows.append(
            {
                "row": row,
                **{k: statistics.median(x[k] for x in s) for k in ("first_s", "step_s", "peak_mb")},
                "trainable": s[0]["trainable"],
                "loss": s[0]["loss"],
                **{k: statistics.median(x[k] for x in s) for k in EXTRA if k in s[0]},
            }
        )
    payload = {"machine": machine, "rounds": rounds, "quick": args.quick, "rows": rows}
    write_study(args.out, "llm-finetune", args.quick, payload, _markdown(rows, machine, args.quick))
    return 0


def _markdown(rows: list[dict], machine: dict, quick: bool) -> str:
    by = {r["row"]: r for r in rows}
    full, lora = by["nnjax full"], by["nnjax lora"]
    peft = by["transformers+peft lora"]
    shape = qwen2_05b_shape(quick)
    out = [
        "# Fine-tuning a Qwen2-0.5B-shaped model: full, LoRA, quantized-base LoRA, transformers+peft",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"Width {shape['hidden_size']}, {shape['num_layers']} layers, vocab "
        f"{shape['vocab_size']}, batch 1 x {shape['tokens']} tokens, LoRA rank {RANK} on every "
        "attention and MLP projection, AdamW. One fresh process per row; peak RSS while "
        "training (libraries included); step time the median of the timed steps.",
        "",
        "| row | trainable params | peak RSS MB | x nnjax full | step s | x nnjax lora | "
        "x peft lora | first step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['row']} | {r['trainable']:,} | {fmt(r['peak_mb'])} | "
            f"{r['peak_mb'] / full['peak_mb']:.2f} | {fmt(r['step_s'])} | "
            f"{r['step_s'] / lora['step_s']:.2f} | {r['step_s'] / peft['step_s']:.2f} | "
            f"{fmt(r['first_s'])} |"
        )
    out += qlora_markdown(by, full, peft)
    nf4 = by["nnjax lora nf4"]
    out += [
        "",
        "Targets: LoRA <= 0.6x full memory: "
        f"{lora['peak_mb'] / full['peak_mb']:.2f}x; NF4-base LoRA <= 0.35x full: "
        f"{nf4['peak_mb'] / full['peak_mb']:.2f}x; nnjax LoRA <= 0.8x peft memory: "
        f"{lora['peak_mb'] / peft['peak_mb']:.2f}x; nnjax LoRA step <= 0.8x peft: "
        f"{lora['step_s'] / peft['step_s']:.2f}x; NF4 step <= 1.3x float LoRA: "
        f"{nf4['step_s'] / lora['step_s']:.2f}x.",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # one child: row, steps, [--quick]
    print(json.dumps(child(sys.argv[1], "--quick" in sys.argv[3:], int(sys.argv[2]))))
