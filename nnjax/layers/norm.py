"""Normalisation layers: LayerNorm (more come with the norms family)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core import Layer
from nnjax.layers.base import check_float, check_keys, check_rank, compute_dtype, get_param

__all__ = ["LayerNorm"]

Initializer = Any


def LayerNorm(
    *,
    epsilon: float = 1e-5,
    use_bias: bool = True,
    use_scale: bool = True,
    scale_init: Initializer = jax.nn.initializers.ones,
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "layernorm",
) -> Layer:
    """Normalise the last axis to zero mean and unit variance, then scale and shift.

    Statistics are computed in float32 whatever the input dtype (bf16 variance
    loses too much), and the result is cast back. Input and output ``(..., d)``.

    Params:
        scale: ``(d,)`` if ``use_scale``.
        bias: ``(d,)`` if ``use_bias``.
    """
    keys = [*(["scale"] if use_scale else []), *(["bias"] if use_bias else [])]

    def init(key, x):
        check_rank(x, 1, "(..., features)")
        d = np.shape(x)[-1]
        k_scale, k_bias = jax.random.split(key)
        params = {}
        if use_scale:
            params["scale"] = scale_init(k_scale, (d,), param_dtype)
        if use_bias:
            params["bias"] = bias_init(k_bias, (d,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_rank(x, 1, "(..., features)")
        check_float(x)
        check_keys(params, keys)
        d = np.shape(x)[-1]
        dtype_ = compute_dtype(x, dtype, param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
        if use_scale:
            y = y * get_param(params, "scale", (d,)).astype(jnp.float32)
        if use_bias:
            y = y + get_param(params, "bias", (d,)).astype(jnp.float32)
        return y.astype(dtype_), state

    return Layer(init, apply, name)
