"""Hand-written JAX: dict params, plain functions, ``jax.jit`` with the carry donated.

This is the zero-overhead limit every other JAX library is measured against:
one XLA computation per step (forward, loss, gradient, optax Adam), nothing
else. The fused variant runs ``k`` steps in one call with ``jax.lax.scan``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.workloads import (
    LEARNING_RATE,
    LN_EPSILON,
    Bench,
    Config,
    carry_bench,
    lenet_flat_features,
    make_batch,
    make_batches,
)

__all__ = ["build", "model", "train_step", "fused_train_step", "count", "causal_attention"]

Params = dict[str, Any]


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(tree)))


def _dense_init(key: jax.Array, n_in: int, n_out: int, std: float | None = None) -> Params:
    std = 1.0 / np.sqrt(n_in) if std is None else std
    return {
        "kernel": std * jax.random.normal(key, (n_in, n_out), jnp.float32),
        "bias": jnp.zeros((n_out,), jnp.float32),
    }


def _dense(p: Params, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _ln_init(d: int) -> Params:
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def _layer_norm(p: Params, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPSILON) * p["scale"] + p["bias"]


def _mlp(cfg: Config) -> tuple[Callable, Callable]:
    sizes = cfg.features

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return {
            f"dense_{i}": _dense_init(k, a, b)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
        }

    def apply(params, x):  # (B, 64) -> (B, 10)
        n = len(sizes) - 1
        for i in range(n):
            x = _dense(params[f"dense_{i}"], x)
            if i < n - 1:
                x = jax.nn.relu(x)
        return x

    return init, apply


def _conv(p: Params, x: jax.Array, padding: str) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]


def _avg_pool(x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, H/2, W/2, C)
    window = (1, 2, 2, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / 4.0


def _lenet(cfg: Config) -> tuple[Callable, Callable]:
    def init(key):
        k = jax.random.split(key, 5)
        conv = lambda key, cin, cout: {
            "kernel": jax.random.normal(key, (5, 5, cin, cout)) / np.sqrt(25 * cin),
            "bias": jnp.zeros((cout,)),
        }
        return {
            "conv_0": conv(k[0], 1, 6),
            "conv_1": conv(k[1], 6, 16),
            "dense_0": _dense_init(k[2], lenet_flat_features(cfg), 120),
            "dense_1": _dense_init(k[3], 120, 84),
            "dense_2": _dense_init(k[4], 84, cfg.classes),
        }

    def apply(params, x):  # (B, 28, 28, 1) -> (B, 10)
        x = _avg_pool(jax.nn.relu(_conv(params["conv_0"], x, "SAME")))
        x = _avg_pool(jax.nn.relu(_conv(params["conv_1"], x, "VALID")))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(_dense(params["dense_0"], x))
        x = jax.nn.relu(_dense(params["dense_1"], x))
        return _dense(params["dense_2"], x)

    return init, apply


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention. q, k, v ``(B, T, H, hd)`` -> ``(B, T, H, hd)``."""
    t, hd = q.shape[1], q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _gpt(cfg: Config) -> tuple[Callable, Callable]:
    d, h = cfg.width, cfg.heads

    def init(key):
        keys = iter(jax.random.split(key, 3 + 6 * cfg.layers))
        params = {
            "tok": 0.02 * jax.random.normal(next(keys), (cfg.vocab, d)),
            "pos": 0.02 * jax.random.normal(next(keys), (cfg.context, d)),
        }
        for i in range(cfg.layers):
            params[f"block_{i}"] = {
                "ln1": _ln_init(d),
                **{n: _dense_init(next(keys), d, d, 0.02) for n in ("query", "key", "value")},
                "out": _dense_init(next(keys), d, d, 0.02),
                "ln2": _ln_init(d),
                "fc1": _dense_init(next(keys), d, 4 * d, 0.02),
                "fc2": _dense_init(next(keys), 4 * d, d, 0.02),
            }
        params["ln_f"] = _ln_init(d)
        params["head"] = _dense_init(next(keys), d, cfg.vocab, 0.02)
        return params

    def apply(params, tokens):  # (B, T) int -> (B, T, vocab)
        b, t = tokens.shape
        x = params["tok"][tokens] + params["pos"][:t]  # (B, T, C)
        for i in range(cfg.layers):
            p = params[f"block_{i}"]
            y = _layer_norm(p["ln1"], x)
            q, k, v = (_dense(p[n], y).reshape(b, t, h, d // h) for n in ("query", "key", "value"))
            x = x + _dense(p["out"], causal_attention(q, k, v).reshape(b, t, d))
            y = _layer_norm(p["ln2"], x)
            x = x + _dense(p["fc2"], jax.nn.gelu(_dense(p["fc1"], y)))
        return _dense(params["head"], _layer_norm(params["ln_f"], x))

    return init, apply


def model(workload: str, cfg: Config) -> tuple[Callable, Callable]:
    """``(init(key) -> params, apply(params, x) -> logits)`` for ``workload``."""
    return {"tiny-mlp": _mlp, "lenet-cnn": _lenet, "gpt-char": _gpt}[workload](cfg)


def train_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
    """``step((params, opt_state), x, y) -> ((params, opt_state), loss)``, not jitted."""

    def loss_fn(params, x, y):
        logits = apply(params, x)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, x, y):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def fused_train_step(step: Callable) -> Callable:
    """``k`` steps in one call: ``fused(carry, xs (k, ...), ys (k, ...)) -> (carry, last loss)``."""

    def fused(carry, xs, ys):
        carry, losses = jax.lax.scan(lambda c, b: step(c, *b), carry, (xs, ys))
        return carry, losses[-1]

    return fused


def build(workload: str, cfg: Config, *, fused: int = 0) -> Bench:
    init, apply = model(workload, cfg)
    params = jax.jit(init)(jax.random.key(0))
    tx = optax.adam(LEARNING_RATE)
    step = train_step(apply, tx)
    if fused:
        fn = jax.jit(fused_train_step(step), donate_argnums=0)
        x, y = map(jnp.asarray, make_batches(workload, cfg, fused))
    else:
        fn = jax.jit(step, donate_argnums=0)
        x, y = map(jnp.asarray, make_batch(workload, cfg))
    carry = (params, tx.init(params))
    return carry_bench(lambda c: fn(c, x, y), carry, count(params), max(fused, 1))
