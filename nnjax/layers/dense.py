"""Dense: a linear map on the last axis, with optional adapters beside the kernel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank, get_param, shape_str
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Initializer, Layer
from nnjax.layers.adapters import KERNEL_KEYS, adapted_matmul, kernel_shape
from nnjax.layers.base import add_bias, compute_dtype

__all__ = ["Dense"]


def Dense(
    features: int,
    *,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "dense",
) -> Layer:
    """A linear map on the last axis: ``y = x @ kernel + bias``.

    Args:
        features: output size.
        use_bias: add a bias.
        kernel_init, bias_init: ``jax.nn.initializers`` functions.
        dtype: computation dtype; ``None`` keeps a float input's dtype.
        param_dtype: dtype of the params.

    Input ``(..., in)``, output ``(..., features)``.

    Params:
        kernel: ``(in, features)``.
        bias: ``(features,)`` if ``use_bias``.
        lora_a, lora_b, ia3_scale, dora_magnitude: optional adapters beside the kernel
            (see :mod:`nnjax.layers.adapters`).
        kernel_scale: present when the kernel is stored quantized (int8 or packed NF4,
            see :mod:`nnjax.layers.quantized`); the kernel is dequantized in the matmul.

    Example:
        >>> params, _ = nj.Dense(10).init(key, jnp.zeros((8, 64)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (10,), 'kernel': (64, 10)}
    """
    if features < 1:
        raise ArgumentError(f"Dense: features must be >= 1, got {features}")

    def init(key, x):
        check_rank(x, 1, "(..., in)")
        k_kernel, k_bias = jax.random.split(key)
        params = {"kernel": kernel_init(k_kernel, (np.shape(x)[-1], features), param_dtype)}
        if use_bias:
            params["bias"] = bias_init(k_bias, (features,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_rank(x, 1, "(..., in)")
        check_keys(params, ["kernel", *(["bias"] if use_bias else [])], KERNEL_KEYS)
        k_shape = kernel_shape(params)
        if len(k_shape) != 2 or k_shape[0] != np.shape(x)[-1]:
            raise LayerError(
                f"expected x.shape[-1] == {k_shape[0] if k_shape else '?'} "
                f"(kernel {shape_str(k_shape)}), got x.shape == {shape_str(np.shape(x))}"
            )
        dtype_ = compute_dtype(x, dtype, param_dtype)
        y = adapted_matmul(params, jnp.asarray(x, dtype_), dtype_)
        if use_bias:
            y = add_bias(y, get_param(params, "bias", (features,)))
        return y, state

    return Layer(init, apply, name)
