"""PyTorch eager (and ``torch.compile``): ``nn.Module``s, ``F.cross_entropy``, ``torch.optim.Adam``.

The GPT is written the way nanoGPT writes it: one fused ``(d, 3d)`` q/k/v
projection (same parameter count as four separate ones) and
``F.scaled_dot_product_attention(is_causal=True)``. Adam uses
``foreach=True`` (on CPU the default is the slower per-tensor loop).
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)
from torch import nn

from benchmarks.workloads import (
    LEARNING_RATE,
    LN_EPSILON,
    Bench,
    Config,
    UnavailableError,
    lenet_flat_features,
)
from benchmarks.workloads import make_batch as _make_batch

__all__ = ["build", "model", "MLP", "LeNet", "GPT"]


class MLP(nn.Sequential):
    def __init__(self, features: tuple[int, ...]):
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(features):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers[:-1])


class LeNet(nn.Sequential):
    def __init__(self, cfg: Config):
        super().__init__(
            nn.Conv2d(1, 6, 5, padding="same"),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(lenet_flat_features(cfg), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, cfg.classes),
        )


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, eps=LN_EPSILON)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=LN_EPSILON)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width, eps=LN_EPSILON)
        self.head = nn.Linear(cfg.width, cfg.vocab)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def model(workload: str, cfg: Config) -> nn.Module:
    """The workload's model (inputs: MLP ``(B, 64)``, LeNet ``(B, 1, H, W)``, GPT ``(B, T)``)."""
    torch.manual_seed(0)
    if workload == "tiny-mlp":
        return MLP(cfg.features)
    if workload == "lenet-cnn":
        return LeNet(cfg)
    return GPT(cfg)


def make_batch(workload: str, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared batch as torch tensors (images channels-first, labels int64)."""
    x, y = _make_batch(workload, cfg)
    if workload == "lenet-cnn":
        x = x.transpose(0, 3, 1, 2).copy()
    x = torch.from_numpy(x)
    return (x.long() if workload == "gpt-char" else x), torch.from_numpy(y).long()


def build(workload: str, cfg: Config, *, compile: bool = False) -> Bench:
    net = model(workload, cfg)
    n_params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE, foreach=True)
    forward = torch.compile(net) if compile else net
    x, y = make_batch(workload, cfg)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = forward(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    def run(n: int):
        loss = None
        for _ in range(n):
            loss = step()
        return loss

    if not compile:
        return Bench(run, n_params)
    t0 = time.perf_counter()
    try:
        run(1)  # the first call compiles; any failure (no C++ compiler, ...) is a skip
    except Exception as err:
        raise UnavailableError(f"torch.compile failed: {type(err).__name__}: {err}") from err
    first = time.perf_counter() - t0
    return Bench(run, n_params, 1, "torch.compile(model), Adam eager", first_call_s=first)
