"""Study: a decode step's products with few rows: XLA's dot, nnjax's native kernel, PyTorch.

One token of the LLM study's 124.7M Llama shape multiplies its rows by twelve layers'
seven kernels and the head. This study times the heaviest part of that, twelve
768 x 2,048 kernels and the 768 x 32,000 head (173.5 MB of float32 weights), for 1,
2, 4, 8 and 16 rows, with the weights stored float32, bfloat16 and int8 (a scale per
output channel): jitted ``x @ w.astype(float32)`` (XLA's dot, the weight dequantized
first), ``nnjax.kernels.small_matmul`` (the native kernel; the same call the layers
make), and PyTorch's ``x @ w`` (float32 and bfloat16 weights; it has no int8 weight
form on CPU). Forms are interleaved in rounds; medians. The GB/s column reads the
weights' stored bytes per call: decode's limit is the memory's rate (``--study llm``'s
``limits`` cell measures it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import median_ms

__all__ = ["main", "ROWS", "STORAGE"]

ROWS = (1, 2, 4, 8, 16)
STORAGE = ("float32", "bfloat16", "int8")
_LAYERS, _D, _F, _V = 12, 768, 2048, 32000


def _weights(quick: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    layers, d, f, v = (2, 128, 256, 1024) if quick else (_LAYERS, _D, _F, _V)
    return [rng.standard_normal((d, f), dtype=np.float32) * 0.02 for _ in range(layers)] + [
        rng.standard_normal((d, v), dtype=np.float32) * 0.02
    ]


def _stored(w: np.ndarray, storage: str) -> tuple[jax.Array, jax.Array | None]:
    if storage == "int8":
        scale = np.abs(w).max(axis=0) / 127
        return jnp.asarray(np.round(w / scale).astype(np.int8)), jnp.asarray(scale, jnp.float32)
    return jnp.asarray(w, jnp.dtype(storage)), None


def _chain(product: Callable) -> Callable:
    """Each layer's product feeds the next one's rows (as decode does), then the head."""

    def run(x, weights):
        d = x.shape[1]
        for w, s in weights[:-1]:
            x = x + 1e-3 * product(x, w, s)[:, :d]
        w, s = weights[-1]
        return product(x, w, s)

    return jax.jit(run)


def _xla(x, w, s):
    wf = w.astype(jnp.float32)
    return x @ (wf if s is None else wf * s[None, :])


def _native(x, w, s):
    from nnjax.kernels.small_matmul import small_matmul

    return small_matmul(x, w, s)


def _torch_form(weights: list[np.ndarray], storage: str, rows: int) -> Callable | None:
    try:
        import torch
    except ImportError:
        return None
    if storage == "int8":
        return None
    dtype = torch.bfloat16 if storage == "bfloat16" else torch.float32
    ws = [torch.from_numpy(w).to(dtype) for w in weights]
    x0 = torch.from_numpy(np.ones((rows, weights[0].shape[0]), np.float32)).to(dtype)

    def call():
        with torch.no_grad():
            x = x0
            for w in ws[:-1]:
                x = x + 1e-3 * (x @ w)[:, : x.shape[1]]
            return x @ ws[-1]

    return call


def main(args: argparse.Namespace, machine: dict) -> int:
    from nnjax.kernels.small_matmul import available

    weights = _weights(args.quick)
    rounds = args.rounds or (1 if args.quick else 5)
    steps = 3 if args.quick else 20
    rows_list = ROWS[:2] if args.quick else ROWS
    bytes_f32 = sum(w.size for w in weights) * 4
    rows = []
    for storage in STORAGE:
        stored = [_stored(w, storage) for w in weights]
        nbytes = bytes_f32 // {"float32": 1, "bfloat16": 2, "int8": 4}[storage]
        for n_rows in rows_list:
            x = jnp.asarray(np.ones((n_rows, weights[0].shape[0]), np.float32))
            xla, native = _chain(_xla), _chain(_native)
            np.testing.assert_allclose(
                np.asarray(native(x, stored)), np.asarray(xla(x, stored)), rtol=2e-4, atol=1e-4
            )
            forms: dict[str, Callable[[], object]] = {
                "XLA dot": lambda f=xla, x=x, w=stored: f(x, w).block_until_ready(),
                "nnjax kernel": lambda f=native, x=x, w=stored: f(x, w).block_until_ready(),
            }
            torch_call = _torch_form(weights, storage, n_rows)
            if torch_call is not None:
                forms["torch"] = torch_call
            for call in forms.values():
                median_ms(call, 5)  # compile, warm up (torch starts its threads)
            samples: dict[str, list[float]] = {f: [] for f in forms}
            for r in range(rounds):
                order = list(forms)[r % len(forms) :] + list(forms)[: r % len(forms)]
                for f in order:
                    samples[f].append(median_ms(forms[f], steps))
            row = {"storage": storage, "rows": n_rows, "weight bytes": nbytes}
            for f, vals in samples.items():
                row[f"{f} ms"] = statistics.median(vals)
            rows.append(row)
            print(f"  decode-products {row}", file=sys.stderr)
    payload = {"machine": machine, "kernel built": available(), "rows": rows}
    write_study(args.out, "decode-products", args.quick, payload, _markdown(rows, machine))
    return 0


def _markdown(rows: list[dict], machine: dict) -> str:
    out = [
        "# A decode step's products: XLA's dot, nnjax's kernel, PyTorch",
        "",
        f"Measured {machine_line(machine)}",
        "",
        "Median ms per call of twelve 768 x 2,048 products and the 768 x 32,000 head, the "
        "rows chained as in decode; GB/s of stored weights in brackets. `XLA dot`: "
        "`x @ w.astype(float32)` (times the scale for int8); `nnjax kernel`: "
        "`nnjax.kernels.small_matmul`; torch: `x @ w` in the weights' dtype.",
        "",
        "| weights | rows | XLA dot | nnjax kernel | torch | kernel / XLA | kernel / torch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gb = r["weight bytes"] / 1e6

        def cell(f: str, r: dict = r, gb: float = gb) -> str:
            ms = r.get(f"{f} ms")
            return "-" if ms is None else f"{fmt(ms)} ({gb / ms:.1f})"

        torch_ms = r.get("torch ms")
        vs_torch = "-" if torch_ms is None else f"{r['nnjax kernel ms'] / torch_ms:.2f}x"
        out.append(
            f"| {r['storage']} | {r['rows']} | {cell('XLA dot')} | {cell('nnjax kernel')} | "
            f"{cell('torch')} | {r['nnjax kernel ms'] / r['XLA dot ms']:.2f}x | {vs_torch} |"
        )
    return "\n".join(out) + "\n"
