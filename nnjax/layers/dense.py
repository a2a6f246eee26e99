"""Dense: a linear map on the last axis, with optional adapters beside the kernel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank, get_param, shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import LayerError
from nnjax.layers.base import compute_dtype

__all__ = ["Dense", "ADAPTER_KEYS", "adapted_matmul"]

Initializer = Any

ADAPTER_KEYS = ("lora_a", "lora_b", "ia3_scale", "dora_magnitude")
"""Leaves a Dense (or an attention projection) uses when it finds them beside its kernel.

- ``lora_a (in, r)``, ``lora_b (r, out)``: ``y = x @ kernel + (x @ lora_a) @ lora_b``.
  The LoRA scale ``alpha / r`` is folded into ``lora_a`` when it is created.
- ``ia3_scale (out,)``: the output is scaled by it (IA3).
- ``dora_magnitude (out,)``: DoRA, ``W' = kernel + lora_a @ lora_b`` is normalised
  column-wise and scaled by the magnitude.
"""


def adapted_matmul(params: dict[str, Any], x: jax.Array, dtype: Any) -> jax.Array:
    """``x @ kernel`` (``kernel (in, out)``), plus whatever adapters sit beside the kernel."""
    lead = x.shape[:-1]
    x = jnp.reshape(x, (-1, x.shape[-1])) if x.ndim > 2 else x  # see nnjax.layers.base.matmul_last
    kernel = params["kernel"].astype(dtype)
    has_lora = "lora_a" in params
    if "dora_magnitude" in params:
        w = kernel
        if has_lora:
            w = w + params["lora_a"].astype(dtype) @ params["lora_b"].astype(dtype)
        norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0)).astype(dtype)
        y = x @ (w * (params["dora_magnitude"].astype(dtype) / norm))
    else:
        y = x @ kernel
        if has_lora:
            # (x @ A) @ B never forms the full-size weight gradient of kernel.
            y = y + (x @ params["lora_a"].astype(dtype)) @ params["lora_b"].astype(dtype)
    if "ia3_scale" in params:
        y = y * params["ia3_scale"].astype(dtype)
    return jnp.reshape(y, (*lead, y.shape[-1]))


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
        lora_a, lora_b, ia3_scale, dora_magnitude: optional adapters (see ``ADAPTER_KEYS``).

    Example:
        >>> params, _ = nj.Dense(10).init(key, jnp.zeros((8, 64)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (10,), 'kernel': (64, 10)}
    """
    if features < 1:
        raise ValueError(f"Dense: features must be >= 1, got {features}")

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
        check_keys(params, ["kernel", *(["bias"] if use_bias else [])], ADAPTER_KEYS)
        kernel = params["kernel"]
        if np.ndim(kernel) != 2 or np.shape(kernel)[0] != np.shape(x)[-1]:
            raise LayerError(
                f"expected x.shape[-1] == {np.shape(kernel)[0] if np.ndim(kernel) else '?'} "
                f"(kernel {shape_str(np.shape(kernel))}), got x.shape == {shape_str(np.shape(x))}"
            )
        dtype_ = compute_dtype(x, dtype, param_dtype)
        y = adapted_matmul(params, jnp.asarray(x, dtype_), dtype_)
        if use_bias:
            y = y + get_param(params, "bias", (features,)).astype(dtype_)
        return y, state

    return Layer(init, apply, name)
