"""Study: compile time of the GPT training step against depth, ``nj.repeat`` vs unrolled.

For each depth the full nnjax train step (``trainer(...).step``) is traced and
lowered (``lower_s``) and compiled by XLA (``compile_s``) ahead of time from
``ShapeDtypeStruct``s, so nothing is allocated or run. Three builds per depth:
nnjax with ``repeat`` (one scanned block), nnjax with an unrolled ``serial`` of
blocks, and hand-written JAX (a Python loop over blocks, i.e. unrolled).
Target (issue 8): ``repeat`` at 32 layers compiles in <= 1.5x its 2-layer time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import fw_jax
from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import LEARNING_RATE, config

__all__ = ["main", "compile_times"]

_VARIANTS = ("nnjax-repeat", "nnjax-unrolled", "jax-unrolled")


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _lower_compile(jitted, *args) -> tuple[float, float]:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def compile_times(variant: str, cfg, layers: int) -> tuple[float, float]:
    """``(lower_s, compile_s)`` of one train step of the GPT with ``layers`` blocks."""
    tokens = jax.ShapeDtypeStruct((cfg.batch, cfg.context), jnp.int32)
    batch = (tokens, tokens)
    tx = optax.adam(LEARNING_RATE)
    if variant == "jax-unrolled":
        init, apply = fw_jax.model("gpt-char", cfg._replace(layers=layers))
        params = jax.eval_shape(init, jax.random.key(0))
        carry = (params, jax.eval_shape(tx.init, params))
        step = jax.jit(fw_jax.train_step(apply, tx), donate_argnums=0)
        return _lower_compile(step, carry, *batch)
    from benchmarks import fw_nnjax
    from nnjax.training.losses import softmax_cross_entropy
    from nnjax.training.trainer import trainer

    stack = variant.removeprefix("nnjax-")
    net = fw_nnjax.gpt(cfg, stack=stack, layers=layers)
    params, state = jax.eval_shape(net.init, jax.random.key(0), tokens)
    tr = trainer(net, softmax_cross_entropy, tx)
    ts = jax.eval_shape(tr.init, params, state)
    return _lower_compile(tr.step, _spec(ts), batch)


def main(args: argparse.Namespace, machine: dict) -> int:
    depths = [int(d) for d in (args.depths or ("2,4" if args.quick else "2,4,8,16,32")).split(",")]
    cfg = config("gpt-char", args.quick)
    rounds = args.rounds or 1
    variants = list(_VARIANTS)
    try:
        import nnjax.training.trainer  # noqa: F401
    except ImportError as err:
        print(
            f"compile-depth: nnjax missing ({err}); timing hand-written JAX only", file=sys.stderr
        )
        variants = ["jax-unrolled"]
    compile_times("jax-unrolled", cfg, depths[0])  # warm-up: one-time costs of the first compile
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(rounds):
        for depth in depths:
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                lower_s, compile_s = compile_times(variant, cfg, depth)
                samples.setdefault((variant, depth), []).append((lower_s, compile_s))
                print(
                    f"  compile-depth {variant:15s} {depth:3d} layers: "
                    f"lower {lower_s:.2f} s, compile {compile_s:.2f} s",
                    file=sys.stderr,
                )
    rows = []
    for (variant, depth), vals in samples.items():
        lower = statistics.median(v[0] for v in vals)
        comp = statistics.median(v[1] for v in vals)
        rows.append(
            {
                "variant": variant,
                "layers": depth,
                "lower_s": lower,
                "compile_s": comp,
                "total_s": lower + comp,
            }
        )
    base = {r["variant"]: r["total_s"] for r in rows if r["layers"] == depths[0]}
    for r in rows:
        r[f"total_vs_{depths[0]}_layers"] = r["total_s"] / base[r["variant"]]
    payload = {"machine": machine, "config": cfg._asdict(), "rows": rows}
    text = _markdown(rows, depths, variants, cfg, machine)
    stem = write_study(args.out, "compile-depth", args.quick, payload, text)
    _chart(stem.with_suffix(".png"), rows, variants, machine)
    return 0


def _markdown(rows, depths, variants, cfg, machine) -> str:
    cell = {(r["variant"], r["layers"]): r for r in rows}
    out = [
        "# Compile time of the GPT train step vs depth",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"GPT width {cfg.width}, {cfg.heads} heads, context {cfg.context}, batch {cfg.batch}; "
        "the whole train step (forward, loss, backward, Adam) lowered and compiled ahead of time "
        "(`jit(...).lower(...).compile()`), nothing run. Cells: trace+lower s + XLA compile s "
        f"= total s (x the {depths[0]}-layer total).",
        "",
        "| layers | " + " | ".join(variants) + " |",
        "|---:|" + "---:|" * len(variants),
    ]
    for d in depths:
        cells = []
        for v in variants:
            r = cell[(v, d)]
            ratio = r[f"total_vs_{depths[0]}_layers"]
            cells.append(
                f"{fmt(r['lower_s'])} + {fmt(r['compile_s'])} = {fmt(r['total_s'])} ({ratio:.2f}x)"
            )
        out.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _chart(path, rows, variants, machine) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        pts = sorted((r["layers"], r["total_s"]) for r in rows if r["variant"] == v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("transformer blocks")
    ax.set_ylabel("trace + compile s (train step)")
    ax.set_title(f"GPT compile time vs depth\n{machine['cpu']}, {machine['date']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
