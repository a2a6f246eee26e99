"""nanoGPT's model and training loop in PyTorch, for the side-by-side with examples/gpt_shakespeare.py.

A self-contained re-implementation of Karpathy's nanoGPT (``model.py`` and
``train.py``, MIT) restricted to what the README's CPU recipe for
``config/train_shakespeare_char.py`` uses::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
      --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

Same data split (first 90% of the characters train), batches (random windows),
model (pre-LN blocks, exact GELU, tied head, GPT-2 init with scaled residual
projections, ``scaled_dot_product_attention``), optimizer (AdamW, betas 0.9/0.99,
weight decay 0.1 on >= 2-d params, clip 1.0), schedule (100 warmup, cosine to
1e-4 at 2000) and evaluation (``estimate_loss`` every 250 iterations over 20
batches). Then, like the nnjax example, a final estimate over 200 batches, and
the wall time from before the model is built to the end of that estimate (the
nnjax example's span: init and compilation included). Run both on one machine::

    python benchmarks/nanogpt_torch.py
    python examples/gpt_shakespeare.py --recipe nanogpt-cpu
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (nanoGPT's spelling)

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    block_size, batch_size, n_layer, n_head, n_embd = 64, 12, 4, 4, 128
    lr, min_lr, warmup, decay_iters, max_iters = 1e-3, 1e-4, 100, 2000, args.iters
    eval_interval, eval_iters, final_eval_iters = 250, 20, 200
    torch.manual_seed(1337)

    text = pathlib.Path(args.data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], np.int64)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block_size]) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size]) for i in ix])
        return x, y

    start = time.perf_counter()  # as examples/gpt_shakespeare.py: model creation included
    model = GPT(len(chars), block_size, n_layer, n_head, n_embd)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.99),
    )

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        ratio = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_loss(k):
        model.eval()
        out = {
            s: float(torch.stack([model(*get_batch(s)) for _ in range(k)]).mean()) for s in splits
        }
        model.train()
        return out

    for it in range(max_iters):
        if it % eval_interval == 0:
            losses = estimate_loss(eval_iters)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        for group in opt.param_groups:
            group["lr"] = get_lr(it)
        loss = model(*get_batch("train"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    losses = estimate_loss(final_eval_iters)
    wall = time.perf_counter() - start
    print(
        f"step {max_iters}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
        f"(mean over {final_eval_iters} batches)"
    )
    print(
        f"final val loss {losses['val']:.4f}; wall time {wall:.1f} s (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    return {"val_loss": losses["val"], "wall_s": wall}


if __name__ == "__main__":
    main()
