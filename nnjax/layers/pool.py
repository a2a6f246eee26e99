"""Pooling on channels-last input: MaxPool, AvgPool, GlobalAvgPool, GlobalMaxPool.

All are parameter-free: ``init`` returns ``({}, {})``. Window sizes, strides and
padding are normalised by the same helpers as the convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_rank
from nnjax.core.layer import Layer
from nnjax.layers.base import compute_dtype
from nnjax.layers.conv import (
    Padding,
    fixed_rank,
    input_rank,
    layout,
    spatial_tuple,
    window_padding,
)

__all__ = ["MaxPool", "AvgPool", "GlobalAvgPool", "GlobalMaxPool"]


def _no_params(key, x):
    del key, x
    return {}, {}


def _window(
    owner: str, window_shape: int | Sequence[int], strides: Any, padding: Padding
) -> Callable[[Any], tuple[int, tuple[int, ...], tuple[int, ...], Any]]:
    """``settings(x) -> (nd, window, strides, padding)``; ``strides=None`` means ``window``.

    With every setting an int, ``nd`` is the input's spatial rank (``x.ndim - 2``):
    ``MaxPool(2)`` on ``(N, H, W, C)`` pools 2x2, as Keras' ``MaxPooling2D(2)``.
    """
    fixed = fixed_rank(owner, window_shape=window_shape, strides=strides, padding=padding)

    def settings(nd):
        window = spatial_tuple(window_shape, nd, "window_shape", owner)
        strides_ = window if strides is None else spatial_tuple(strides, nd, "strides", owner)
        return nd, window, strides_, window_padding(padding, nd, owner)

    settings(fixed or 1)  # bad arguments fail here, not at apply
    return lambda x: settings(input_rank(x, fixed, "window_shape"))


def _pads(x: Any, nd: int, window: tuple, strides: tuple, padding: Any) -> list[tuple[int, int]]:
    """Explicit ``(lo, hi)`` pads over every axis of ``x`` (zero on batch and channel axes)."""
    spatial = np.shape(x)[-(nd + 1) : -1]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(spatial, window, strides, padding)
    return [(0, 0)] * (np.ndim(x) - nd - 1) + [tuple(p) for p in padding] + [(0, 0)]


def _reduce(x, init, op, nd, window, strides, pads):
    lead = np.ndim(x) - nd - 1
    dims = (1,) * lead + window + (1,)
    return jax.lax.reduce_window(x, init, op, dims, (1,) * lead + strides + (1,), pads)


def MaxPool(
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    *,
    name: str = "maxpool",
) -> Layer:
    """The maximum over each window of ``(*batch, *spatial, C)`` input, per channel.

    Args:
        window_shape: window per spatial axis; an int is the same on every spatial axis
            of the input (``x.ndim - 2`` of them: ``MaxPool(2)`` on ``(N, H, W, C)`` pools
            2x2, as Keras' ``MaxPooling2D(2)``); give a tuple for several batch axes.
        strides: int or one per spatial axis; ``None`` (default) means ``window_shape``,
            as in PyTorch and Keras (``flax.linen.max_pool`` defaults to 1).
        padding: ``"VALID"``, ``"SAME"``, an int or ``(lo, hi)`` pairs; padded cells never win.

    Output ``(*batch, *out_spatial, C)``, ``out = floor((in + lo + hi - window) / stride) + 1``.

    Example:
        >>> y, _ = nj.MaxPool((2, 2)).apply({}, {}, jnp.zeros((1, 8, 8, 3)))
        >>> y.shape
        (1, 4, 4, 3)
    """
    settings = _window("MaxPool", window_shape, strides, padding)

    def apply(params, state, x, *, rng=None, train=False):
        del params, rng, train
        nd, window, strides_, padding_ = settings(x)
        check_rank(x, nd + 2, layout(nd))
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            lowest = np.array(-np.inf, x.dtype)
        else:
            lowest = np.array(np.iinfo(x.dtype).min, x.dtype)
        pads = _pads(x, nd, window, strides_, padding_)
        return _reduce(x, lowest, jax.lax.max, nd, window, strides_, pads), state

    return Layer(_no_params, apply, name)


def AvgPool(
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    count_include_pad: bool = True,
    *,
    name: str = "avgpool",
) -> Layer:
    """The mean over each window of ``(*batch, *spatial, C)`` input, per channel.

    Args:
        window_shape, strides, padding: as in :func:`MaxPool`; padded cells are zeros.
        count_include_pad: divide by the full window size (True, as PyTorch and Flax) or
            by the number of real cells in the window (False).

    Sums run in float32 for half-precision input; the output keeps the input's float dtype.
    Non-overlapping, unpadded windows take a reshape-and-mean path (same numbers, faster).

    Example:
        >>> y, _ = nj.AvgPool((2, 2)).apply({}, {}, jnp.zeros((1, 8, 8, 3)))
        >>> y.shape
        (1, 4, 4, 3)
    """
    settings = _window("AvgPool", window_shape, strides, padding)

    def apply(params, state, x, *, rng=None, train=False):
        del params, rng, train
        nd, window, strides_, padding_ = settings(x)
        check_rank(x, nd + 2, layout(nd))
        out_dtype = compute_dtype(x, None)
        x = jnp.asarray(x, jnp.promote_types(out_dtype, jnp.float32))
        pads = _pads(x, nd, window, strides_, padding_)
        lead, spatial = x.shape[: -(nd + 1)], x.shape[-(nd + 1) : -1]
        if strides_ == window and not any(lo or hi for lo, hi in pads):
            out = tuple(s // w for s, w in zip(spatial, window, strict=True))
            x = x[(..., *(slice(0, o * w) for o, w in zip(out, window, strict=True)), slice(None))]
            split = [d for o, w in zip(out, window, strict=True) for d in (o, w)]
            y = jnp.mean(
                x.reshape(*lead, *split, x.shape[-1]),
                axis=tuple(range(len(lead) + 1, len(lead) + 2 * nd, 2)),
            )
            return y.astype(out_dtype), state
        y = _reduce(x, np.array(0, x.dtype), jax.lax.add, nd, window, strides_, pads)
        if count_include_pad:
            y = y / math.prod(window)
        else:
            ones = jnp.ones((1, *spatial, 1), x.dtype)
            y = y / _reduce(
                ones, np.array(0, x.dtype), jax.lax.add, nd, window, strides_, pads[-(nd + 2) :]
            )
        return y.astype(out_dtype), state

    return Layer(_no_params, apply, name)


def _global(reduce: Any, keepdims: bool, name: str) -> Layer:
    def apply(params, state, x, *, rng=None, train=False):
        del params, rng, train
        check_rank(x, 3, "(N, *spatial, C)")
        return reduce(
            jnp.asarray(x), axis=tuple(range(1, np.ndim(x) - 1)), keepdims=keepdims
        ), state

    return Layer(_no_params, apply, name)


def GlobalAvgPool(keepdims: bool = False, *, name: str = "globalavgpool") -> Layer:
    """The mean over all spatial axes of ``(N, *spatial, C)`` input.

    Output ``(N, C)``, or ``(N, 1, ..., 1, C)`` with ``keepdims``. Exactly one batch axis.

    Example:
        >>> y, _ = nj.GlobalAvgPool().apply({}, {}, jnp.zeros((2, 7, 7, 64)))
        >>> y.shape
        (2, 64)
    """
    return _global(jnp.mean, keepdims, name)


def GlobalMaxPool(keepdims: bool = False, *, name: str = "globalmaxpool") -> Layer:
    """The maximum over all spatial axes of ``(N, *spatial, C)`` input; shapes as :func:`GlobalAvgPool`."""
    return _global(jnp.max, keepdims, name)
