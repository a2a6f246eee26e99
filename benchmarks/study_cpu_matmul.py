"""Study: one f32 matmul on XLA:CPU beside PyTorch's, at the GPT workloads' shapes.

The shapes are the matmuls of a GPT step: nanoGPT's CPU recipe (batch 12 x context
64 = 768 rows, width 128) and the suite's gpt-char (4096 rows). For each it times
``x @ w`` jitted in JAX (float32, and bfloat16 operands with float32 results) and in
PyTorch (float32 with all its threads and with one thread, bfloat16), interleaved in
rounds, medians. The question it answers: does XLA:CPU use both cores on matmuls
this small (it does not: its time equals PyTorch's on one thread)?
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.workloads import median_ms

__all__ = ["SHAPES", "main"]

# name: (rows, inner, columns)
SHAPES = {
    "nanoGPT qkv": (768, 128, 384),
    "nanoGPT mlp up": (768, 128, 512),
    "nanoGPT mlp down": (768, 512, 128),
    "gpt-char mlp up": (4096, 128, 512),
    "4096x512x512": (4096, 512, 512),
}
_QUICK = ("nanoGPT mlp up",)


class Form(NamedTuple):
    """One way to compute the matmul: ``call()`` waits for its result; ``setting``
    (a context manager factory) is entered around each timed block."""

    call: Callable[[], object]
    setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _jax_forms(a: np.ndarray, b: np.ndarray) -> dict[str, Form]:
    x, w = jnp.asarray(a), jnp.asarray(b)
    f32 = jax.jit(jnp.matmul)
    bf16 = jax.jit(
        lambda x, w: jnp.matmul(
            x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
    )
    return {
        "jax f32": Form(lambda: f32(x, w).block_until_ready()),
        "jax bf16": Form(lambda: bf16(x, w).block_until_ready()),
    }


def _torch_forms(a: np.ndarray, b: np.ndarray) -> dict[str, Form]:
    try:
        import torch
    except ImportError:
        return {}
    x, w = torch.from_numpy(a), torch.from_numpy(b)
    xb, wb = x.bfloat16(), w.bfloat16()
    threads = torch.get_num_threads()

    @contextlib.contextmanager
    def one_thread():
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    return {
        f"torch f32 ({threads} threads)": Form(lambda: torch.matmul(x, w)),
        "torch f32 (1 thread)": Form(lambda: torch.matmul(x, w), one_thread),
        f"torch bf16 ({threads} threads)": Form(lambda: torch.matmul(xb, wb)),
    }


def _median_ms(form: Form, steps: int) -> float:
    with form.setting():
        return median_ms(form.call, steps)


def main(args: argparse.Namespace, machine: dict) -> int:
    names = list(_QUICK if args.quick else SHAPES)
    rounds = args.rounds or (1 if args.quick else 5)
    steps = 3 if args.quick else 30
    rows = []
    for name in names:
        m, k, n = SHAPES[name]
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        forms = {**_jax_forms(a, b), **_torch_forms(a, b)}
        np.testing.assert_allclose(
            np.asarray(jax.jit(jnp.matmul)(a, b)), a @ b, rtol=1e-4, atol=1e-3
        )
        for form in forms.values():  # compile, warm up
            _median_ms(form, 3)
        samples: dict[str, list[float]] = {form: [] for form in forms}
        for r in range(rounds):
            order = list(forms)[r % len(forms) :] + list(forms)[: r % len(forms)]
            for form in order:
                samples[form].append(_median_ms(forms[form], steps))
        row = {"case": name, "shape": [m, k, n]}
        for form, vals in samples.items():
            ms = statistics.median(vals)
            row[f"{form} ms"] = ms
            row[f"{form} GFLOP/s"] = 2 * m * k * n / ms / 1e6
        rows.append(row)
        print(f"  cpu-matmul {name}: {row}", file=sys.stderr)
    payload = {"machine": machine, "rows": rows}
    write_study(args.out, "cpu-matmul", args.quick, payload, _markdown(rows, machine))
    return 0


def _markdown(rows: list[dict], machine: dict) -> str:
    forms = [key[: -len(" ms")] for key in rows[0] if key.endswith(" ms")]
    out = [
        "# One f32 matmul: XLA:CPU beside PyTorch",
        "",
        f"Measured {machine_line(machine)}",
        "",
        "Median ms per call of `x @ w` (`x (rows, inner)`, `w (inner, columns)`), GFLOP/s "
        "in brackets; JAX jitted, bf16 = bfloat16 operands with float32 results; forms "
        "interleaved in rounds.",
        "",
        "| case | rows x inner x columns | " + " | ".join(forms) + " |",
        "|---|---|" + "---:|" * len(forms),
    ]
    for r in rows:
        cells = [f"{fmt(r[f'{f} ms'])} ({r[f'{f} GFLOP/s']:.0f})" for f in forms]
        out.append(
            f"| {r['case']} | {'x'.join(map(str, r['shape']))} | " + " | ".join(cells) + " |"
        )
    return "\n".join(out) + "\n"
