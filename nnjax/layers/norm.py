"""Normalisation layers: LayerNorm, RMSNorm, BatchNorm, GroupNorm.

Every norm computes its statistics in float32 (float64 for a float64 input):
a bfloat16 variance loses too much. The result is cast to the compute dtype
(``dtype``, else the input's own float dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_float, check_keys, check_rank, get_param, shape_str
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Initializer, Layer
from nnjax.layers.base import compute_dtype

__all__ = ["LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm"]


# --- shared pieces -------------------------------------------------------------------


def _stat_dtype(x: Any) -> Any:
    """float32 for float32/bf16/f16 input, float64 for float64 input."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _affine_keys(use_scale: bool, use_bias: bool) -> list[str]:
    return [*(["scale"] if use_scale else []), *(["bias"] if use_bias else [])]


def _affine_init(key, d, use_scale, use_bias, scale_init, bias_init, param_dtype):
    """``{"scale": (d,), "bias": (d,)}``, each only if used."""
    k_scale, k_bias = jax.random.split(key)
    params = {}
    if use_scale:
        params["scale"] = scale_init(k_scale, (d,), param_dtype)
    if use_bias:
        params["bias"] = bias_init(k_bias, (d,), param_dtype)
    return params


def _affine(y, params, d, use_scale, use_bias, bshape):
    """``y * scale + bias``; the ``(d,)`` params reshaped to ``bshape`` to broadcast."""
    if use_scale:
        scale = get_param(params, "scale", (d,)).astype(y.dtype).reshape(bshape)
        y = y * jax.lax.broadcast_to_rank(scale, y.ndim)
    if use_bias:
        bias = get_param(params, "bias", (d,)).astype(y.dtype).reshape(bshape)
        y = y + jax.lax.broadcast_to_rank(bias, y.ndim)
    return y


def _moments(x, axes):
    """Mean and biased variance over ``axes`` (two-pass: no ``E[x^2] - E[x]^2`` cancellation)."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return mean, var


# --- LayerNorm / RMSNorm -------------------------------------------------------------


def _last_axis_norm(
    normalize: Callable[[jax.Array], jax.Array],
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer | None,
    dtype: Any,
    param_dtype: Any,
    name: str,
) -> Layer:
    """A norm over the last axis: ``normalize(x)`` in float32, then scale and shift."""
    keys = _affine_keys(use_scale, use_bias)

    def init(key, x):
        check_rank(x, 1, "(..., features)")
        d = np.shape(x)[-1]
        return _affine_init(key, d, use_scale, use_bias, scale_init, bias_init, param_dtype), {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_rank(x, 1, "(..., features)")
        check_float(x)
        check_keys(params, keys)
        d = np.shape(x)[-1]
        dtype_ = compute_dtype(x, dtype, param_dtype)
        y = _affine(normalize(x.astype(_stat_dtype(x))), params, d, use_scale, use_bias, (d,))
        return y.astype(dtype_), state

    return Layer(init, apply, name)


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

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` over the last axis
    (biased variance, as ``torch.nn.LayerNorm``). Statistics are computed in
    float32 whatever the input dtype, and the result is cast back.
    Input and output ``(..., d)``.

    Params:
        scale: ``(d,)`` if ``use_scale``.
        bias: ``(d,)`` if ``use_bias``.

    Example:
        >>> params, _ = nj.LayerNorm().init(key, jnp.zeros((8, 64)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (64,), 'scale': (64,)}
    """

    def normalize(x):
        mean, var = _moments(x, -1)
        return (x - mean) * jax.lax.rsqrt(var + epsilon)

    return _last_axis_norm(
        normalize, use_scale, use_bias, scale_init, bias_init, dtype, param_dtype, name
    )


def RMSNorm(
    *,
    epsilon: float = 1e-6,
    use_scale: bool = True,
    scale_init: Initializer = jax.nn.initializers.ones,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "rmsnorm",
) -> Layer:
    """Root-mean-square norm on the last axis: ``y = x / sqrt(mean(x^2) + epsilon) * scale``.

    No mean is subtracted and there is no bias (Zhang & Sennrich 2019; LLaMA's
    norm; ``torch.nn.RMSNorm``). Statistics in float32, result cast back.
    Input and output ``(..., d)``.

    Params:
        scale: ``(d,)`` if ``use_scale``.

    Example:
        >>> params, _ = nj.RMSNorm().init(key, jnp.zeros((8, 64)))
        >>> jax.tree.map(jnp.shape, params)
        {'scale': (64,)}
    """

    def normalize(x):
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon)

    return _last_axis_norm(normalize, use_scale, False, scale_init, None, dtype, param_dtype, name)


# --- BatchNorm -----------------------------------------------------------------------


def BatchNorm(
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    use_bias: bool = True,
    use_scale: bool = True,
    axis: int = -1,
    scale_init: Initializer = jax.nn.initializers.ones,
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "batchnorm",
) -> Layer:
    """Batch normalisation over every axis but the feature ``axis``, with running statistics.

    ``train=True`` normalises with the batch's mean and biased variance over all
    axes except ``axis``, and returns updated running statistics::

        mean <- momentum * mean + (1 - momentum) * batch_mean
        var  <- momentum * var  + (1 - momentum) * batch_var * n / (n - 1)

    ``momentum`` is the Flax convention (the weight of the old value; PyTorch's
    ``momentum`` is ``1 - momentum``). The running variance takes the *unbiased*
    batch variance (``n`` values per feature), as the BatchNorm paper and
    ``torch.nn.BatchNorm*d`` do (Flax uses the biased one), so running stats match
    PyTorch's exactly. The running stats carry no gradient.

    ``train=False`` normalises with the running statistics; the state is unchanged.

    On a sharded batch under ``jax.jit`` the batch statistics are global
    (XLA inserts the reductions), no ``axis_name`` is needed.

    Args:
        momentum: weight of the old running value in the update.
        epsilon: added to the variance.
        use_bias, use_scale: learn a shift / a scale per feature.
        axis: the feature axis (``-1`` for channels-last NHWC, ``1`` for NCHW).
        scale_init, bias_init: ``jax.nn.initializers`` functions.
        dtype: computation (output) dtype; ``None`` keeps a float input's dtype.
        param_dtype: dtype of ``scale`` and ``bias``. The running stats are float32.

    Input and output ``(..., C, ...)`` with ``C = x.shape[axis]``.

    Params:
        scale: ``(C,)`` if ``use_scale``.
        bias: ``(C,)`` if ``use_bias``.

    State:
        mean: ``(C,)`` running mean, initially 0.
        var: ``(C,)`` running variance, initially 1.

    Raises:
        LayerError: ``axis`` out of range, missing state, or ``train=True`` with one
            value per feature (the unbiased variance needs two).

    Example:
        >>> params, state = nj.BatchNorm().init(key, jnp.zeros((8, 32, 32, 16)))
        >>> jax.tree.map(jnp.shape, (params, state))
        ({'bias': (16,), 'scale': (16,)}, {'mean': (16,), 'var': (16,)})
    """
    if not 0.0 <= momentum <= 1.0:
        raise ArgumentError(f"BatchNorm: momentum must be in [0, 1], got {momentum}")
    keys = _affine_keys(use_scale, use_bias)

    def feature_axis(x):
        ndim = np.ndim(x)
        if not -ndim <= axis < ndim or ndim == 0:
            raise LayerError(
                f"expected x with a feature axis {axis}, got x.shape == {shape_str(np.shape(x))}"
            )
        return axis % ndim

    def init(key, x):
        c = np.shape(x)[feature_axis(x)]
        params = _affine_init(key, c, use_scale, use_bias, scale_init, bias_init, param_dtype)
        state = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}
        return params, state

    def apply(params, state, x, *, rng=None, train=False):
        del rng
        ax = feature_axis(x)
        check_float(x)
        check_keys(params, keys)
        check_keys(state, ["mean", "var"], kind="state")
        c = np.shape(x)[ax]
        running_mean = get_param(state, "mean", (c,))
        running_var = get_param(state, "var", (c,))
        dtype_ = compute_dtype(x, dtype, param_dtype)
        sdtype = _stat_dtype(x)
        x32 = x.astype(sdtype)
        bshape = tuple(c if i == ax else 1 for i in range(np.ndim(x)))
        if train:
            reduce_axes = tuple(i for i in range(np.ndim(x)) if i != ax)
            n = int(np.prod([np.shape(x)[i] for i in reduce_axes]))
            if n < 2:
                raise LayerError(
                    "expected more than 1 value per feature in train mode (batch statistics), "
                    f"got x.shape == {shape_str(np.shape(x))} with feature axis {axis}"
                )
            mean, var = _moments(x32, reduce_axes)
            batch_mean = jax.lax.stop_gradient(mean.reshape(c))
            batch_var = jax.lax.stop_gradient(var.reshape(c)) * (n / (n - 1))
            new_state = {
                "mean": (
                    momentum * running_mean.astype(sdtype) + (1 - momentum) * batch_mean
                ).astype(running_mean.dtype),
                "var": (momentum * running_var.astype(sdtype) + (1 - momentum) * batch_var).astype(
                    running_var.dtype
                ),
            }
        else:
            mean = running_mean.astype(sdtype).reshape(bshape)
            var = running_var.astype(sdtype).reshape(bshape)
            new_state = state
        y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
        y = _affine(y, params, c, use_scale, use_bias, bshape)
        return y.astype(dtype_), new_state

    return Layer(init, apply, name)


# --- GroupNorm -----------------------------------------------------------------------


def GroupNorm(
    num_groups: int = 32,
    *,
    epsilon: float = 1e-5,
    use_bias: bool = True,
    use_scale: bool = True,
    scale_init: Initializer = jax.nn.initializers.ones,
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "groupnorm",
) -> Layer:
    """Group normalisation on channels-last input ``(N, ..., C)``.

    The ``C`` channels are split into ``num_groups`` contiguous groups of
    ``C // num_groups`` (as ``torch.nn.GroupNorm``); each example's group is
    normalised over its channels and every axis between the batch axis and the
    channels (biased variance), then each channel is scaled and shifted. The
    first axis is the batch axis. ``num_groups=1`` is a LayerNorm over all
    non-batch axes; ``num_groups=C`` is InstanceNorm. Statistics in float32.

    Params:
        scale: ``(C,)`` if ``use_scale``.
        bias: ``(C,)`` if ``use_bias``.

    Raises:
        LayerError: rank < 2, or ``C`` not divisible by ``num_groups``.

    Example:
        >>> params, _ = nj.GroupNorm(8).init(key, jnp.zeros((2, 16, 16, 64)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (64,), 'scale': (64,)}
    """
    if num_groups < 1:
        raise ArgumentError(f"GroupNorm: num_groups must be >= 1, got {num_groups}")
    keys = _affine_keys(use_scale, use_bias)

    def channels(x):
        check_rank(x, 2, "(N, ..., C)")
        c = np.shape(x)[-1]
        if c % num_groups:
            raise LayerError(
                f"expected the channel count x.shape[-1] divisible by num_groups == {num_groups}, "
                f"got x.shape == {shape_str(np.shape(x))} ({c} channels)"
            )
        return c

    def init(key, x):
        c = channels(x)
        return _affine_init(key, c, use_scale, use_bias, scale_init, bias_init, param_dtype), {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        c = channels(x)
        check_float(x)
        check_keys(params, keys)
        dtype_ = compute_dtype(x, dtype, param_dtype)
        shape = np.shape(x)
        xg = x.astype(_stat_dtype(x)).reshape(*shape[:-1], num_groups, c // num_groups)
        # reduce over the spatial axes and the channels of a group: all but N and G
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)
        mean, var = _moments(xg, axes)
        y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(shape)
        y = _affine(y, params, c, use_scale, use_bias, (c,))
        return y.astype(dtype_), state

    return Layer(init, apply, name)
