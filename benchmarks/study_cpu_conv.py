"""Study: convolution forward+backward, XLA's convolution vs im2col, by input channels.

``nnjax.layers.im2col`` writes a convolution as strided slices, one ``concatenate``
and one matmul, and ``nj.Conv`` uses that form on CPU for inputs with at most
``MAX_IN_CHANNELS`` channels. This study is the evidence for that threshold: for a
range of shapes it times ``jax.lax.conv_general_dilated`` and ``conv_im2col``
(forward, and forward+backward to input and kernel), interleaved in rounds, medians.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import median_ms

__all__ = ["CASES", "main"]

# name: (input shape (N, *spatial, C), kernel window, features, strides, padding)
CASES = {
    "lenet conv1 (C=1)": ((128, 28, 28, 1), (5, 5), 6, (1, 1), "SAME"),
    "lenet conv2 (C=6)": ((128, 14, 14, 6), (5, 5), 16, (1, 1), "VALID"),
    "rgb stem 7x7/2 (C=3)": ((32, 32, 32, 3), (7, 7), 32, (2, 2), "SAME"),
    "rgb 3x3 (C=3)": ((64, 32, 32, 3), (3, 3), 32, (1, 1), "SAME"),
    "3x3 (C=4)": ((64, 28, 28, 4), (3, 3), 16, (1, 1), "SAME"),
    "3x3 (C=8)": ((64, 28, 28, 8), (3, 3), 16, (1, 1), "SAME"),
    "5x5 (C=12)": ((128, 14, 14, 12), (5, 5), 16, (1, 1), "VALID"),
    "3x3 (C=16)": ((128, 28, 28, 16), (3, 3), 16, (1, 1), "SAME"),
    "3x3/2 (C=16)": ((128, 28, 28, 16), (3, 3), 32, (2, 2), "SAME"),
    "3x3 (C=64)": ((32, 32, 32, 64), (3, 3), 64, (1, 1), "SAME"),
    "1d k3 (C=64)": ((32, 128, 64), (3,), 64, (1,), "SAME"),
}
_QUICK = ("lenet conv1 (C=1)", "3x3 (C=8)")


def _forms(shape, window, features, strides, padding):
    from nnjax.layers.im2col import conv_im2col

    nd = len(window)
    pads = jax.lax.padtype_to_pads(shape[1:-1], window, strides, padding)
    spec = "NWC" if nd == 1 else "NHWC"
    dims = (spec, spec.replace("N", "").replace("C", "") + "IO", spec)

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dims)

    def im2col(x, k):
        return conv_im2col(x, k, strides, pads, (1,) * nd)

    return {"xla-conv": lax_conv, "im2col": im2col}


def _wait(fn, *args):
    return jax.block_until_ready(fn(*args))


def main(args: argparse.Namespace, machine: dict) -> int:
    names = list(_QUICK if args.quick else CASES)
    rounds = args.rounds or (1 if args.quick else 3)
    steps = 3 if args.quick else 10
    rows = []
    for name in names:
        shape, window, features, strides, padding = CASES[name]
        x = jax.random.normal(jax.random.key(0), shape)
        k = 0.1 * jax.random.normal(jax.random.key(1), (*window, shape[-1], features))
        timed, compile_s = {}, {}
        for form, fn in _forms(shape, window, features, strides, padding).items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
            t0 = time.perf_counter()
            grad = grad.lower(x, k).compile()
            compile_s[form] = time.perf_counter() - t0
            jax.block_until_ready((fwd(x, k), grad(x, k)))
            timed[form] = (fwd, grad)
        np.testing.assert_allclose(
            timed["im2col"][0](x, k), timed["xla-conv"][0](x, k), rtol=1e-3, atol=1e-3
        )
        samples = {(f, p): [] for f in timed for p in ("fwd", "fwd+bwd")}
        for r in range(rounds):
            order = list(timed)[r % 2 :] + list(timed)[: r % 2]
            for form in order:
                fwd, grad = timed[form]
                for part, fn in (("fwd", fwd), ("fwd+bwd", grad)):
                    call = functools.partial(_wait, fn, x, k)
                    samples[(form, part)].append(median_ms(call, steps))
        row = {"case": name, "in_channels": shape[-1]}
        for (form, part), vals in samples.items():
            row[f"{form} {part} ms"] = statistics.median(vals)
        for part in ("fwd", "fwd+bwd"):
            row[f"{part} ratio"] = row[f"im2col {part} ms"] / row[f"xla-conv {part} ms"]
        for form, seconds in compile_s.items():
            row[f"{form} fwd+bwd compile s"] = seconds
        rows.append(row)
        print(f"  cpu-conv {name}: {row}", file=sys.stderr)
    payload = {"machine": machine, "rows": rows}
    write_study(args.out, "cpu-conv", args.quick, payload, _markdown(rows, machine))
    return 0


def _markdown(rows, machine) -> str:
    out = [
        "# Convolution on XLA:CPU: XLA's convolution vs im2col",
        "",
        f"Measured {machine_line(machine)}",
        "",
        "Median ms per call (jitted), im2col / XLA ratio; fwd+bwd is the gradient with "
        "respect to input and kernel of `sum(conv(x, k)**2)`; compile s: tracing, lowering "
        "and compiling that gradient, once. `nj.Conv` uses im2col on CPU when the input has "
        "at most `nnjax.layers.im2col.MAX_IN_CHANNELS` channels.",
        "",
        "| case | in channels | fwd XLA | fwd im2col | ratio | fwd+bwd XLA | fwd+bwd im2col "
        "| ratio | compile s XLA | compile s im2col |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['in_channels']} | {fmt(r['xla-conv fwd ms'])} | "
            f"{fmt(r['im2col fwd ms'])} | {r['fwd ratio']:.2f}x | "
            f"{fmt(r['xla-conv fwd+bwd ms'])} | {fmt(r['im2col fwd+bwd ms'])} | "
            f"{r['fwd+bwd ratio']:.2f}x | {fmt(r['xla-conv fwd+bwd compile s'])} | "
            f"{fmt(r['im2col fwd+bwd compile s'])} |"
        )
    return "\n".join(out) + "\n"
