"""The three workloads: their sizes, their data, their parameter counts, and the Bench record.

Every framework module builds each workload from a :class:`Config` and returns a
:class:`Bench`. The harness (``benchmarks.run``) only ever calls ``bench.run(n)``:
``n`` calls of the training step back to back, then one wait for the last loss.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "WORKLOADS",
    "Config",
    "Timing",
    "Bench",
    "UnavailableError",
    "carry_bench",
    "median_ms",
    "child_json",
    "lenet_flat_features",
    "config",
    "timing",
    "expected_params",
    "make_batch",
    "make_batches",
    "LEARNING_RATE",
    "LN_EPSILON",
]

WORKLOADS = ("tiny-mlp", "lenet-cnn", "gpt-char")
LEARNING_RATE = 1e-3
LN_EPSILON = 1e-5


class Config(NamedTuple):
    """Sizes of one workload. Fields a workload does not use keep their defaults.

    tiny-mlp: ``features`` (in, hidden..., classes), ``batch``.
    lenet-cnn: ``image`` (square side, 1 channel), ``classes``, ``batch``.
    gpt-char: ``vocab``, ``context``, ``layers``, ``width``, ``heads`` (MLP is 4x width), ``batch``.
    """

    batch: int
    features: tuple[int, ...] = (64, 128, 128, 10)
    image: int = 28
    classes: int = 10
    vocab: int = 65
    context: int = 128
    layers: int = 4
    width: int = 128
    heads: int = 4


class Timing(NamedTuple):
    """How one workload is timed.

    ``block``: individually timed calls per framework per round; ``warmup``: calls
    after the first (compiling) one that are not timed; ``fused``: steps per call
    for the fused (``steps_per_call``/``lax.scan``) variants; ``loop``: steps of the
    plain Python loop timed as one block (0 = not measured).
    """

    block: int
    warmup: int
    fused: int
    loop: int = 0


_FULL = {
    "tiny-mlp": Config(batch=32),
    "lenet-cnn": Config(batch=128),
    "gpt-char": Config(batch=32),
}
_QUICK = {
    "tiny-mlp": Config(batch=32),
    "lenet-cnn": Config(batch=8, image=12),
    "gpt-char": Config(batch=2, context=16, layers=1, width=32, heads=2),
}
_TIMING_FULL = {
    "tiny-mlp": Timing(block=100, warmup=50, fused=100, loop=1000),
    "lenet-cnn": Timing(block=10, warmup=5, fused=10),
    "gpt-char": Timing(block=3, warmup=2, fused=2),
}
_TIMING_QUICK = {
    "tiny-mlp": Timing(block=5, warmup=2, fused=4, loop=20),
    "lenet-cnn": Timing(block=2, warmup=1, fused=2),
    "gpt-char": Timing(block=2, warmup=1, fused=2),
}


def config(workload: str, quick: bool = False) -> Config:
    """The sizes of ``workload`` (``--quick``: tiny sizes)."""
    return (_QUICK if quick else _FULL)[workload]


def timing(workload: str, quick: bool = False) -> Timing:
    """How ``workload`` is timed (``--quick``: a handful of steps)."""
    return (_TIMING_QUICK if quick else _TIMING_FULL)[workload]


def _dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def lenet_flat_features(cfg: Config) -> int:
    """Features after conv(SAME) -> pool 2 -> conv 5x5 VALID -> pool 2, 16 channels."""
    side = (cfg.image // 2 - 4) // 2
    return side * side * 16


def expected_params(workload: str, cfg: Config) -> int:
    """The parameter count every framework's model must have."""
    if workload == "tiny-mlp":
        f = cfg.features
        return sum(_dense(a, b) for a, b in itertools.pairwise(f))
    if workload == "lenet-cnn":
        convs = (25 * 1 * 6 + 6) + (25 * 6 * 16 + 16)
        return convs + _dense(lenet_flat_features(cfg), 120) + _dense(120, 84) + _dense(84, 10)
    if workload == "gpt-char":
        d = cfg.width
        block = 2 * 2 * d + 4 * _dense(d, d) + _dense(d, 4 * d) + _dense(4 * d, d)
        return (cfg.vocab + cfg.context) * d + cfg.layers * block + 2 * d + _dense(d, cfg.vocab)
    raise KeyError(workload)


def make_batch(workload: str, cfg: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One batch ``(x, y)`` as NumPy arrays, the same for every framework.

    tiny-mlp: ``x (B, 64) float32``, ``y (B,) int32``. lenet-cnn: ``x (B, H, W, 1)``
    channels-last (frameworks that want NCHW transpose it), ``y (B,)``. gpt-char:
    ``x (B, T) int32`` tokens and ``y (B, T)`` the next tokens.
    """
    rng = np.random.default_rng(seed)
    b = cfg.batch
    if workload == "tiny-mlp":
        x = rng.standard_normal((b, cfg.features[0]), dtype=np.float32)
        y = rng.integers(0, cfg.features[-1], (b,), dtype=np.int32)
    elif workload == "lenet-cnn":
        x = rng.standard_normal((b, cfg.image, cfg.image, 1), dtype=np.float32)
        y = rng.integers(0, cfg.classes, (b,), dtype=np.int32)
    elif workload == "gpt-char":
        tokens = rng.integers(0, cfg.vocab, (b, cfg.context + 1), dtype=np.int32)
        x, y = tokens[:, :-1], tokens[:, 1:]
    else:
        raise KeyError(workload)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def make_batches(workload: str, cfg: Config, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` different batches stacked on a leading axis: ``x (k, B, ...)``, ``y (k, B, ...)``."""
    pairs = [make_batch(workload, cfg, seed) for seed in range(k)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class UnavailableError(Exception):
    """A framework cannot build this workload here (package or feature missing): a skip."""


class Bench(NamedTuple):
    """One framework's training step for one workload, ready to time.

    ``run(n)`` makes ``n`` calls of the step back to back (no waiting in between)
    and then waits until the last one has finished; it returns that call's loss
    (any array-like ``float()`` accepts). ``steps_per_call`` is how many
    optimizer steps one call makes (``> 1`` for the fused variants).
    ``first_call_s``: set when the builder already made the first (compiling)
    call itself, e.g. to turn a failing ``torch.compile`` into a skip.
    """

    run: Callable[[int], Any]
    n_params: int
    steps_per_call: int = 1
    note: str = ""
    first_call_s: float | None = None


def carry_bench(
    call: Callable[[Any], tuple[Any, Any]],
    carry: Any,
    n_params: int,
    steps_per_call: int = 1,
    note: str = "",
) -> Bench:
    """A :class:`Bench` for a functional step ``call(carry) -> (carry, loss)`` (JAX arrays).

    The carry (params, optimizer state, ...) lives in a one-element list, so a
    donated carry is never touched again after it is passed in.
    """
    cell = [carry]

    def run(n: int) -> Any:
        loss = None
        for _ in range(n):
            cell[0], loss = call(cell[0])
        return loss.block_until_ready()

    return Bench(run, n_params, steps_per_call, note)


def median_ms(call: Callable[[], object], steps: int) -> float:
    """Median wall time in ms of ``steps`` calls of ``call`` (which must wait for its result)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def first_and_median(step: Callable[[], object], steps: int) -> tuple[float, float]:
    """``(seconds of the first call, median seconds of the next steps calls)``: compile or
    warm-up apart from the steady state."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def torch_greedy_decode(model: Any, prompt_len: int, new_tokens: int, steps: int) -> dict:
    """transformers' greedy ``generate`` at batch 1 and 8 on random prompts (seed 0):
    ``{"b{b} tok/s", "b{b} first s"}``, the reference side of the LLM decode cells."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = {}
    for b in (1, 8):
        prompt = torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=gen)

        def run(prompt=prompt):
            with torch.no_grad():
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        first, s = first_and_median(run, steps)
        out[f"b{b} tok/s"] = b * new_tokens / s
        out[f"b{b} first s"] = first
    return out


_ROOT = pathlib.Path(__file__).resolve().parents[1]


HUGE_PAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
"""glibc's malloc in 2 MB transparent huge pages (read at process start): XLA:CPU
allocates each step's large buffers afresh, and with 4 KB pages a 124M train step took
~137,000 page faults (examples/pretrain_llm.py starts itself with it; docs/benchmarks.md).
PyTorch is run without it: its full float32 step was slower with it (2.0 s against 1.3)."""


def child_json(argv: list[str], what: str, timeout: float, env: dict | None = None) -> Any:
    """Run ``python -m ARGV...`` from the checkout in a fresh process; the JSON on its last line.

    Raises:
        RuntimeError: the child failed (``what`` and the end of its stderr).
    """
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in bytes (Linux ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current RSS (``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
