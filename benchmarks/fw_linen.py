"""Flax linen: ``nn.Module``s with ``@nn.compact``, ``model.apply`` in a ``jax.jit`` step.

Linen's params are a plain pytree, so the step is the same as hand-written JAX's
(donated carry, optax Adam): what differs is ``apply``'s module machinery at trace time.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.fw_jax import count, train_step
from benchmarks.workloads import (
    LEARNING_RATE,
    LN_EPSILON,
    Bench,
    Config,
    carry_bench,
    make_batch,
)

__all__ = ["build", "MLP", "LeNet", "GPT"]


class MLP(nn.Module):
    features: tuple[int, ...]

    @nn.compact
    def __call__(self, x):  # (B, 64) -> (B, 10)
        for f in self.features[1:-1]:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.features[-1])(x)


class LeNet(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):  # (B, 28, 28, 1) -> (B, 10)
        x = nn.avg_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(self.classes)(x)


class Block(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):  # (B, T, C)
        y = nn.LayerNorm(epsilon=LN_EPSILON)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width)(
            y, mask=mask
        )
        y = nn.LayerNorm(epsilon=LN_EPSILON)(x)
        return x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(y)))


class GPT(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, tokens):  # (B, T) -> (B, T, vocab)
        c = self.cfg
        init = nn.initializers.normal(0.02)
        pos = self.param("pos", init, (c.context, c.width))
        x = nn.Embed(c.vocab, c.width, embedding_init=init)(tokens) + pos[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(c.layers):
            x = Block(c.width, c.heads)(x, mask)
        return nn.Dense(c.vocab)(nn.LayerNorm(epsilon=LN_EPSILON)(x))


def _module(workload: str, cfg: Config) -> nn.Module:
    if workload == "tiny-mlp":
        return MLP(cfg.features)
    if workload == "lenet-cnn":
        return LeNet(cfg.classes)
    return GPT(cfg)


def build(workload: str, cfg: Config) -> Bench:
    module = _module(workload, cfg)
    x, y = map(jnp.asarray, make_batch(workload, cfg))
    params = jax.jit(module.init)(jax.random.key(0), x)
    tx = optax.adam(LEARNING_RATE)
    fn = jax.jit(train_step(module.apply, tx), donate_argnums=0)
    carry = (params, tx.init(params))
    return carry_bench(lambda c: fn(c, x, y), carry, count(params))
