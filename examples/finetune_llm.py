"""Fine-tune a Hugging Face decoder LLM on instruction data: quantized base, LoRA, PEFT out.

    python examples/finetune_llm.py path/to/Qwen2.5-0.5B --data train.jsonl --bits 4
    python examples/finetune_llm.py                      # a small random Llama, made offline
    python examples/finetune_llm.py --smoke              # tiny and quick (the CI run)

The whole fine-tuning path, step by step:

1. the model: a local HF folder (``config.json``, safetensors, ``tokenizer.json``;
   ``nj.models.hf.from_pretrained`` streams it in), or without one a small random
   Llama written as an HF folder and read back the same way (bytes as tokens);
2. the base quantized (``nj.finetune.quantize``, ``--bits 8`` or ``4``; ``0`` keeps
   float) and LoRA adapters added on every attention and MLP kernel;
3. the data: ``--data`` JSONL of ``{"prompt", "response"}`` or ``{"messages": [...]}``
   records (by default a small file of made-up questions written to a temp folder),
   tokenized with the model's tokenizer and chat template, the loss on the responses
   only, packed into rows (``nj.data.instruct_batches``); ``--eval`` (or one record in
   five) is held out;
4. training with ``nj.fit`` (a progress bar), held-out loss and perplexity before
   and after, and a loss plot (``loss.png`` with matplotlib);
5. the results saved: a PEFT adapter folder (``peft.PeftModel.from_pretrained``
   reads it) and a merged HF folder (``transformers`` reads it), and text generated
   from ``--prompt`` with both.

A step whose nnjax function this installation lacks says so and is skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
from nnjax import finetune

TARGETS = ["blocks/*/attn/*/kernel", "blocks/*/mlp/*/kernel"]


def _has(module, name: str, step: str) -> bool:
    if hasattr(module, name):
        return True
    print(f"  ({step}: skipped, {module.__name__}.{name} is not in this nnjax)")
    return False


def default_records(n: int, seed: int = 0) -> list[dict]:
    """Made-up instruction records: sums asked in words, and a short chat."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.integers(0, 50, 2))
        if i % 4:
            out.append({"prompt": f"What is {a} plus {b}?\n", "response": f"{a} + {b} = {a + b}."})
        else:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Say {a} twice."},
                        {"role": "assistant", "content": f"{a} {a}"},
                    ]
                }
            )
    return out


def random_llama(folder: str, width: int, layers: int, seed: int) -> tuple:
    """A small random Llama (bytes as tokens), written as an HF folder when nnjax can."""
    config = nj.models.CausalLMConfig(
        vocab_size=256,
        hidden_size=width,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=3 * width,
        max_position=512,
        eos_token_id=0,
        pad_token_id=0,
        family="llama",
    )
    params, _ = nj.models.CausalLM(config).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))
    hf = nj.models.hf
    if hasattr(hf, "save_pretrained") and hasattr(hf, "from_pretrained"):
        hf.save_pretrained(folder, config, params)
        config, params = hf.from_pretrained(folder)
        print(f"random Llama written as an HF folder and read back: {folder}")
    return config, params, nj.data.ByteTokenizer()


def load_model(args) -> tuple:
    if args.model is None:
        width, layers = (32, 2) if args.smoke else (128, 4)
        return random_llama(os.path.join(args.out, "base"), width, layers, args.seed)
    hf = nj.models.hf
    if not (_has(hf, "from_pretrained", "load") and _has(hf, "load_tokenizer", "load")):
        raise SystemExit("loading an HF folder needs nj.models.hf.from_pretrained")
    config, params = hf.from_pretrained(args.model)
    print(f"loaded {config.family} from {args.model}")
    return config, params, hf.load_tokenizer(args.model)


def read_data(args, tokenizer):
    if args.data is None:
        path = os.path.join(args.out, "train.jsonl")
        with open(path, "w") as f:
            for r in default_records(60 if args.smoke else 400, args.seed):
                f.write(json.dumps(r) + "\n")
        print(f"no --data: wrote {path}")
        args.data = path
    records = nj.data.read_jsonl(args.data)
    if args.eval:
        train, held = records, nj.data.read_jsonl(args.eval)
    else:
        train = [r for i, r in enumerate(records) if i % 5]
        held = records[::5]
    common = dict(overflow=args.overflow)
    batches = nj.data.instruct_batches(
        train, tokenizer, args.seq_len, args.batch_size, seed=args.seed, epochs=None, **common
    )
    inputs, targets = nj.data.load_instruct(held, tokenizer, args.seq_len, **common)
    held_batches = [
        jax.tree.map(lambda a, i=i: a[i : i + args.batch_size], (inputs, targets))
        for i in range(0, len(targets), args.batch_size)
    ]
    print(
        f"{len(train)} training records ({batches.num_examples} packed rows), {len(held)} held out"
    )
    return batches, held_batches


def held_out(tr, ts, held_batches) -> tuple[float, float]:
    """Mean loss per response token over the held-out rows, and its perplexity."""
    # each batch's loss is a mean over its response tokens: weigh it by their number
    counts = [int((b[1] != nj.data.IGNORE_INDEX).sum()) for b in held_batches]
    losses = [float(tr.evaluate(ts, b)["loss"]) for b in held_batches]
    loss = float(np.average(losses, weights=counts))
    return loss, math.exp(loss)


def generate(config, params, tokenizer, prompt: str, n: int) -> str:
    ids = jnp.asarray([tokenizer.encode(prompt)], jnp.int32)
    out = nj.models.generate(config, params, ids, n, temperature=0.0)
    return tokenizer.decode(np.asarray(out)[0].tolist())


def plot(losses: list[float], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set(xlabel="step", ylabel="training loss (responses only)", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a local HF model folder (default: a random Llama)")
    p.add_argument("--data", help="training JSONL (default: a small made-up file)")
    p.add_argument("--eval", help="held-out JSONL (default: one record in five of --data)")
    p.add_argument("--bits", type=int, default=8, choices=(0, 4, 8), help="base quantization")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--overflow", choices=("truncate", "split"), default="split")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--prompt", default="What is 12 plus 30?\n")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", help="output folder (default: a new temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.max_new_tokens = 30, 4, 64, 8
    args.out = args.out or tempfile.mkdtemp(prefix="finetune_llm_")
    os.makedirs(args.out, exist_ok=True)

    print("[1/5] model")
    config, params, tokenizer = load_model(args)
    print(f"  {nj.core.paths.count_params(params):,} params")

    print("[2/5] quantized base + LoRA")
    if args.bits and _has(finetune, "quantize", "quantize"):
        params = finetune.quantize(params, TARGETS, bits=args.bits)
        print(f"  base kernels stored in {args.bits} bits")
    params, mask = finetune.add_lora(params, jax.random.key(args.seed + 1), TARGETS, rank=args.rank)
    print(f"  LoRA r={args.rank}: {finetune.trainable_count(params, mask):,} trainable params")

    print("[3/5] data")
    batches, held_batches = read_data(args, tokenizer)

    print("[4/5] fine-tune")
    model = nj.models.CausalLM(config)
    loss = functools.partial(nj.losses.softmax_cross_entropy, ignore_index=nj.data.IGNORE_INDEX)
    tr = nj.trainer(model, loss, optax.adamw(args.lr, weight_decay=0.0), trainable=mask)
    ts = tr.init(params)
    before = held_out(tr, ts, held_batches)
    ts, history = nj.fit(tr, ts, batches, steps=args.steps, log_every=max(1, args.steps // 20))
    after = held_out(tr, ts, held_batches)
    print(f"held-out loss: before {before[0]:.3f}, after {after[0]:.3f}")
    print(f"held-out perplexity: before {before[1]:.2f}, after {after[1]:.2f}")
    if plot(history["loss"], os.path.join(args.out, "loss.png")):
        print(f"  loss plot: {os.path.join(args.out, 'loss.png')}")

    print("[5/5] save and generate")
    hf = nj.models.hf
    adapter_dir, merged_dir = os.path.join(args.out, "adapter"), os.path.join(args.out, "merged")
    if _has(hf, "save_peft_adapter", "PEFT adapter"):
        hf.save_peft_adapter(adapter_dir, config, ts.params)
        print(f"  PEFT adapter: {adapter_dir}")
    else:
        size = finetune.save_adapters(adapter_dir + ".safetensors", ts.params, trainable=mask)
        print(f"  nnjax adapter file instead: {adapter_dir}.safetensors ({size:,} bytes)")
    merged = None
    if _has(hf, "save_pretrained", "merged HF folder"):
        hf.save_pretrained(merged_dir, config, ts.params, merge_adapters=True)
        print(f"  merged HF folder: {merged_dir}")
        merged = hf.from_pretrained(merged_dir)[1]
    print(f"  prompt: {args.prompt!r}")
    text = generate(config, ts.params, tokenizer, args.prompt, args.max_new_tokens)
    print(f"  with the adapters: {text!r}")
    if merged is not None:
        text = generate(config, merged, tokenizer, args.prompt, args.max_new_tokens)
        print(f"  merged folder:     {text!r}")


if __name__ == "__main__":
    main()
