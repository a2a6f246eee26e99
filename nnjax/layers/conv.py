"""Convolutions on channels-last input: Conv (1D/2D/3D) and ConvTranspose.

The window helpers here (``spatial_tuple``, ``fixed_rank``, ``input_rank``,
``window_padding``, ``layout``, ``batch_flat``) are shared with ``nnjax.layers.pool``: one normalisation
of sizes, strides and padding for every windowed layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank, get_param, shape_str
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Initializer, Layer
from nnjax.layers import im2col
from nnjax.layers.adapters import KERNEL_KEYS, adapted_kernel, kernel_shape
from nnjax.layers.base import add_bias, compute_dtype

__all__ = ["Conv", "ConvTranspose"]

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]

_AXES = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def spatial_tuple(value: int | Sequence[int], nd: int, what: str, owner: str) -> tuple[int, ...]:
    """``value`` as ``nd`` positive ints: an int is repeated, a sequence must have ``nd``."""
    t = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(t) != nd or not all(isinstance(v, int | np.integer) and v >= 1 for v in t):
        raise ArgumentError(
            f"{owner}: {what} must be a positive int or {nd} positive ints, got {value!r}"
        )
    return tuple(int(v) for v in t)


def fixed_rank(owner: str, **settings: Any) -> int | None:
    """The number of spatial axes that the per-axis settings given as sequences fix.

    None when every setting is an int (or a padding string): the input decides, so
    ``Conv(32, 3)`` on ``(N, 28, 28, 1)`` is a 3x3 convolution, as Keras'
    ``Conv2D(32, 3)`` and torch's ``Conv2d(1, 32, 3)``.
    """
    lengths = {
        k: len(v) for k, v in settings.items() if v is not None and not isinstance(v, int | str)
    }
    if len(set(lengths.values())) > 1:
        raise ArgumentError(
            f"{owner}: the per-axis settings disagree on the number of spatial axes: {lengths}"
        )
    n = next(iter(lengths.values()), None)
    if n == 0:
        raise ArgumentError(f"{owner}: per-axis settings must not be empty, got {settings}")
    return n


def input_rank(x: Any, fixed: int | None, what: str = "kernel_size") -> int:
    """``fixed``, or the spatial rank of ``(N, *spatial, C)`` input when settings are ints."""
    if fixed is not None:
        return fixed
    if np.ndim(x) < 3:
        raise LayerError(
            f"expected x (N, *spatial, C) with at least one spatial axis, got x.shape == "
            f"{shape_str(np.shape(x))}; an int {what} applies to every axis between the "
            f"batch axis and the channels (give a tuple for several batch axes)"
        )
    return np.ndim(x) - 2


def window_padding(
    padding: Padding, nd: int, owner: str, allowed: Sequence[str] = ("SAME", "VALID")
) -> str | tuple[tuple[int, int], ...]:
    """``padding`` as an upper-case string from ``allowed`` or ``nd`` ``(lo, hi)`` pairs.

    An int ``p`` means ``(p, p)`` on every spatial axis; ``nd`` ints one ``(p, p)`` each.
    """
    if isinstance(padding, str):
        if padding.upper() not in allowed:
            raise ArgumentError(
                f"{owner}: padding must be one of {list(allowed)} or (lo, hi) pairs, got {padding!r}"
            )
        return padding.upper()
    if isinstance(padding, int):
        padding = (padding,) * nd
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != nd or not all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in pads):
        raise ArgumentError(
            f"{owner}: padding must be a string, an int or {nd} (lo, hi) int pairs, got {padding!r}"
        )
    return tuple((lo, hi) for lo, hi in pads)  # pairs now checked


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
    """An N-d convolution (usually N = 1 to 3) on channels-last input.

    Input ``(*batch, *spatial, in)`` with at least one batch axis (``(N, H, W, C)`` for
    2D); output ``(*batch, *out_spatial, features)``. Built on
    ``jax.lax.conv_general_dilated``.

    The number of spatial axes N is the length of ``kernel_size`` (or of another
    per-axis setting) given as a sequence. If they are all ints, it is the input's at
    ``init``, every axis between the batch axis and the channels: ``Conv(32, 3)`` on
    ``(N, 28, 28, 1)`` is a 3x3 convolution, as Keras' ``Conv2D(32, 3)`` and torch's
    ``Conv2d(1, 32, 3)``; on ``(N, L, C)`` it is 1D. Give a tuple for input with
    several batch axes.

    Args:
        features: output channels; divisible by ``feature_group_count``.
        kernel_size: window size per spatial axis; an int is the same on every spatial axis.
        strides: int (every spatial axis) or one per spatial axis.
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
    # Over 80 lines only through the closures it returns (settings, check_groups, init, apply; the
    # longest is 15 lines): a layer's functions close over its constructor's arguments.
    owner = "Conv"
    groups = feature_group_count
    if features < 1 or groups < 1 or features % groups:
        raise ArgumentError(
            f"Conv: features ({features}) must be a positive multiple of feature_group_count ({groups})"
        )
    fixed = fixed_rank(
        owner,
        kernel_size=kernel_size,
        strides=strides,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
        padding=padding,
    )

    def settings(nd: int) -> _Settings:
        ks = spatial_tuple(kernel_size, nd, "kernel_size", owner)
        k_dil = spatial_tuple(kernel_dilation, nd, "kernel_dilation", owner)
        return _Settings(
            nd,
            ks,
            spatial_tuple(strides, nd, "strides", owner),
            spatial_tuple(input_dilation, nd, "input_dilation", owner),
            k_dil,
            window_padding(padding, nd, owner, ("SAME", "VALID", "CIRCULAR")),
            [(k - 1) * d + 1 for k, d in zip(ks, k_dil, strict=True)],  # dilated kernel size
        )

    settings(fixed or 1)  # bad arguments fail here, not at init
    keys = ["kernel", *(["bias"] if use_bias else [])]

    def check_groups(x, nd):
        check_rank(x, nd + 2, layout(nd))
        if np.shape(x)[-1] % groups:
            raise LayerError(
                f"expected x.shape[-1] divisible by feature_group_count == {groups}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )

    def init(key, x):
        st = settings(input_rank(x, fixed))
        check_groups(x, st.nd)
        k_kernel, k_bias = jax.random.split(key)
        shape = (*st.ks, np.shape(x)[-1] // groups, features)
        params = {"kernel": kernel_init(k_kernel, shape, param_dtype)}
        if use_bias:
            params["bias"] = bias_init(k_bias, (features,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_keys(params, keys, KERNEL_KEYS)
        # The kernel says how many spatial axes init saw (its rank minus in and out).
        st = settings(fixed or max(len(kernel_shape(params)) - 2, 1))
        check_groups(x, st.nd)
        _check_input(x, st.nd, params, (*st.ks, None, features), groups)
        dtype_ = compute_dtype(x, dtype, param_dtype)
        x, batch = batch_flat(jnp.asarray(x, dtype_), st.nd)
        y = _conv(x, adapted_kernel(params, dtype_), st, groups, padding)
        if use_bias:
            y = add_bias(y, get_param(params, "bias", (features,)))
        return jnp.reshape(y, (*batch, *y.shape[1:])), state

    return Layer(init, apply, name)


class _Settings(NamedTuple):
    """A convolution's per-axis settings for ``nd`` spatial axes."""

    nd: int
    ks: tuple[int, ...]
    strides: tuple[int, ...]
    in_dil: tuple[int, ...]
    k_dil: tuple[int, ...]
    pad: Any
    eff: list[int]


def _conv(x: jax.Array, kernel: jax.Array, st: _Settings, groups: int, padding: Any) -> jax.Array:
    """The convolution of ``x (N, *spatial, C)``: im2col where it is faster, else lax."""
    nd, pad = st.nd, st.pad
    dims = _dimension_numbers(nd)
    if pad == "CIRCULAR":
        x = jnp.pad(x, [(0, 0), *[((k - 1) // 2, k // 2) for k in st.eff], (0, 0)], mode="wrap")
        pad = "VALID"
    elif isinstance(pad, str) and st.in_dil != (1,) * nd:
        # lax takes no string padding with input dilation: pad as for the zero-stuffed input.
        stuffed = [(n - 1) * d + 1 for n, d in zip(x.shape[1:-1], st.in_dil, strict=True)]
        pad = jax.lax.padtype_to_pads(stuffed, st.eff, st.strides, pad)
    if groups == 1 and st.in_dil == (1,) * nd:
        if isinstance(pad, str):
            pad = jax.lax.padtype_to_pads(x.shape[1:-1], st.eff, st.strides, pad)
        out = [
            (n + lo + hi - e) // s + 1
            for n, (lo, hi), e, s in zip(x.shape[1:-1], pad, st.eff, st.strides, strict=True)
        ]
        if min(out) < 1:
            raise LayerError(_empty_output(st.eff, padding, x))
        y = im2col.conv(x, kernel, st.strides, pad, st.k_dil, dims)
    else:
        y = jax.lax.conv_general_dilated(
            x, kernel, st.strides, pad, st.in_dil, st.k_dil, dims, feature_group_count=groups
        )
    if 0 in y.shape[1:-1]:
        raise LayerError(_empty_output(st.eff, padding, x))
    return y


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
        kernel_size: window size per spatial axis; an int is the same on every spatial
            axis, their number taken from the input at ``init`` as in :func:`Conv`.
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
    if features < 1:
        raise ArgumentError(f"ConvTranspose: features must be >= 1, got {features}")
    fixed = fixed_rank(
        owner,
        kernel_size=kernel_size,
        strides=strides,
        kernel_dilation=kernel_dilation,
        padding=padding,
    )

    def settings(nd: int) -> tuple:
        return (
            spatial_tuple(kernel_size, nd, "kernel_size", owner),
            spatial_tuple(strides, nd, "strides", owner),
            spatial_tuple(kernel_dilation, nd, "kernel_dilation", owner),
            window_padding(padding, nd, owner),
        )

    settings(fixed or 1)  # bad arguments fail here, not at init
    keys = ["kernel", *(["bias"] if use_bias else [])]

    def init(key, x):
        nd = input_rank(x, fixed)
        check_rank(x, nd + 2, layout(nd))
        ks = settings(nd)[0]
        k_kernel, k_bias = jax.random.split(key)
        params = {"kernel": kernel_init(k_kernel, (*ks, np.shape(x)[-1], features), param_dtype)}
        if use_bias:
            params["bias"] = bias_init(k_bias, (features,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_keys(params, keys, KERNEL_KEYS)
        nd = fixed or max(len(kernel_shape(params)) - 2, 1)
        ks, strides_, k_dil, pad = settings(nd)
        _check_input(x, nd, params, (*ks, None, features), 1)
        dtype_ = compute_dtype(x, dtype, param_dtype)
        x, batch = batch_flat(jnp.asarray(x, dtype_), nd)
        kernel = adapted_kernel(params, dtype_)
        y = jax.lax.conv_transpose(x, kernel, strides_, pad, k_dil, _dimension_numbers(nd))
        if use_bias:
            y = add_bias(y, get_param(params, "bias", (features,)))
        return jnp.reshape(y, (*batch, *y.shape[1:])), state

    return Layer(init, apply, name)
