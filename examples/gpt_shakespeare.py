"""A character-level GPT on Tiny Shakespeare (or any text file), as nanoGPT's shakespeare_char.

    python examples/gpt_shakespeare.py                        # small run, a minute or two on 2 cores
    python examples/gpt_shakespeare.py --recipe nanogpt-cpu   # nanoGPT's documented CPU recipe
    python examples/gpt_shakespeare.py --data my.txt --iters 5000 --n-layer 6 --n-embd 384
    python examples/gpt_shakespeare.py --out runs/char        # save params for finetune_gpt_lora.py

The data is ``../shared/data/tinyshakespeare/input.txt`` beside the repository (or
``--data``); if it is absent, a text made by code stands in (and the script says
so). Characters are the tokens, the first 90% trains and the last 10% validates,
as nanoGPT's ``prepare.py``. Prints train/val loss every ``--eval-interval``
iterations (nanoGPT's ``estimate_loss``: mean loss over ``--eval-iters`` random
batches of each split), the final losses over ``--final-eval-iters`` batches, the
wall time, and a sample from the model (KV-cache generation).

``--recipe nanogpt-cpu`` is nanoGPT's README CPU command on
``config/train_shakespeare_char.py``: 4 layers, 4 heads, width 128, context 64,
batch 12, 2000 iterations, AdamW (betas 0.9/0.99, weight decay 0.1 on matrices and
embeddings, gradient clipping 1.0), lr 1e-3 with 100 warmup iterations and cosine
decay to 1e-4 at 2000, no dropout, exact GELU. nanoGPT reports val loss ~1.88.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
from nnjax.models import generate
from nnjax.models.gpt import GPT, GPTConfig, weight_decay_mask

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"

RECIPES: dict[str, dict[str, Any]] = {
    # a minute or two on a 2-core CPU
    "small": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        batch_size=12,
        iters=1500,
        lr=1e-3,
        min_lr=1e-4,
        warmup=100,
        eval_interval=500,
        eval_iters=20,
        final_eval_iters=200,
        dropout=0.0,
        steps_per_call=25,
    ),
    # nanoGPT README: python train.py config/train_shakespeare_char.py --device=cpu
    # --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
    # --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
    "nanogpt-cpu": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        batch_size=12,
        iters=2000,
        lr=1e-3,
        min_lr=1e-4,
        warmup=100,
        eval_interval=250,
        eval_iters=20,
        final_eval_iters=200,
        dropout=0.0,
        steps_per_call=25,
    ),
    # CI: seconds
    "smoke": dict(
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        batch_size=4,
        iters=4,
        lr=1e-3,
        min_lr=1e-4,
        warmup=1,
        eval_interval=2,
        eval_iters=2,
        final_eval_iters=2,
        dropout=0.0,
        steps_per_call=2,
    ),
}


# --- data ----------------------------------------------------------------------------


def made_text(n_lines: int = 6000, seed: int = 0) -> str:
    """A play-like text made by code: speakers and lines from small word lists."""
    rng = np.random.default_rng(seed)
    speakers = ["KING", "QUEEN", "FOOL", "DUKE", "LADY", "GHOST"]
    subjects = ["the king", "my lord", "the night", "this crown", "thy heart", "the sea"]
    verbs = ["doth weep for", "shall betray", "loves", "hath seen", "will mend", "fears"]
    objects = ["the morning", "a rose", "our ruin", "his brother", "the storm", "all Rome"]
    lines = []
    for _ in range(n_lines // 4):
        lines.append(f"{rng.choice(speakers)}:")
        for _ in range(rng.integers(1, 4)):
            s, v, o = rng.choice(subjects), rng.choice(verbs), rng.choice(objects)
            end = rng.choice([".", "!", "?", ","])
            lines.append(f"{s.capitalize()} {v} {o}{end}")
        lines.append("")
    return "\n".join(lines)


def load_data(path: str | None, *, quiet: bool = False) -> tuple[nj.data.TextData, str]:
    """``(TextData, description)`` of ``path`` (default: Tiny Shakespeare), else a made text."""
    file = pathlib.Path(path) if path else DEFAULT_DATA
    if file.is_file():
        return nj.data.load_text(file), str(file)
    if path:
        raise SystemExit(f"--data {path}: no such file")
    if not quiet:
        print(f"{file} not found: training on a text made by code instead")
    with tempfile.TemporaryDirectory() as tmp:
        made = pathlib.Path(tmp) / "made.txt"
        made.write_text(made_text(), encoding="utf-8")
        return nj.data.load_text(made), "a text made by code"


# --- model, optimizer, evaluation ----------------------------------------------------


def nanogpt_adamw(
    params: Any,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    decay_iters: int,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.99),
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """nanoGPT's optimizer: clip, AdamW with decay on matrices/embeddings, warmup + cosine lr.

    nanoGPT's ``get_lr``: ``lr * (it + 1) / (warmup + 1)`` while warming up, then a
    cosine from ``lr`` at ``warmup`` to ``min_lr`` at ``decay_iters``.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=lr / (warmup + 1),
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(decay_iters, warmup + 1),
        end_value=min_lr,
    )
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(
            schedule,
            b1=betas[0],
            b2=betas[1],
            weight_decay=weight_decay,
            mask=weight_decay_mask(params),
        ),
    )


def make_loss_estimator(model: nj.Layer, block_size: int, batch_size: int):
    """``estimate(params, ids, n, seed) -> mean loss`` over ``n`` random batches (one jitted map)."""

    @jax.jit
    def mean_loss(params, xs, ys):  # xs, ys: (n, B, T)
        def one(batch):
            logits, _ = model.apply(params, {}, batch[0])
            return nj.losses.softmax_cross_entropy(logits, batch[1])

        return jnp.mean(jax.lax.map(one, (xs, ys)))

    def estimate(params, ids, n, seed):
        it = nj.data.lm_batches(ids, block_size, batch_size, seed=seed)
        xs, ys = zip(*(next(it) for _ in range(n)), strict=True)
        return float(mean_loss(params, np.stack(xs), np.stack(ys)))

    return estimate


def sample(
    config: GPTConfig, params: Any, prompt: np.ndarray, n: int, rng, top_k=None
) -> np.ndarray:
    """``n`` new tokens after ``prompt (T0,)``; longer than the context, the window slides by halves.

    Each chunk is one :func:`generate` call (KV cache); chunks after the first have
    the same shapes, so they reuse one compilation.
    """
    out = list(np.asarray(prompt)[-config.block_size :])
    half = max(config.block_size // 2, 1)
    while n > 0:
        context = np.asarray(out[-half:] if len(out) > half else out, np.int32)[None]
        k = min(n, config.block_size + 1 - context.shape[1])
        rng, key = jax.random.split(rng)
        new = generate(config, params, context, k, temperature=1.0, top_k=top_k, rng=key)
        out.extend(np.asarray(new[0, context.shape[1] :]).tolist())
        n -= k
    return np.asarray(out[len(prompt[-config.block_size :]) :])


# --- the run -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help=f"a UTF-8 text file (default: {DEFAULT_DATA})")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps (CI); --recipe smoke")
    for name, kind in [
        ("n-layer", int),
        ("n-head", int),
        ("n-embd", int),
        ("block-size", int),
        ("batch-size", int),
        ("iters", int),
        ("lr", float),
        ("min-lr", float),
        ("warmup", int),
        ("eval-interval", int),
        ("eval-iters", int),
        ("final-eval-iters", int),
        ("dropout", float),
        ("steps-per-call", int),
    ]:
        p.add_argument(f"--{name}", type=kind, help="overrides the recipe")
    p.add_argument(
        "--scan-unroll",
        type=int,
        help="blocks per iteration of the scan over blocks (default 1; --n-layer unrolls "
        "fully: compile time grows with depth, step time measured within noise on CPU)",
    )
    p.add_argument(
        "--onednn-dots",
        action="store_true",
        help="compile the train step with nj.ONEDNN_DOTS (CPU: matmuls through oneDNN; "
        "0.78x the step time at batch 32 x 128, no gain at the nanoGPT recipe's 12 x 64)",
    )
    p.add_argument("--activation", default="gelu", help="gelu (nanoGPT), gelu_new (GPT-2), ...")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--out", help="save params, config and vocabulary into this folder")
    args = p.parse_args(argv)
    recipe = RECIPES["smoke" if args.smoke else args.recipe]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.sample_tokens = min(args.sample_tokens, 20)
    if args.iters % args.steps_per_call or args.eval_interval % args.steps_per_call:
        p.error("--iters and --eval-interval must be multiples of --steps-per-call")
    return args


def save_run(folder: str, config: GPTConfig, params: Any, vocab: list) -> None:
    """``params.safetensors`` and ``model.json`` (config and vocabulary) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    nj.checkpoint.save_params(os.path.join(folder, "params.safetensors"), params)
    meta = {"config": dataclasses.asdict(config), "vocab": vocab}
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(meta, f)


def load_run(folder: str) -> tuple[GPTConfig, Any, list]:
    """``(config, params, vocab)`` saved by :func:`save_run`."""
    with open(os.path.join(folder, "model.json")) as f:
        meta = json.load(f)
    config = GPTConfig(**meta["config"])
    target = jax.eval_shape(
        GPT(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )[0]
    params = nj.checkpoint.load_params(os.path.join(folder, "params.safetensors"), target)
    return config, params, meta["vocab"]


def train(
    config: GPTConfig,
    params: Any,
    optimizer: optax.GradientTransformation,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    args: argparse.Namespace,
    *,
    trainable: Any = None,
    compiler_options: Any = None,
    log=print,
) -> tuple[Any, dict[str, float]]:
    """Train for ``args.iters`` steps (``args.steps_per_call`` fused per call); periodic and final eval.

    ``compiler_options`` go to the train step (``nj.ONEDNN_DOTS`` with ``--onednn-dots``).
    """
    model = GPT(config)
    k = args.steps_per_call
    tr = nj.trainer(
        model,
        nj.losses.softmax_cross_entropy,
        optimizer,
        trainable=trainable,
        steps_per_call=k,
        compiler_options=compiler_options,
    )
    estimate = make_loss_estimator(model, config.block_size, args.batch_size)
    ts = tr.init(params)
    batches = nj.data.stack_batches(
        nj.data.lm_batches(train_ids, config.block_size, args.batch_size, seed=args.seed), k
    )
    rng = jax.random.key(args.seed)
    for it in range(0, args.iters, k):
        if it % args.eval_interval == 0:
            tl = estimate(ts.params, train_ids, args.eval_iters, seed=it + 1)
            vl = estimate(ts.params, val_ids, args.eval_iters, seed=it + 2)
            log(f"step {it}: train loss {tl:.4f}, val loss {vl:.4f}")
        ts, _ = tr.step(ts, next(batches), jax.random.fold_in(rng, it))
    final = {
        "train_loss": estimate(ts.params, train_ids, args.final_eval_iters, seed=10**6),
        "val_loss": estimate(ts.params, val_ids, args.final_eval_iters, seed=10**6 + 1),
    }
    log(
        f"step {args.iters}: train loss {final['train_loss']:.4f}, val loss {final['val_loss']:.4f} "
        f"(mean over {args.final_eval_iters} batches of {args.batch_size} x {config.block_size})"
    )
    return ts.params, final


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    text, source = load_data(args.data)
    config = GPTConfig(
        vocab_size=len(text.vocab),
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        activation=args.activation,
        scan_unroll=args.scan_unroll or 1,
    )
    print(
        f"data: {source}: {len(text.train):,} train / {len(text.val):,} val characters, "
        f"vocabulary {len(text.vocab)}"
    )
    start = time.perf_counter()
    # Jitted: one compilation instead of one per eagerly run op (2.2 s vs 3.3 s).
    params, _ = jax.jit(GPT(config).init)(
        jax.random.key(args.seed), jnp.zeros((1, config.block_size), jnp.int32)
    )
    print(
        f"model: {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, context "
        f"{config.block_size}: {nj.paths.count_params(params) / 1e6:.2f}M params; "
        f"{args.iters} iterations of batch {args.batch_size}, {args.steps_per_call} per call"
    )
    optimizer = nanogpt_adamw(
        params, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, decay_iters=args.iters
    )
    options = nj.ONEDNN_DOTS if args.onednn_dots else None
    params, final = train(
        config, params, optimizer, text.train, text.val, args, compiler_options=options
    )
    wall = time.perf_counter() - start
    print(f"final val loss {final['val_loss']:.4f}; wall time {wall:.1f} s (compilation included)")
    if args.out:
        save_run(args.out, config, params, text.vocab)
        print(f"saved params, config and vocabulary to {args.out}")
    prompt = text.encode("\n") if "\n" in text.vocab else text.train[:1]
    tokens = sample(
        config, params, prompt, args.sample_tokens, jax.random.key(args.seed), top_k=None
    )
    print("-" * 60 + "\n" + text.decode(tokens) + "\n" + "-" * 60)
    return {**final, "wall_s": wall}


if __name__ == "__main__":
    main()
