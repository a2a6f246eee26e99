"""GRPO on a toy task with a checkable answer: reverse a word, exact match rewarded.

    python examples/grpo_toy.py            # a few minutes on a 2-core CPU
    python examples/grpo_toy.py --smoke    # tiny and quick (the CI run)

1. a small model is first taught the task a little by SFT (``nj.data.instruct_batches``
   on ``"abc=" -> "cba"``), so that some of its samples are right;
2. GRPO (``nj.post.grpo_trainer``) samples a group of answers per prompt
   (``nj.models.make_generate``, one compiled program), scores them with two reward
   functions (exact match, and the share of letters in place), normalises each reward
   within its group, and updates LoRA adapters with the clipped ratio objective and a
   KL penalty to the SFT model (the same params with the adapters off);
3. the exact-match reward on held-out words is measured before and after.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj

LETTERS = "abcde"
EOS = len(LETTERS) + 1  # "=" is len(LETTERS)


class Chars:
    """One token per character: the letters, ``=``, and an end token."""

    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return [(LETTERS + "=").index(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join((LETTERS + "=")[i] for i in ids if i < EOS)


def exact_match(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the completion is the prompt's word reversed."""
    return [float(c == p.rstrip("=")[::-1]) for p, c in zip(prompts, completions, strict=True)]


def letters_in_place(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of the reversed word's letters the completion has in place."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        want = p.rstrip("=")[::-1]
        out.append(sum(a == b for a, b in zip(want, c, strict=False)) / len(want))
    return out


def words(n: int, length: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(LETTERS), length)) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=3, help="letters per word")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.sft_steps, args.grpo_steps, args.group_size, args.prompts = 10, 2, 4, 4
    tok = Chars()
    config = nj.models.CausalLMConfig(
        vocab_size=EOS + 1, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden=64,
        max_position=4 * args.length, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    model = nj.models.CausalLM(config)
    pool = words(400, args.length, args.seed)
    train, held = pool[:300], pool[300:]

    print("[1/3] SFT")
    records = [{"prompt": w + "=", "response": w[::-1]} for w in train]
    batches = nj.data.instruct_batches(records, tok, 2 * args.length + 2, 32, epochs=None)
    loss = functools.partial(nj.losses.softmax_cross_entropy, ignore_index=nj.data.IGNORE_INDEX)
    tr = nj.trainer(model, loss, optax.adam(3e-3))
    params, _ = model.init(jax.random.key(args.seed), jnp.zeros((1, 4), jnp.int32))
    ts, _ = nj.fit(tr, tr.init(params), batches, steps=args.sft_steps, progress=False)

    print("[2/3] GRPO with LoRA")
    params, mask = nj.finetune.add_lora(ts.params, jax.random.key(1), "blocks/*/**/kernel", rank=8)
    g = nj.post.grpo_trainer(
        config,
        optax.adam(args.lr),
        [exact_match, letters_in_place],
        tok,
        group_size=args.group_size,
        max_new_tokens=args.length + 1,
        temperature=1.0,
        beta=args.beta,
        trainable=mask,
    )
    ids_h, len_h = nj.post.encode_prompts([w + "=" for w in held], tok, args.length + 1)

    def held_out(ts) -> float:
        _, m, _ = g.rollout(ts.params, ids_h, len_h, jax.random.key(7))
        return m["rewards/exact_match/mean"]

    ts = g.init(params)
    before = held_out(ts)
    ids, lengths = nj.post.encode_prompts([w + "=" for w in train], tok, args.length + 1)
    for step in range(args.grpo_steps):
        at = (step * args.prompts) % (len(train) - args.prompts)
        batch = (ids[at : at + args.prompts], lengths[at : at + args.prompts])
        ts, m = g.step(ts, batch, jax.random.key(100 + step))
        if step % max(1, args.grpo_steps // 8) == 0 or step == args.grpo_steps - 1:
            print(
                f"  step {step}: reward {m['reward']:.3f}, exact "
                f"{m['rewards/exact_match/mean']:.3f}, kl {float(m['kl']):.4f}, "
                f"clip {float(m['clip_ratio']):.3f}, length {m['completions/mean_length']:.1f}"
            )

    print("[3/3] held out")
    after = held_out(ts)
    print(f"held-out exact match: before {before:.3f}, after {after:.3f}")


if __name__ == "__main__":
    main()
