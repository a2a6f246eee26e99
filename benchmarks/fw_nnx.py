"""Flax NNX: mutable ``nnx.Module``s and ``nnx.Optimizer``, two ways to jit the step.

- ``style="jit"``: the idiomatic ``@nnx.jit`` step that updates model and optimizer
  in place (NNX walks and updates the object graph on every call).
- ``style="split"``: ``nnx.split`` once, a plain ``jax.jit`` step over the state
  pytree that merges, steps and splits inside the trace, with the state donated
  (the way the NNX docs recommend for speed).
"""

from __future__ import annotations

import itertools

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from benchmarks.fw_jax import count
from benchmarks.workloads import (
    LEARNING_RATE,
    LN_EPSILON,
    Bench,
    Config,
    carry_bench,
    lenet_flat_features,
    make_batch,
)

__all__ = ["build", "MLP", "LeNet", "GPT"]


class MLP(nnx.Module):
    def __init__(self, features: tuple[int, ...], rngs: nnx.Rngs):
        pairs = itertools.pairwise(features)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])

    def __call__(self, x):  # (B, 64) -> (B, 10)
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class LeNet(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 6, (5, 5), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(lenet_flat_features(cfg), 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, cfg.classes, rngs=rngs)

    def __call__(self, x):  # (B, 28, 28, 1) -> (B, 10)
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, epsilon=LN_EPSILON, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, d, d, decode=False, keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=LN_EPSILON, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):  # (B, T, C)
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.tok = nnx.Embed(cfg.vocab, cfg.width, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (cfg.context, cfg.width)))
        self.blocks = nnx.List([Block(cfg.width, cfg.heads, rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.width, epsilon=LN_EPSILON, rngs=rngs)
        self.head = nnx.Linear(cfg.width, cfg.vocab, rngs=rngs)

    def __call__(self, tokens):  # (B, T) -> (B, T, vocab)
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def _model(workload: str, cfg: Config) -> nnx.Module:
    rngs = nnx.Rngs(0)
    if workload == "tiny-mlp":
        return MLP(cfg.features, rngs)
    if workload == "lenet-cnn":
        return LeNet(cfg, rngs)
    return GPT(cfg, rngs)


def _train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def build(workload: str, cfg: Config, *, style: str = "jit") -> Bench:
    model = _model(workload, cfg)
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    n_params = count(nnx.state(model, nnx.Param))
    x, y = map(jnp.asarray, make_batch(workload, cfg))
    if style == "jit":
        step = nnx.jit(_train_step)

        def run(n: int):
            loss = None
            for _ in range(n):
                loss = step(model, optimizer, x, y)
            return loss.block_until_ready()

        return Bench(run, n_params)

    graphdef, state = nnx.split((model, optimizer))

    def split_step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = _train_step(model, optimizer, x, y)
        return nnx.state((model, optimizer)), loss

    fn = jax.jit(split_step, donate_argnums=0)
    return carry_bench(lambda s: fn(s, x, y), state, n_params)
