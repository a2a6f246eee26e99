"""QLoRA memory rows of the llm-finetune study: quantizing while loading, the int8 token table.

Rows (each a fresh child process of :mod:`benchmarks.study_llm_finetune`):

- ``nnjax lora nf4 int8-embed``: the ``nnjax lora nf4`` row with the tied token table
  also stored as int8 rows (``quantize(..., embeddings="tok_embed/embedding")``).
- ``nnjax qlora loaded``: the same model loaded from a bf16 safetensors checkpoint of the
  Qwen2-0.5B shape by ``from_pretrained(path, dtype=float32, quantize=...)`` (each tensor
  quantized as it is read), then LoRA-trained: the load's peak (RSS growth over the
  process before loading) beside the quantized params' bytes, then the training peak.
- ``nnjax load then quantize``: ``from_pretrained`` in float32, then ``quantize``: the
  same load peak the old way.

The checkpoint (random weights; ~1 GB in bf16) is written once to a folder under the
system's temporary directory by a child of its own and reused.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

from benchmarks.workloads import reset_peak_rss, rss

__all__ = [
    "QLORA_ROWS",
    "EXTRA",
    "qlora_child",
    "qlora_markdown",
    "quantization",
    "checkpoint_folder",
    "profile",
]

QLORA_ROWS = ("nnjax lora nf4 int8-embed", "nnjax qlora loaded", "nnjax load then quantize")
EXTRA = (
    "xla_temp_mb",
    "xla_peak_mb",
    "params_mb",
    "table_mb",
    "opt_mb",
    "load_s",
    "load_peak_mb",
    "quantized_mb",
    "load_x_quantized",
    "process_before_mb",
)
"""The per-row figures beyond time and peak RSS (medians over rounds)."""
_MB = 1e6


def quantization(embeddings: bool) -> Any:
    """The study's QLoRA base: NF4 (blocks of 64) on every block kernel, the table int8."""
    import nnjax as nj

    targets = [f"blocks/*/{m}/kernel" for m in ("attn/*", "mlp/*")]
    return nj.finetune.Quantization(
        targets, bits=4, embeddings="tok_embed/embedding" if embeddings else ()
    )


def checkpoint_folder(quick: bool) -> str:
    return os.path.join(tempfile.gettempdir(), f"nnjax-bench-qwen2-05b{'-quick' if quick else ''}")


def make_checkpoint(config: Any, quick: bool) -> dict:
    """Write a random model of ``config`` as a bf16 HF folder (once; reused after)."""
    import jax
    import jax.numpy as jnp

    import nnjax as nj

    folder = checkpoint_folder(quick)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        model = nj.models.CausalLM(config)
        params, _ = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        nj.models.hf.save_pretrained(folder, config, params, max_shard_size="2GB")
    return {"folder": folder}


def profile(tr: Any, ts: Any, batch: Any, mask: Any) -> dict:
    """What a compiled step holds, MB: XLA's temporaries and peak estimate, the params
    (the float token table apart), the optimizer state."""
    import nnjax as nj

    cost = nj.finetune.step_cost(tr.step, ts, batch, trainable=mask)
    table = nj.param_bytes(ts.params["tok_embed"])
    return {
        "xla_temp_mb": cost.temp_bytes / _MB,
        "xla_peak_mb": cost.peak_bytes / _MB,
        "params_mb": cost.param_bytes / _MB,
        "table_mb": table / _MB,
        "opt_mb": cost.opt_state_bytes / _MB,
    }


def _load(row: str, config: Any, quick: bool) -> tuple[Any, dict]:
    import jax
    import jax.numpy as jnp

    import nnjax as nj

    folder = checkpoint_folder(quick)
    spec = quantization(embeddings=True)
    nj.models.hf.from_pretrained(folder if quick else checkpoint_folder(True), quantize=spec)
    before = rss()[0]
    reset_peak_rss()
    t0 = time.perf_counter()
    if row == "nnjax qlora loaded":
        _, params = nj.models.hf.from_pretrained(folder, dtype=jnp.float32, quantize=spec)
    else:
        _, floats = nj.models.hf.from_pretrained(folder, dtype=jnp.float32)
        params = nj.finetune.quantize(floats, spec)
        del floats
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = rss()[1]
    stored = nj.param_bytes(params)
    return params, {
        "load_s": seconds,
        "load_peak_mb": (peak - before) / _MB,
        "quantized_mb": stored / _MB,
        "load_x_quantized": (peak - before) / stored,
        "process_before_mb": before / _MB,
    }


def qlora_child(row: str, config: Any, batch: Any, steps: int, quick: bool, train: Any) -> dict:
    """One QLoRA row in this (fresh) process; ``train([params], mask) -> dict`` trains it
    (the list emptied: this frame keeps no second reference to the params)."""
    import jax

    import nnjax as nj

    targets = [f"blocks/*/{m}/kernel" for m in ("attn/*", "mlp/*")]
    if row == "nnjax lora nf4 int8-embed":
        model = nj.models.CausalLM(config)
        params, _ = model.init(jax.random.key(0), batch[0])
        params = nj.finetune.quantize(params, quantization(embeddings=True))
        load: dict = {}
    else:
        make_checkpoint(config, quick)
        if not quick:
            make_checkpoint(dataclasses.replace(config, **_tiny()), True)
        params, load = _load(row, config, quick)
    params, mask = nj.finetune.add_lora(params, jax.random.key(1), targets, rank=16)
    box = [params]
    del params
    return {**load, **train(box, mask)}


def _tiny() -> dict:
    """The quick shape's config fields (a warm-up load compiles what the real load runs)."""
    from benchmarks.study_llm_finetune import qwen2_05b_shape

    return {k: v for k, v in qwen2_05b_shape(True).items() if k != "tokens"}


def qlora_markdown(by: dict, full: dict, peft: dict) -> list[str]:
    """The profile of each nnjax row's step and the loads, with the QLoRA targets."""
    from benchmarks.report import fmt

    out = [
        "",
        "What each nnjax row's step holds (MB; XLA's accounting of the compiled step; the "
        "process's libraries and allocator slack are the rest of the peak RSS):",
        "",
        "| row | peak RSS | params | of which token table | optimizer state | "
        "XLA temporaries | XLA peak estimate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in by.items():
        if "xla_temp_mb" in r:
            out.append(
                f"| {name} | {fmt(r['peak_mb'])} | {fmt(r['params_mb'])} | {fmt(r['table_mb'])} | "
                f"{fmt(r['opt_mb'])} | {fmt(r['xla_temp_mb'])} | {fmt(r['xla_peak_mb'])} |"
            )
    loads = [(n, r) for n, r in by.items() if "load_peak_mb" in r]
    if loads:
        out += [
            "",
            "Loading a bf16 checkpoint of the same shape as float32 + NF4 blocks + int8 table "
            "(peak RSS growth over the process before the load):",
            "",
            "| row | load s | load peak MB | quantized params MB | peak / quantized |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in loads:
            out.append(
                f"| {name} | {fmt(r['load_s'])} | {fmt(r['load_peak_mb'])} | "
                f"{fmt(r['quantized_mb'])} | {r['load_x_quantized']:.2f} |"
            )
    best = by.get("nnjax qlora loaded", by.get("nnjax lora nf4 int8-embed"))
    if best is not None:
        loaded = by.get("nnjax qlora loaded")
        out += [
            "",
            f"QLoRA targets: NF4-base LoRA peak <= 0.25x full: {best['peak_mb'] / full['peak_mb']:.2f}x; "
            f"<= 0.5x transformers+peft float LoRA: {best['peak_mb'] / peft['peak_mb']:.2f}x"
            + (
                f"; load+quantize peak <= 1.3x the quantized model: {loaded['load_x_quantized']:.2f}x."
                if loaded
                else "."
            ),
        ]
    return out
