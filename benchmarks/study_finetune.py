"""Study: what fine-tuning the GPT costs: full vs frozen backbone vs LoRA.

Each variant is one nnjax trainer over the same gpt-char model with a different
``trainable`` mask (``nnjax.finetune``): ``full`` (everything), ``frozen-backbone``
(only ``head/**``), ``lora-qv`` (rank-8 LoRA on every block's query and value
kernels, only the adapters trained) and ``lora-all`` (rank-8 LoRA on every
attention and MLP kernel). Reported per variant: trainable params, step time
(median, variants interleaved in rounds), optimizer-state bytes, and XLA's memory
accounting of the compiled step (``nnjax.finetune.step_cost``, from
``compiled.memory_analysis()``): temporaries, and a peak estimate = arguments +
outputs + temporaries - donated (aliased) bytes. (XLA:CPU's own
``peak_memory_in_bytes`` is kept in the JSON; it reads below the temporaries.)
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import fw_nnjax
from benchmarks.report import fmt, machine_line, write_study
from benchmarks.suite import time_rounds
from benchmarks.workloads import LEARNING_RATE, carry_bench, config, make_batch, timing

__all__ = ["main", "variants"]


def variants(params) -> dict:
    """``{name: (params, trainable mask or None)}`` for the gpt-char params."""
    import nnjax.finetune as ft

    key = jax.random.key(1)
    attn = ("**/attn/query/kernel", "**/attn/value/kernel")
    every = ("**/attn/*/kernel", "**/mlp/*/kernel")
    return {
        "full": (params, None),
        "frozen-backbone": (params, ft.head_only(params)),
        "lora-qv-r8": ft.add_lora(params, key, attn, rank=8),
        "lora-all-r8": ft.add_lora(params, key, every, rank=8),
    }


def _count(tree) -> int:
    return int(sum(a.size for a in jax.tree.leaves(tree)))


def main(args: argparse.Namespace, machine: dict) -> int:
    try:
        import nnjax.finetune as ft
        from nnjax.training.losses import softmax_cross_entropy
        from nnjax.training.trainer import trainer
    except ImportError as err:
        print(
            f"finetune: nnjax.finetune or nnjax.training.trainer missing ({err})", file=sys.stderr
        )
        return 1
    cfg, tim = config("gpt-char", args.quick), timing("gpt-char", args.quick)
    rounds = args.rounds or (2 if args.quick else 7)
    net = fw_nnjax.gpt(cfg)
    x, y = map(jnp.asarray, make_batch("gpt-char", cfg))
    base, state = net.init(jax.random.key(0), x)
    rows, benches = [], {}
    for name, (params, mask) in variants(base).items():
        tr = trainer(net, softmax_cross_entropy, optax.adam(LEARNING_RATE), trainable=mask)
        ts = tr.init(params, state)
        cost = ft.step_cost(tr.step, ts, (x, y), trainable=mask)
        trainable = _count(params) if mask is None else ft.trainable_count(params, mask)

        def call(ts, step=tr.step):
            ts, metrics = step(ts, (x, y))
            return ts, metrics["loss"]

        bench = carry_bench(call, ts, _count(params))
        t0 = time.perf_counter()
        bench.run(1)
        first = time.perf_counter() - t0
        bench.run(tim.warmup)
        benches[name] = bench
        rows.append(
            {
                "variant": name,
                "params": _count(params),
                "trainable": trainable,
                "opt_state_bytes": cost.opt_state_bytes,
                "gradient_bytes": cost.gradient_bytes,
                "temp_bytes": cost.temp_bytes,
                "argument_bytes": cost.argument_bytes,
                "alias_bytes": cost.alias_bytes,
                "output_bytes": cost.output_bytes,
                "xla_peak_bytes": cost.peak_bytes,
                "peak_estimate_bytes": (
                    cost.argument_bytes + cost.output_bytes + cost.temp_bytes - cost.alias_bytes
                ),
                "flops": cost.flops,
                "first_call_s": first,
            }
        )
        print(f"  finetune {name:16s} built, first call {first:.2f} s", file=sys.stderr)
    stats = time_rounds(benches, tim, rounds, label="finetune")
    for row in rows:
        row.update(stats[row["variant"]])
        row["compile_s"] = max(row["first_call_s"] - row["step_ms"] * 1e-3, 0.0)
    full = rows[0]
    for row in rows:
        row["step_vs_full"] = row["step_ms"] / full["step_ms"]
    payload = {"machine": machine, "config": cfg._asdict(), "rows": rows}
    write_study(args.out, "finetune", args.quick, payload, _markdown(rows, cfg, machine, rounds))
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _markdown(rows, cfg, machine, rounds) -> str:
    out = [
        "# Fine-tuning cost: full vs frozen backbone vs LoRA (gpt-char)",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"GPT vocab {cfg.vocab}, context {cfg.context}, {cfg.layers} layers, width {cfg.width}, "
        f"batch {cfg.batch}; nnjax trainer with Adam and a `trainable` mask. Step time: median of "
        f"{rounds} interleaved rounds. Memory: XLA's accounting of the compiled step "
        "(`nnjax.finetune.step_cost`); `temp` holds activations, gradients and optimizer "
        "intermediates; `peak` = arguments + outputs + temp - aliased (donated) bytes. FLOPs are "
        "XLA's count, which counts the body of `repeat`'s scan once (not once per block).",
        "",
        "| variant | params | trainable | step ms | x full | opt state MiB | grad MiB | temp MiB | peak MiB | XLA GFLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = r["trainable"] / r["params"]
        out.append(
            f"| {r['variant']} | {r['params']:,} | {r['trainable']:,} ({100 * frac:.1f}%) | "
            f"{fmt(r['step_ms'])} | {r['step_vs_full']:.2f}x | {_mib(r['opt_state_bytes'])} | "
            f"{_mib(r['gradient_bytes'])} | {_mib(r['temp_bytes'])} | {_mib(r['peak_estimate_bytes'])} | "
            f"{fmt(r['flops'] / 1e9)} |"
        )
    return "\n".join(out) + "\n"
