"""Fine-tune a character-level GPT on a second text with LoRA: only small adapters train.

    python examples/finetune_gpt_lora.py                     # pretrain briefly, then LoRA
    python examples/gpt_shakespeare.py --out runs/char       # or: pretrain once, properly ...
    python examples/finetune_gpt_lora.py --init runs/char    # ... and fine-tune from it
    python examples/finetune_gpt_lora.py --data other.txt --rank 8 --iters 1000

The base model is the GPT of ``gpt_shakespeare.py``: loaded from ``--init`` (a folder
that script wrote with ``--out``) or pretrained here for ``--pretrain-iters`` on
Tiny Shakespeare (or a text made by code where that file is absent). The second
text is ``--data``, or by default a made-by-code text of nursery-rhyme-like lines in
another style (its characters must be in the base model's vocabulary).

LoRA adapters (``lora_a (d, r)``, ``lora_b (r, d)``, ``lora_b`` starting at 0) go
beside the attention query and value kernels of every stacked block
(``blocks/*/attn/query/kernel``); the trainer gets the mask that trains only them,
so the base weights come out bit for bit. Prints the second text's val loss before
and after, the trainable parameter count, and the adapter file's size beside the
full model's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from gpt_shakespeare import (
    RECIPES,
    load_data,
    load_run,
    made_text,
    make_loss_estimator,
    nanogpt_adamw,
    sample,
    train,
)

import nnjax as nj
from nnjax.models.gpt import GPT, GPTConfig

TARGETS = ("blocks/*/attn/query/kernel", "blocks/*/attn/value/kernel")


def rhymes(n_lines: int = 4000, seed: int = 1) -> str:
    """A second text made by code: lowercase rhyming couplets, unlike a play's speech."""
    rng = np.random.default_rng(seed)
    pairs = [("cat", "hat"), ("moon", "spoon"), ("hill", "mill"), ("tree", "sea"), ("day", "way")]
    who = ["the little mouse", "a sleepy owl", "my old goat", "the baker", "a silver fish"]
    did = ["sat on the", "ran to the", "sang of the", "looked at the", "dreamed of the"]
    lines = []
    for _ in range(n_lines // 2):
        a, b = pairs[rng.integers(len(pairs))]
        lines.append(f"{rng.choice(who)} {rng.choice(did)} {a},")
        lines.append(f"and {rng.choice(who)} {rng.choice(did)} {b}.")
    return "\n".join(lines) + "\n"


def encoder(vocab: list):
    stoi = {c: i for i, c in enumerate(vocab)}

    def encode(text: str) -> np.ndarray:
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise SystemExit(f"characters {unknown} are not in the base model's vocabulary")
        return np.array([stoi[c] for c in text], np.int32)

    return encode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--init", help="a folder written by gpt_shakespeare.py --out (default: pretrain here)"
    )
    p.add_argument("--pretrain-data", help="text to pretrain on (default: Tiny Shakespeare)")
    p.add_argument("--pretrain-iters", type=int, default=400)
    p.add_argument("--data", help="the second text (default: rhymes made by code)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the adapters (adapters.safetensors) into this folder")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps (CI)")
    args = p.parse_args(argv)
    base = dict(RECIPES["smoke" if args.smoke else "small"])
    if args.smoke:
        args.pretrain_iters, args.iters = 4, 4
    args.base = base
    return args


def run_args(base: dict, iters: int, seed: int) -> argparse.Namespace:
    k = base["steps_per_call"]
    iters = max(k, iters // k * k)
    return argparse.Namespace(**{**base, "iters": iters, "eval_interval": iters, "seed": seed})


def base_model(args) -> tuple[GPTConfig, dict, list]:
    """``(config, params, vocab)``: loaded from ``--init`` or pretrained here."""
    if args.init:
        config, params, vocab = load_run(args.init)
        print(f"base model: {args.init} ({nj.paths.count_params(params) / 1e6:.2f}M params)")
        return config, params, vocab
    text, source = load_data(args.pretrain_data)
    if source == "a text made by code" and not args.data:
        # both texts made by code: one vocabulary that covers both
        vocab = sorted(set(made_text()) | set(rhymes()))
        ids = encoder(vocab)(made_text())
        n = int(0.9 * len(ids))
        text = text._replace(train=ids[:n], val=ids[n:], vocab=vocab)
    b = args.base
    config = GPTConfig(
        vocab_size=len(text.vocab),
        block_size=b["block_size"],
        n_layer=b["n_layer"],
        n_head=b["n_head"],
        n_embd=b["n_embd"],
        activation="gelu",
    )
    params, _ = GPT(config).init(jax.random.key(args.seed), jnp.zeros((1, 1), jnp.int32))
    run = run_args(b, args.pretrain_iters, args.seed)
    opt = nanogpt_adamw(params, lr=1e-3, min_lr=1e-4, warmup=run.warmup, decay_iters=run.iters)
    print(f"pretraining on {source} for {run.iters} iterations")
    params, _ = train(config, params, opt, text.train, text.val, run, log=lambda s: None)
    return config, params, text.vocab


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    config, params, vocab = base_model(args)
    encode = encoder(vocab)
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            ids, source = encode(f.read()), args.data
    else:
        ids, source = encode(rhymes()), "rhymes made by code"
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    print(f"fine-tuning data: {source}: {len(train_ids):,} train / {len(val_ids):,} val characters")

    run = run_args(args.base, args.iters, args.seed + 1)
    estimate = make_loss_estimator(GPT(config), config.block_size, run.batch_size)
    before = estimate(params, val_ids, run.final_eval_iters, seed=10**6 + 1)

    lora, mask = nj.finetune.add_lora(
        params, jax.random.key(args.seed), TARGETS, rank=args.rank, alpha=args.alpha
    )
    total = nj.paths.count_params(lora)
    trainable = nj.finetune.trainable_count(lora, mask)
    print(
        f"LoRA rank {args.rank} on {', '.join(TARGETS)}: {trainable:,} trainable of "
        f"{total:,} params ({100 * trainable / total:.2f}%)"
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    tuned, final = train(config, lora, opt, train_ids, val_ids, run, trainable=mask, log=print)
    after = final["val_loss"]
    merged = nj.finetune.merge_lora(tuned)
    merged_loss = estimate(merged, val_ids, run.final_eval_iters, seed=10**6 + 1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or tmp
        os.makedirs(folder, exist_ok=True)
        adapter_bytes = nj.finetune.save_adapters(
            os.path.join(folder, "adapters.safetensors"), tuned
        )
        full = os.path.join(tmp, "full.safetensors")
        nj.checkpoint.save_params(full, merged)
        full_bytes = os.path.getsize(full)
    base_kept = all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(nj.finetune.remove_adapters(tuned)),
            strict=True,
        )
    )
    print(
        f"val loss on the second text: before {before:.4f} -> after {after:.4f} "
        f"(merged into the kernels: {merged_loss:.4f})"
    )
    print(f"base weights unchanged: {base_kept}")
    print(
        f"adapter file {adapter_bytes / 1024:.1f} KiB vs full model {full_bytes / 1024:.1f} KiB "
        f"({100 * adapter_bytes / full_bytes:.1f}%)"
        + (f"; saved to {args.out}" if args.out else "")
    )
    print(f"wall time {time.perf_counter() - start:.1f} s")
    prompt = encode("the ")
    n = 20 if args.smoke else 200
    tokens = sample(config, tuned, prompt, n, jax.random.key(args.seed), top_k=5)
    decode = "".join(vocab[int(i)] for i in tokens)
    print("-" * 60 + "\nthe " + decode + "\n" + "-" * 60)
    return {
        "before": before,
        "after": after,
        "merged": merged_loss,
        "trainable": trainable,
        "total": total,
        "adapter_bytes": adapter_bytes,
        "full_bytes": full_bytes,
        "base_kept": base_kept,
    }


if __name__ == "__main__":
    main()
