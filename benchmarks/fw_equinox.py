"""Equinox: ``eqx.Module`` pytrees written for one example, ``jax.vmap`` over the batch,
and an ``eqx.filter_jit`` step (model and optimizer state donated) with optax Adam.
"""

from __future__ import annotations

import equinox as eqx
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


class MLP(eqx.Module):
    layers: list

    def __init__(self, features: tuple[int, ...], key: jax.Array):
        keys = jax.random.split(key, len(features) - 1)
        pairs = zip(features[:-1], features[1:], keys, strict=True)
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in pairs]

    def __call__(self, x):  # (64,) -> (10,)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class LeNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.AvgPool2d
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    fc3: eqx.nn.Linear

    def __init__(self, cfg: Config, key: jax.Array):
        k = jax.random.split(key, 5)
        self.conv1 = eqx.nn.Conv2d(1, 6, 5, padding="SAME", key=k[0])
        self.conv2 = eqx.nn.Conv2d(6, 16, 5, padding="VALID", key=k[1])
        self.pool = eqx.nn.AvgPool2d(2, stride=2)
        self.fc1 = eqx.nn.Linear(lenet_flat_features(cfg), 120, key=k[2])
        self.fc2 = eqx.nn.Linear(120, 84, key=k[3])
        self.fc3 = eqx.nn.Linear(84, cfg.classes, key=k[4])

    def __call__(self, x):  # (1, 28, 28) channels-first -> (10,)
        x = self.pool(jax.nn.relu(self.conv1(x)))
        x = self.pool(jax.nn.relu(self.conv2(x)))
        x = jax.nn.relu(self.fc1(x.reshape(-1)))
        return self.fc3(jax.nn.relu(self.fc2(x)))


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, d: int, heads: int, key: jax.Array):
        k = jax.random.split(key, 3)
        self.ln1 = eqx.nn.LayerNorm(d, eps=LN_EPSILON)
        self.attn = eqx.nn.MultiheadAttention(
            heads,
            d,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=k[0],
        )
        self.ln2 = eqx.nn.LayerNorm(d, eps=LN_EPSILON)
        self.fc1 = eqx.nn.Linear(d, 4 * d, key=k[1])
        self.fc2 = eqx.nn.Linear(4 * d, d, key=k[2])

    def __call__(self, x, mask):  # (T, C)
        y = jax.vmap(self.ln1)(x)
        x = x + self.attn(y, y, y, mask=mask)
        y = jax.vmap(self.ln2)(x)
        return x + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(y)))


class GPT(eqx.Module):
    tok: eqx.nn.Embedding
    pos: jax.Array
    blocks: list
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, cfg: Config, key: jax.Array):
        k = jax.random.split(key, 3 + cfg.layers)
        init = jax.nn.initializers.normal(0.02)
        self.tok = eqx.nn.Embedding(cfg.vocab, cfg.width, weight=init(k[0], (cfg.vocab, cfg.width)))
        self.pos = init(k[1], (cfg.context, cfg.width))
        self.blocks = [Block(cfg.width, cfg.heads, k[3 + i]) for i in range(cfg.layers)]
        self.ln_f = eqx.nn.LayerNorm(cfg.width, eps=LN_EPSILON)
        self.head = eqx.nn.Linear(cfg.width, cfg.vocab, key=k[2])

    def __call__(self, tokens):  # (T,) -> (T, vocab)
        t = tokens.shape[0]
        x = jax.vmap(self.tok)(tokens) + self.pos[:t]
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))
        for block in self.blocks:
            x = block(x, mask)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


def _model(workload: str, cfg: Config) -> eqx.Module:
    cls = {"tiny-mlp": lambda k: MLP(cfg.features, k), "lenet-cnn": lambda k: LeNet(cfg, k)}
    make = cls.get(workload, lambda k: GPT(cfg, k))
    return eqx.filter_jit(make)(jax.random.key(0))  # one compiled init, not op by op


def build(workload: str, cfg: Config) -> Bench:
    model = _model(workload, cfg)
    tx = optax.adam(LEARNING_RATE)
    x, y = make_batch(workload, cfg)
    if workload == "lenet-cnn":
        x = x.transpose(0, 3, 1, 2)  # Equinox convolutions are channels-first
    batch = (jnp.asarray(x), jnp.asarray(y))

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, carry):
        model, opt_state = carry
        x, y = batch

        def loss_fn(model):
            logits = jax.vmap(model)(x)
            return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return (eqx.apply_updates(model, updates), opt_state), loss

    carry = (model, tx.init(eqx.filter(model, eqx.is_array)))
    n_params = count(eqx.filter(model, eqx.is_inexact_array))
    return carry_bench(lambda c: step(batch, c), carry, n_params)
