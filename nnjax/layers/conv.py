"""Convolutions on channels-last input: Conv (1D/2D/3D) and ConvTranspose.

The window helpers here (``spatial_tuple``, ``window_tuple``, ``window_padding``,
``layout``, ``batch_flat``) are shared with ``nnjax.layers.pool``: one normalisation
of sizes, strides and padding for every windowed layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank, get_param, shape_str
from nnjax.core.errors import LayerError
from nnjax.core.layer import Initializer, Layer
from nnjax.layers import im2col
from nnjax.layers.adapters import KERNEL_KEYS, adapted_kernel, kernel_shape
from nnjax.layers.base import compute_dtype

__all__ = ["Conv", "ConvTranspose"]

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]

_AXES = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def spatial_tuple(value: int | Sequence[int], nd: int, what: str, owner: str) -> tuple[int, ...]:
    """``value`` as ``nd`` positive ints: an int is repeated, a sequence must have ``nd``."""
    t = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(t) != nd or not all(isinstance(v, int | np.integer) and v >= 1 for v in t):
        raise ValueError(
            f"{owner}: {what} must be a positive int or {nd} positive ints, got {value!r}"
        )
    return tuple(int(v) for v in t)


def window_tuple(window: int | Sequence[int], what: str, owner: str) -> tuple[int, ...]:
    """A window size: an int is a 1D window, a sequence gives one size per spatial axis."""
    n = 1 if isinstance(window, int) else len(window)
    if n < 1:
        raise ValueError(f"{owner}: {what} must not be empty, got {window!r}")
    return spatial_tuple(window, n, what, owner)


def window_padding(
    padding: Padding, nd: int, owner: str, allowed: Sequence[str] = ("SAME", "VALID")
) -> str | tuple[tuple[int, int], ...]:
    """``padding`` as an upper-case string from ``allowed`` or ``nd`` ``(lo, hi)`` pairs.

    An int ``p`` means ``(p, p)`` on every spatial axis; ``nd`` ints one ``(p, p)`` each.
    """
    if isinstance(padding, str):
        if padding.upper() not in allowed:
            raise ValueError(
                f"{owner}: padding must be one of {list(allowed)} or (lo, hi) pairs, got {padding!r}"
            )
        return padding.upper()
    if isinstance(padding, int):
        padding = (padding,) * nd
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != nd or not all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in pads):
        raise ValueError(
            f"{owner}: padding must be a string, an int or {nd} (lo, hi) int pairs, got {padding!r}"
        )
    return pads


def layout(nd: int) -> str:
    """The input layout for ``nd`` spatial axes, as error messages name it: ``(N, H, W, C)``."""
    return _AXES.get(nd, f"(N, *spatial[{nd}], C)")


def batch_flat(x: jax.Array, nd: int) -> tuple[jax.Array, tuple[int, ...]]:
    """``(*batch, *spatial, C)`` as ``(prod(batch), *spatial, C)``, and ``batch`` to undo it."""
    batch = tuple(np.shape(x)[: -(nd + 1)])
    return jnp.reshape(x, (math.prod(batch), *np.shape(x)[-(nd + 1) :])), batch


def _dimension_numbers(nd: int) -> jax.lax.ConvDimensionNumbers:
    """Channels-last input/output (``NHWC``) and a ``HWIO`` kernel, for ``nd`` spatial axes."""
    io = (0, nd + 1, *range(1, nd + 1))
    return jax.lax.ConvDimensionNumbers(io, (nd + 1, nd, *range(nd)), io)


def _empty_output(window: Sequence[int], padding: Any, x: Any) -> str:
    return (
        f"expected spatial size >= the dilated kernel {tuple(window)} with padding "
        f"{padding!r}, got x.shape == {shape_str(np.shape(x))} (empty output)"
    )


def _check_input(x: Any, nd: int, params: Any, expected: tuple, groups: int) -> None:
    """Rank, kernel shape (``expected`` with None for the input-channel axis) and channels."""
    check_rank(x, nd + 2, layout(nd))
    k = kernel_shape(params)
    if len(k) != nd + 2 or any(e is not None and e != d for e, d in zip(expected, k, strict=True)):
        label = "in/groups" if groups > 1 else "in"
        want = f"({', '.join(label if d is None else str(d) for d in expected)})"
        raise LayerError(f"expected param 'kernel' with shape {want}, got {shape_str(k)}")
    c = np.shape(x)[-1]
    if c != k[nd] * groups:
        grouped = f" with feature_group_count == {groups}" if groups > 1 else ""
        raise LayerError(
            f"expected x.shape[-1] == {k[nd] * groups} (kernel {shape_str(k)}{grouped}), "
            f"got x.shape == {shape_str(np.shape(x))}"
        )


def Conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "conv",
) -> Layer:
    """An N-d convolution (N = ``len(kernel_size)``, usually 1 to 3) on channels-last input.

    Input ``(*batch, *spatial, in)`` with at least one batch axis (``(N, H, W, C)`` for
    2D); output ``(*batch, *out_spatial, features)``. Built on
    ``jax.lax.conv_general_dilated``.

    Args:
        features: output channels; divisible by ``feature_group_count``.
        kernel_size: window size per spatial axis; an int means a 1D convolution.
        strides: int or one per spatial axis.
        padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"`` (wrap-around, then VALID), an int
            ``p`` (``(p, p)`` on every axis), or ``(lo, hi)`` pairs per spatial axis.
        input_dilation: zeros inserted between input elements (transposed-conv style).
        kernel_dilation: atrous dilation of the kernel.
        feature_group_count: split channels into groups (``in`` == groups: depthwise).
        use_bias: add a bias.
        kernel_init, bias_init: ``jax.nn.initializers`` functions.
        dtype: computation dtype; ``None`` keeps a float input's dtype.
        param_dtype: dtype of the params.

    Raises:
        LayerError: input of the wrong rank, channels that do not match the kernel,
            or channels not divisible by ``feature_group_count``.

    Params:
        kernel: ``(*kernel_size, in // feature_group_count, features)``.
        bias: ``(features,)`` if ``use_bias``.
        lora_a, lora_b, ia3_scale, dora_magnitude: optional adapters on the kernel seen as
            a matrix ``(prod(kernel_size) * in // groups, features)`` (LoRA: ``lora_a
            (prod(kernel_size) * in // groups, r)``, ``lora_b (r, features)``; see
            :mod:`nnjax.layers.adapters`), folded into the kernel before the convolution.
        kernel_scale: present when the kernel is stored quantized
            (:mod:`nnjax.layers.quantized`).

    Example:
        >>> params, _ = nj.Conv(16, (3, 3)).init(key, jnp.zeros((2, 8, 8, 3)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (16,), 'kernel': (3, 3, 3, 16)}
    """
    owner = "Conv"
    ks = window_tuple(kernel_size, "kernel_size", owner)
    nd = len(ks)
    strides_ = spatial_tuple(strides, nd, "strides", owner)
    in_dil = spatial_tuple(input_dilation, nd, "input_dilation", owner)
    k_dil = spatial_tuple(kernel_dilation, nd, "kernel_dilation", owner)
    pad = window_padding(padding, nd, owner, ("SAME", "VALID", "CIRCULAR"))
    groups = feature_group_count
    if features < 1 or groups < 1 or features % groups:
        raise ValueError(
            f"Conv: features ({features}) must be a positive multiple of feature_group_count ({groups})"
        )
    dims = _dimension_numbers(nd)
    keys = ["kernel", *(["bias"] if use_bias else [])]
    eff = [(k - 1) * d + 1 for k, d in zip(ks, k_dil, strict=True)]  # dilated kernel size

    def check_groups(x):
        check_rank(x, nd + 2, layout(nd))
        if np.shape(x)[-1] % groups:
            raise LayerError(
                f"expected x.shape[-1] divisible by feature_group_count == {groups}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )

    def init(key, x):
        check_groups(x)
        k_kernel, k_bias = jax.random.split(key)
        params = {
            "kernel": kernel_init(k_kernel, (*ks, np.shape(x)[-1] // groups, features), param_dtype)
        }
        if use_bias:
            params["bias"] = bias_init(k_bias, (features,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_groups(x)
        check_keys(params, keys, KERNEL_KEYS)
        _check_input(x, nd, params, (*ks, None, features), groups)
        dtype_ = compute_dtype(x, dtype, param_dtype)
        kernel = adapted_kernel(params, dtype_)
        x, batch = batch_flat(jnp.asarray(x, dtype_), nd)
        pad_ = pad
        if pad == "CIRCULAR":
            x = jnp.pad(x, [(0, 0), *[((k - 1) // 2, k // 2) for k in eff], (0, 0)], mode="wrap")
            pad_ = "VALID"
        elif isinstance(pad, str) and in_dil != (1,) * nd:
            # lax takes no string padding with input dilation: pad as for the zero-stuffed input.
            stuffed = [(n - 1) * d + 1 for n, d in zip(x.shape[1:-1], in_dil, strict=True)]
            pad_ = jax.lax.padtype_to_pads(stuffed, eff, strides_, pad)
        if groups == 1 and in_dil == (1,) * nd:
            if isinstance(pad_, str):
                pad_ = jax.lax.padtype_to_pads(x.shape[1:-1], eff, strides_, pad_)
            out = [
                (n + lo + hi - e) // s + 1
                for n, (lo, hi), e, s in zip(x.shape[1:-1], pad_, eff, strides_, strict=True)
            ]
            if min(out) < 1:
                raise LayerError(_empty_output(eff, padding, x))
            y = im2col.conv(x, kernel, strides_, pad_, k_dil, dims)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, strides_, pad_, in_dil, k_dil, dims, feature_group_count=groups
            )
        if 0 in y.shape[1:-1]:
            raise LayerError(_empty_output(eff, padding, x))
        if use_bias:
            y = y + get_param(params, "bias", (features,)).astype(dtype_)
        return jnp.reshape(y, (*batch, *y.shape[1:])), state

    return Layer(init, apply, name)


def ConvTranspose(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "convtranspose",
) -> Layer:
    """A transposed (fractionally strided) convolution, as Flax's ``ConvTranspose``.

    Input ``(*batch, *spatial, in)``, output ``(*batch, *out_spatial, features)``;
    ``"SAME"`` gives ``out = in * strides``, ``"VALID"`` gives
    ``out = in * strides + max(k - strides, 0)`` (``k`` the dilated kernel size).
    Built on ``jax.lax.conv_transpose``: the kernel is not flipped.

    Args:
        features: output channels.
        kernel_size: window size per spatial axis; an int means 1D.
        strides: the upsampling factor, int or one per spatial axis.
        padding: ``"SAME"``, ``"VALID"``, an int or ``(lo, hi)`` pairs. Pairs pad the
            stride-dilated input, as in ``jax.lax.conv_transpose``: PyTorch's
            ``ConvTranspose(padding=p, output_padding=q)`` is
            ``(k - 1 - p, k - 1 - p + q)`` here, with its weight flipped on the spatial axes.
        kernel_dilation: atrous dilation of the kernel.
        use_bias, kernel_init, bias_init, dtype, param_dtype: as in :func:`Conv`.

    Raises:
        LayerError: input of the wrong rank or channels that do not match the kernel.

    Params:
        kernel: ``(*kernel_size, in, features)``.
        bias: ``(features,)`` if ``use_bias``.
        lora_a, lora_b, ia3_scale, dora_magnitude, kernel_scale: optional, as in :func:`Conv`
            (the matrix view is ``(prod(kernel_size) * in, features)``).

    Example:
        >>> params, _ = nj.ConvTranspose(4, (2, 2), strides=2).init(key, jnp.zeros((1, 8, 8, 3)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (4,), 'kernel': (2, 2, 3, 4)}
    """
    owner = "ConvTranspose"
    ks = window_tuple(kernel_size, "kernel_size", owner)
    nd = len(ks)
    if features < 1:
        raise ValueError(f"ConvTranspose: features must be >= 1, got {features}")
    strides_ = spatial_tuple(strides, nd, "strides", owner)
    k_dil = spatial_tuple(kernel_dilation, nd, "kernel_dilation", owner)
    pad = window_padding(padding, nd, owner)
    dims = _dimension_numbers(nd)
    keys = ["kernel", *(["bias"] if use_bias else [])]

    def init(key, x):
        check_rank(x, nd + 2, layout(nd))
        k_kernel, k_bias = jax.random.split(key)
        params = {"kernel": kernel_init(k_kernel, (*ks, np.shape(x)[-1], features), param_dtype)}
        if use_bias:
            params["bias"] = bias_init(k_bias, (features,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_keys(params, keys, KERNEL_KEYS)
        _check_input(x, nd, params, (*ks, None, features), 1)
        dtype_ = compute_dtype(x, dtype, param_dtype)
        x, batch = batch_flat(jnp.asarray(x, dtype_), nd)
        y = jax.lax.conv_transpose(x, adapted_kernel(params, dtype_), strides_, pad, k_dil, dims)
        if use_bias:
            y = y + get_param(params, "bias", (features,)).astype(dtype_)
        return jnp.reshape(y, (*batch, *y.shape[1:])), state

    return Layer(init, apply, name)
