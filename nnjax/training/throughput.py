"""Throughput of language-model training: FLOPs per token, a device's peak, tokens/s and MFU.

Model FLOPs utilisation (MFU, PaLM's appendix B) is the FLOPs the model needs per
second at the measured token rate over the device's peak. The FLOPs are those of
the matmuls, as PaLM and nanoGPT's ``estimate_mfu`` count them: ``6 N`` per token
for the ``N`` weights a token multiplies (the forward pass ``2 N``, the backward
``4 N``; the output head included, the embedding lookup not) plus ``12 L H Q T``
for attention (``L`` layers, ``H`` heads of width ``Q``, context ``T``: scores and
weighted values, over the full ``T`` as the convention has it). Recomputation
(remat) is not counted: MFU measures the model's work, not the hardware's.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nnjax.core.errors import ArgumentError

__all__ = ["flops_per_token", "Peak", "device_peak", "training_dtype", "throughput_callback"]

# Dense bf16 peaks per chip, from the vendors' data sheets (FLOP/s).
_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def flops_per_token(config: Any, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token of a :class:`~nnjax.models.CausalLMConfig` at context ``seq_len``.

    ``2 N + 4 L H Q T`` for the forward pass (``training=False``), three times that for
    a training step (forward and backward). ``N`` counts the attention projections, the
    MLP and the output head (``vocab_size * hidden_size``, tied or not).

    Example:
        >>> cfg = nj.models.CausalLMConfig(vocab_size=100, hidden_size=32, num_layers=2,
        ...                                num_heads=4, mlp_hidden=64)
        >>> from nnjax.training.throughput import flops_per_token
        >>> flops_per_token(cfg, 16)
        154368.0
    """
    d, h, layers = config.hidden_size, config.num_heads, config.num_layers
    q = config.head_dim or d // h
    kv = config.num_kv_heads or h
    attn = d * h * q + 2 * d * kv * q + h * q * d
    mlp = (3 if config.mlp == "gated" else 2) * d * config.mlp_hidden
    n = layers * (attn + mlp) + d * config.vocab_size
    forward = 2 * n + 4 * layers * h * q * seq_len
    return float(3 * forward if training else forward)


class Peak(NamedTuple):
    """A device peak: ``flops`` per second for the whole job, and how it was found."""

    flops: float
    source: str


def _cpu_info() -> tuple[float, set[str]]:
    """The first core's clock (MHz; 2000 where unknown) and instruction-set flags."""
    mhz, flags = 2000.0, set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        flags = set(info.split("flags")[1].split("\n")[0].split(":")[-1].split())
        mhz = float(info.split("cpu MHz")[1].split(":")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return mhz, flags


def _cpu_peak(devices: int) -> Peak:
    cores = os.cpu_count() or 1
    mhz, flags = _cpu_info()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * 2 * lanes  # two FMA units, 2 FLOPs per lane
    flops = cores * mhz * 1e6 * per_cycle
    return Peak(
        flops,
        f"assumed CPU peak: {cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} float32 "
        f"FLOP/cycle ({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'} FMA, two "
        f"units) = {flops / 1e9:.0f} GFLOP/s; pass --peak-tflops for yours",
    )


def training_dtype(devices: list[Any] | None = None) -> Any:
    """The compute dtype that trains fastest on ``devices``: ``jnp.bfloat16`` or ``None``.

    ``None`` (float32) on a CPU without bfloat16 instructions; bfloat16 on GPUs, TPUs
    and CPUs with them (AMX or AVX-512 BF16, from ``/proc/cpuinfo``), where
    :func:`nnjax.trainer`'s ``compute_dtype=bfloat16`` multiplies bfloat16 operands
    with float32 accumulation (the speeds are in ``docs/benchmarks.md``).

    Args:
        devices: the devices training runs on; default ``jax.devices()``.

    Example:
        >>> from nnjax.training import throughput
        >>> throughput.training_dtype() in (None, jnp.bfloat16)
        True
    """
    devices = jax.devices() if devices is None else devices
    if devices[0].platform != "cpu":
        return jnp.bfloat16
    flags = _cpu_info()[1]
    return jnp.bfloat16 if flags & {"amx_bf16", "avx512_bf16"} else None


def device_peak(peak_tflops: float | None = None, devices: list[Any] | None = None) -> Peak:
    """The job's peak FLOP/s: ``peak_tflops`` per device when given, else a data-sheet value.

    Args:
        peak_tflops: the peak of one device in TFLOP/s (what your hardware's data sheet
            gives for the compute dtype).
        devices: the devices training runs on; default ``jax.devices()``.

    Returns:
        A :class:`Peak` for all ``devices`` together. On a CPU the peak is estimated from
        the core count, clock and vector width (``source`` says so); on an unknown
        accelerator without ``peak_tflops``, ``flops`` is NaN (MFU is not reported).
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if peak_tflops is not None:
        if not (isinstance(peak_tflops, int | float) and peak_tflops > 0):
            raise ArgumentError(f"peak_tflops: expected a number > 0, got {peak_tflops!r}")
        return Peak(n * peak_tflops * 1e12, f"given: {n} x {peak_tflops:g} TFLOP/s")
    kind = str(getattr(devices[0], "device_kind", ""))
    if devices[0].platform == "cpu":
        return _cpu_peak(n)
    for name, flops in _PEAKS.items():
        if name.lower() in kind.lower():
            return Peak(n * flops, f"{n} x {kind}: {flops / 1e12:g} TFLOP/s (bf16, data sheet)")
    return Peak(math.nan, f"unknown peak for {kind!r}: pass --peak-tflops")


def throughput_callback(
    flops_per_step: float,
    tokens_per_step: int,
    peak: Peak,
    *,
    print_fn: Callable[[str], Any] | None = print,
    log_file: str | os.PathLike | None = None,
    excluded: Callable[[], float] | None = None,
) -> Callable[[int, Any, dict[str, Any]], bool]:
    """A ``fit`` callback that reports tokens/s and MFU at each log point.

    Each report covers the steps since the previous one (the first includes the
    compilation). ``excluded()`` returns seconds to leave out of the window (time spent
    evaluating, say): it is read at each report and the increase since the last one is
    subtracted.

    Args:
        flops_per_step: model FLOPs of one optimizer step (``flops_per_token * tokens``).
        tokens_per_step: tokens in one optimizer step (all micro-batches, all devices).
        peak: from :func:`device_peak`.
        print_fn: where the line goes (``None``: nowhere).
        log_file: a JSONL file to append ``{"step", "tokens_per_s", "mfu", ...}`` to.
        excluded: see above.

    Returns:
        ``callback(step, ts, logs) -> False``; its ``records`` attribute lists the reports
        and ``callback.start(step)``, called right before ``fit``, starts the first
        window (without it, the first report has no rate).
    """
    last: dict[str, Any] = {"time": time.perf_counter(), "step": None, "excluded": 0.0}
    records: list[dict[str, Any]] = []

    def start(step: int) -> None:
        """Call right before ``fit`` with the step it starts from (0, or the resumed one)."""
        skip = excluded() if excluded is not None else 0.0
        last.update(step=step, time=time.perf_counter(), excluded=skip, first=True)

    def callback(step: int, ts: Any, logs: dict[str, Any]) -> bool:
        now = time.perf_counter()
        skip = excluded() if excluded is not None else 0.0
        begin, first = last["step"], last.get("first", False)
        seconds = now - last["time"] - (skip - last["excluded"])
        last.update(time=now, excluded=skip, step=step, first=False)
        record: dict[str, Any] = {"step": step, **logs}
        if "val_loss" in logs:
            record["val_perplexity"] = math.exp(min(float(logs["val_loss"]), 700.0))
        if begin is not None and step > begin and seconds > 0:
            record["tokens_per_s"] = (step - begin) * tokens_per_step / seconds
            record["mfu"] = (step - begin) * flops_per_step / seconds / peak.flops
            record["compile_included"] = first
        records.append(record)
        if print_fn is not None:
            print_fn(_line(record))
        if log_file is not None:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return False

    callback.records = records  # type: ignore[attr-defined]
    callback.start = start  # type: ignore[attr-defined]
    return callback


def _line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}"]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "val_loss" in r:
        parts.append(f"val loss {r['val_loss']:.4f} (perplexity {r['val_perplexity']:.2f})")
    if "tokens_per_s" in r:
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{100 * r['mfu']:.2f}%"
        note = " (compilation included)" if r.get("compile_included") else ""
        parts.append(f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}{note}")
    return ", ".join(parts)
