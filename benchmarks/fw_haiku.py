"""Haiku: functions of ``hk`` modules, ``hk.transform``-ed into ``(init, apply)``, in a
``jax.jit`` step with the carry donated, as in hand-written JAX.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from benchmarks.fw_jax import count, train_step
from benchmarks.workloads import LEARNING_RATE, LN_EPSILON, Bench, Config, carry_bench, make_batch

__all__ = ["build", "forward"]


def _mlp(cfg: Config):
    def f(x):  # (B, 64) -> (B, 10)
        for width in cfg.features[1:-1]:
            x = jax.nn.relu(hk.Linear(width)(x))
        return hk.Linear(cfg.features[-1])(x)

    return f


def _lenet(cfg: Config):
    def f(x):  # (B, 28, 28, 1) -> (B, 10)
        x = jax.nn.relu(hk.Conv2D(6, 5, padding="SAME")(x))
        x = hk.avg_pool(x, window_shape=2, strides=2, padding="VALID")
        x = jax.nn.relu(hk.Conv2D(16, 5, padding="VALID")(x))
        x = hk.avg_pool(x, window_shape=2, strides=2, padding="VALID")
        x = hk.Flatten()(x)
        x = jax.nn.relu(hk.Linear(120)(x))
        x = jax.nn.relu(hk.Linear(84)(x))
        return hk.Linear(cfg.classes)(x)

    return f


def _layer_norm():
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=LN_EPSILON)


def _gpt(cfg: Config):
    d, h = cfg.width, cfg.heads
    init = hk.initializers.RandomNormal(0.02)

    def f(tokens):  # (B, T) -> (B, T, vocab)
        t = tokens.shape[1]
        pos = hk.get_parameter("pos", (cfg.context, d), init=init)
        x = hk.Embed(cfg.vocab, d, w_init=init)(tokens) + pos[:t]
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # (1, 1, T, T)
        for _ in range(cfg.layers):
            y = _layer_norm()(x)
            attn = hk.MultiHeadAttention(
                h, key_size=d // h, model_size=d, w_init=hk.initializers.VarianceScaling(1.0)
            )
            x = x + attn(y, y, y, mask=mask)
            y = _layer_norm()(x)
            x = x + hk.Linear(d)(jax.nn.gelu(hk.Linear(4 * d)(y)))
        return hk.Linear(cfg.vocab)(_layer_norm()(x))

    return f


def forward(workload: str, cfg: Config) -> hk.Transformed:
    """The workload's model as ``hk.without_apply_rng(hk.transform(f))``."""
    f = {"tiny-mlp": _mlp, "lenet-cnn": _lenet, "gpt-char": _gpt}[workload](cfg)
    return hk.without_apply_rng(hk.transform(f))


def build(workload: str, cfg: Config) -> Bench:
    model = forward(workload, cfg)
    x, y = map(jnp.asarray, make_batch(workload, cfg))
    params = jax.jit(model.init)(jax.random.key(0), x)
    tx = optax.adam(LEARNING_RATE)
    fn = jax.jit(train_step(model.apply, tx), donate_argnums=0)
    carry = (params, tx.init(params))
    return carry_bench(lambda c: fn(c, x, y), carry, count(params))
