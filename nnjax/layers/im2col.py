"""Convolution as one matmul over gathered patches (im2col), for XLA:CPU.

XLA:CPU lowers a convolution's forward and input gradient to Eigen's spatial
convolution, which is slow when the input has very few channels (an image stem,
LeNet's first layers): measured 1.8-4.2x slower (forward+backward) than the same
convolution written as strided slices, one ``concatenate`` and one matmul (see
``benchmarks/study_cpu_conv.py``). With more input channels the patches tensor grows
and Eigen wins, so :func:`conv` picks the im2col form only on CPU and only for
inputs with at most :data:`MAX_IN_CHANNELS` channels; elsewhere, and on every other
backend (chosen by :func:`nnjax.core.by_platform`), it is
``jax.lax.conv_general_dilated``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nnjax.core.combinators import by_platform
from nnjax.layers.base import matmul_last

__all__ = ["MAX_IN_CHANNELS", "conv", "conv_im2col"]

# Time of conv forward+backward on a 2-core Intel Xeon VM, im2col / XLA (results/cpu-conv.md):
# 1 channel 0.40x, 3 channels 0.24-0.50x, 4: 0.39x, 6: 0.55x, 8: 0.61x, 12: 0.83x,
# 16: 0.36-1.96x, 64: 0.92-1.15x; the forward alone is slower from 6 channels up
# (1.3x at 6, 1.9-2.1x at 8-12, 9.5x for a 3x3 on 16 channels), so 6 is the limit.
MAX_IN_CHANNELS = 6


def conv_im2col(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    kernel_dilation: Sequence[int],
) -> jax.Array:
    """``conv_general_dilated`` with one feature group and no input dilation, as a matmul.

    Args:
        x: ``(N, *spatial, C)``.
        kernel: ``(*window, C, F)``.
        strides, kernel_dilation: one per spatial axis.
        padding: ``(lo, hi)`` per spatial axis, each >= 0.

    Returns:
        ``(N, *out_spatial, F)``: for each output position, the ``prod(window) * C``
        inputs under the window (taps in row-major order, channels last) times
        ``kernel.reshape(-1, F)``.
    """
    window = kernel.shape[:-2]
    x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    spatial = x.shape[1:-1]
    extent = [(k - 1) * d + 1 for k, d in zip(window, kernel_dilation, strict=True)]
    out = [(s - e) // st + 1 for s, e, st in zip(spatial, extent, strides, strict=True)]
    taps = []
    for tap in itertools.product(*(range(k) for k in window)):
        start = [t * d for t, d in zip(tap, kernel_dilation, strict=True)]
        limit = [b + (o - 1) * st + 1 for b, o, st in zip(start, out, strides, strict=True)]
        taps.append(
            jax.lax.slice(x, [0, *start, 0], [x.shape[0], *limit, x.shape[-1]], [1, *strides, 1])
        )
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return matmul_last(patches, kernel.reshape(-1, kernel.shape[-1]))


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    kernel_dilation: Sequence[int],
    dimension_numbers: jax.lax.ConvDimensionNumbers,
) -> jax.Array:
    """A channels-last convolution (one feature group, no input dilation, explicit pads).

    ``x (N, *spatial, C)``, ``kernel (*window, C, F)`` -> ``(N, *out_spatial, F)``;
    the im2col form on CPU when ``C <= MAX_IN_CHANNELS`` and no pad is negative.
    """

    def general(x, kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            strides,
            padding,
            rhs_dilation=kernel_dilation,
            dimension_numbers=dimension_numbers,
        )

    if x.shape[-1] > MAX_IN_CHANNELS or any(p < 0 for pair in padding for p in pair):
        return general(x, kernel)

    def im2col(x, kernel):
        return conv_im2col(x, kernel, strides, padding, kernel_dilation)

    return by_platform(im2col, general, x, kernel)
