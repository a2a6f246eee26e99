"""Study: a DPO step with LoRA on a Qwen2-0.5B-shaped model, nnjax against TRL's DPOTrainer.

Rows (each in a fresh child process; one preference pair, each side 256 tokens:
a 128-token prompt and a 128-token response; LoRA rank 16, alpha 32, on every
attention and MLP projection; AdamW; beta 0.1; float32 weights and compute):

- ``nnjax``: ``nj.post.preference_trainer`` with ``reference="adapters"`` (the
  reference is the same params without the adapters), on ``nj.data.load_preference``'s
  arrays (their ``response_index`` limits the vocabulary head to the response
  tokens); after its first step the compiler's freed heap is given back
  (``nj.release_host_memory()``), as ``nj.fit`` does.
- ``trl``: ``trl.DPOTrainer`` with a ``peft`` ``LoraConfig`` (its reference is the
  model with the adapter disabled), ``gradient_checkpointing=False``, ``bf16=False``.
- ``trl ckpt``: the same with TRL's default ``gradient_checkpointing=True``.

Both load the same weights: a random ``Qwen2ForCausalLM`` the parent saves once to a
temporary folder (``nj.models.hf.from_pretrained`` on one side, transformers'
``from_pretrained`` on the other). Each child runs one step (nnjax: the
compilation), resets its peak RSS, runs ``--steps`` timed steps, and reports the
median step time and the peak RSS while training (``VmHWM``; libraries included).
Targets: nnjax peak memory <= 0.6x TRL's, step time <= 0.8x TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.report import fmt, machine_line, write_study
from benchmarks.study_llm_finetune import qwen2_05b_shape
from benchmarks.workloads import child_json, reset_peak_rss, rss

__all__ = ["main", "ROWS"]

ROWS = ("nnjax", "trl", "trl ckpt")
RANK = 16
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MB = 1e6


class _Words:
    """``"t5 t9"`` <-> ``[5, 9]``: the pair's ids pass through both readers unchanged."""

    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]


def _records(vocab: int, tokens: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    half = tokens // 2
    words = lambda n: " ".join(f"t{i}" for i in rng.integers(3, vocab, n))
    # a response of half - 1 words and the end token: each side is `tokens` long
    return [{"prompt": words(half), "chosen": words(half - 1), "rejected": words(half - 1)}]


def _save_model(shape: dict, folder: str) -> None:
    import torch
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
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(folder)


def _timed(step, steps: int) -> dict:
    t0 = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - t0
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "first_s": first,
        "step_s": statistics.median(times),
        "peak_mb": rss()[1] / _MB,
        "first_loss": first_loss,
        "loss": loss,
    }


def _nnjax(folder: str, shape: dict, steps: int) -> dict:
    import jax
    import optax

    import nnjax as nj

    config, params = nj.models.hf.from_pretrained(folder)
    model = nj.models.CausalLM(config)
    data = nj.data.load_preference(
        _records(shape["vocab_size"], shape["tokens"]), _Words(), shape["tokens"]
    )
    targets = [f"blocks/*/{m}/kernel" for m in ("attn/*", "mlp/*")]
    params, mask = nj.finetune.add_lora(
        params, jax.random.key(1), targets, rank=RANK, alpha=2 * RANK
    )
    tr = nj.post.preference_trainer(
        model, optax.adamw(1e-4), trainable=mask, loss_options={"beta": 0.1}
    )
    ts = tr.init(params)
    del params
    batch = (data.inputs, data.targets)

    calls = 0

    def step() -> float:
        nonlocal ts, calls
        ts, m = tr.step(ts, batch)
        calls += 1
        if calls == 1:  # the call that compiled, as nj.fit does
            nj.release_host_memory()
        return float(jax.block_until_ready(m["loss"]))

    return _timed(step, steps)


def _trl(folder: str, shape: dict, steps: int, checkpointing: bool) -> dict:
    import datasets
    import tokenizers
    import torch
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="t0"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="t2", pad_token="t0", bos_token="t1"
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    records = _records(shape["vocab_size"], shape["tokens"]) * (steps + 1)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=1,
        max_steps=steps + 1,
        learning_rate=1e-4,
        beta=0.1,
        max_length=shape["tokens"],
        gradient_checkpointing=checkpointing,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(MODULES))
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tok,
        peft_config=lora,
    )
    marks: dict = {"times": [], "losses": []}

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            marks["times"].append(time.perf_counter() - marks["t0"])
            if len(marks["times"]) == 1:
                reset_peak_rss()

    trainer.add_callback(Clock())
    trainer.train()
    times = marks["times"]
    return {
        "first_s": times[0],
        "step_s": statistics.median(times[1:]),
        "peak_mb": rss()[1] / _MB,
        "loss": float(trainer.state.log_history[-1].get("train_loss", float("nan"))),
    }


def child(row: str, folder: str, quick: bool, steps: int) -> dict:
    """One row measured in this (fresh) process."""
    shape = qwen2_05b_shape(quick)
    if row == "nnjax":
        return _nnjax(folder, shape, steps)
    return _trl(folder, shape, steps, checkpointing=row == "trl ckpt")


def main(args: argparse.Namespace, machine: dict) -> int:
    steps = 2 if args.quick else 4
    shape = qwen2_05b_shape(args.quick)
    folder = tempfile.mkdtemp(prefix="nnjax-dpo-study-")
    try:
        _save_model(shape, folder)
        rows = []
        for row in ROWS:
            argv = ["benchmarks.study_dpo", row, folder, str(steps)]
            argv += ["--quick"] if args.quick else []
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            got = child_json(argv, f"dpo child {row}", 3600, {"JAX_PLATFORMS": "cpu"})
            rows.append({"row": row, "load_before": float(load), **got})
            print(f"  dpo {row}: {rows[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    payload = {"machine": machine, "quick": args.quick, "steps": steps, "rows": rows}
    write_study(args.out, "dpo", args.quick, payload, _markdown(rows, machine, args.quick))
    return 0


def _markdown(rows: list[dict], machine: dict, quick: bool) -> str:
    by = {r["row"]: r for r in rows}
    ours = by["nnjax"]
    shape = qwen2_05b_shape(quick)
    out = [
        "# A DPO step with LoRA on a Qwen2-0.5B-shaped model: nnjax and TRL's DPOTrainer",
        "",
        f"Measured {machine_line(machine)}",
        "",
        f"Width {shape['hidden_size']}, {shape['num_layers']} layers, vocab "
        f"{shape['vocab_size']}, one pair of {shape['tokens']}-token sides "
        f"({shape['tokens'] // 2}-token prompt), LoRA rank {RANK} on every attention and "
        "MLP projection, AdamW, float32; the reference is the model with its adapters off "
        "on both sides. One fresh process per row, the same saved weights; peak RSS while "
        "training (libraries included); step time the median of the timed steps. nnjax "
        "computes the vocabulary head over the response tokens only (`load_preference`'s "
        "`response_index`) and gives the compiler's freed heap back after its first step "
        "(`nj.release_host_memory()`, as `nj.fit` does).",
        "",
        "| row | peak RSS MB | nnjax / row | step s | nnjax / row | first step s | load before |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['row']} | {fmt(r['peak_mb'])} | {ours['peak_mb'] / r['peak_mb']:.2f} | "
            f"{fmt(r['step_s'])} | {ours['step_s'] / r['step_s']:.2f} | {fmt(r['first_s'])} | "
            f"{r['load_before']:.2f} |"
        )
    trl = by["trl"]
    out += [
        "",
        "Targets (against `trl`, the same float32 step without recomputation): peak memory "
        f"<= 0.6x: {ours['peak_mb'] / trl['peak_mb']:.2f}x; step time <= 0.8x: "
        f"{ours['step_s'] / trl['step_s']:.2f}x.",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # one child: row, folder, steps, [--quick]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(child(sys.argv[1], sys.argv[2], "--quick" in sys.argv[4:], int(sys.argv[3]))))
