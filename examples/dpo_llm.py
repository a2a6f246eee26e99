"""Preference-tune a decoder LLM with DPO and LoRA: SFT first, then DPO, a PEFT adapter out.

    python examples/dpo_llm.py path/to/Qwen2.5-0.5B-Instruct --data prefs.jsonl
    python examples/dpo_llm.py                 # a small random Llama, made offline
    python examples/dpo_llm.py --smoke         # tiny and quick (the CI run)

1. the model: a local HF folder (``nj.models.hf.from_pretrained`` and its tokenizer),
   or a small random Llama (bytes as tokens) taught the task by a short SFT on the
   chosen answers (``nj.data.instruct_batches``), as a DPO run starts from an SFT model;
2. the data: ``--data`` JSONL of ``{"prompt", "chosen", "rejected"}`` (or the chat
   form), by default made-up sums whose rejected answer is off by one; one pair in
   five is held out (``nj.data.preference_batches``);
3. LoRA adapters on every attention and MLP kernel, and DPO with
   ``nj.post.preference_trainer``: the reference is the same params with the adapters
   off, so nothing is copied;
4. held-out reward accuracy and margin before and after, and the adapter saved as a
   PEFT folder (``peft.PeftModel.from_pretrained`` reads it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj

TARGETS = ["blocks/*/attn/*/kernel", "blocks/*/mlp/*/kernel"]


def default_records(n: int, seed: int = 0) -> list[dict]:
    """Made-up preference pairs: a sum, the right answer chosen and an off-by-one rejected."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, 20, 2))
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
    return out


def load_model(args):
    if args.model is not None:
        config, params = nj.models.hf.from_pretrained(args.model)
        return config, params, nj.models.hf.load_tokenizer(args.model), False
    width, layers = (32, 1) if args.smoke else (96, 2)
    config = nj.models.CausalLMConfig(
        vocab_size=256, hidden_size=width, num_layers=layers, num_heads=4, num_kv_heads=2,
        mlp_hidden=3 * width, max_position=128, eos_token_id=0, pad_token_id=0, family="llama",
    )  # fmt: skip
    params, _ = nj.models.CausalLM(config).init(
        jax.random.key(args.seed), jnp.zeros((1, 1), jnp.int32)
    )
    return config, params, nj.data.ByteTokenizer(), True


def sft(config, params, tokenizer, records, args):
    """A short SFT on the chosen answers (a random model has nothing to prefer yet)."""
    sft_records = [{"prompt": r["prompt"], "response": r["chosen"]} for r in records]
    batches = nj.data.instruct_batches(
        sft_records, tokenizer, args.seq_len, 16, seed=args.seed, epochs=None
    )
    loss = functools.partial(nj.losses.softmax_cross_entropy, ignore_index=nj.data.IGNORE_INDEX)
    tr = nj.trainer(nj.models.CausalLM(config), loss, optax.adam(3e-3))
    ts, history = nj.fit(tr, tr.init(params), batches, steps=args.sft_steps, progress=False)
    print(f"  SFT loss: {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f}")
    return ts.params


def held_out(tr, ts, held) -> dict[str, float]:
    m = tr.evaluate(ts, held)
    return {k: float(m[k]) for k in ("loss", "rewards/accuracies", "rewards/margins")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a local HF model folder (default: a random Llama)")
    p.add_argument("--data", help="preference JSONL (default: made-up sums)")
    p.add_argument("--loss", default="dpo", choices=sorted(nj.post.PREFERENCE_LOSSES))
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps (random model only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--out", help="output folder (default: a new temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.sft_steps, args.batch_size = 6, 20, 4
    args.out = args.out or tempfile.mkdtemp(prefix="dpo_llm_")
    os.makedirs(args.out, exist_ok=True)

    print("[1/4] model")
    config, params, tokenizer, random = load_model(args)
    if args.data is None:
        args.data = os.path.join(args.out, "prefs.jsonl")
        with open(args.data, "w") as f:
            for r in default_records(40 if args.smoke else 400, args.seed):
                f.write(json.dumps(r) + "\n")
        print(f"  no --data: wrote {args.data}")
    records = nj.data.read_records(args.data)
    train, held = [r for i, r in enumerate(records) if i % 5], records[::5]
    if random:
        params = sft(config, params, tokenizer, train, args)

    print("[2/4] data")
    batches = nj.data.preference_batches(
        train, tokenizer, args.seq_len, args.batch_size, seed=args.seed, epochs=None
    )
    d = nj.data.load_preference(held, tokenizer, args.seq_len)
    print(f"  {len(train)} training pairs, {len(d.targets)} held out")

    print(f"[3/4] {args.loss.upper()} with LoRA r={args.rank}")
    params, mask = nj.finetune.add_lora(
        params, jax.random.key(args.seed + 1), TARGETS, rank=args.rank
    )
    reference = "adapters" if nj.post.PREFERENCE_LOSSES[args.loss].reference else None
    tr = nj.post.preference_trainer(
        nj.models.CausalLM(config),
        optax.adam(args.lr),
        loss=args.loss,
        reference=reference,
        trainable=mask,
        loss_options={"beta": args.beta},
    )
    ts = tr.init(params)
    before = held_out(tr, ts, (d.inputs, d.targets))
    ts, _ = nj.fit(tr, ts, batches, steps=args.steps, log_every=max(1, args.steps // 5))
    after = held_out(tr, ts, (d.inputs, d.targets))
    for k in before:
        print(f"held-out {k}: before {before[k]:.3f}, after {after[k]:.3f}")

    print("[4/4] save")
    adapter_dir = os.path.join(args.out, "adapter")
    nj.models.hf.save_peft_adapter(adapter_dir, config, ts.params)
    print(f"  PEFT adapter: {adapter_dir}")


if __name__ == "__main__":
    main()
