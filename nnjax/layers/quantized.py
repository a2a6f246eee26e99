"""Quantized kernels: the storage format a layer dequantizes inside its matmul.

A quantized kernel is the ``kernel`` leaf in an integer dtype with its scales in
the sibling leaf ``kernel_scale`` (float32), so every path stays what it was.
Two schemes, told apart by the kernel's dtype; ``depth`` is the number of stacked
axes (``nj.repeat``) in front, and the scale has them too:

- **int8** (``bits=8``): ``kernel`` int8, the float kernel's shape; ``kernel_scale
  (*stack, out)``, symmetric per output channel: ``scale = absmax / 127`` over all
  per-copy axes but the last, ``kernel = round(w / scale)``.
- **NF4** (``bits=4``), as QLoRA (Dettmers et al. 2023) defines it: each copy's
  kernel, flattened in row-major order, is cut into blocks of ``block_size``
  values; ``kernel_scale (*stack, size // block_size)`` is each block's absmax, and
  each value ``w / absmax`` is stored as the index of the nearest of the 16
  :data:`NF4` code values. Two 4-bit codes share a byte, the first in the high
  nibble: ``kernel`` uint8 ``(*stack, *shape[:-1], out // 2)``. The scales are
  float32 (QLoRA's double quantization of the scales is not done: 0.5 bit per
  weight more).

NF4 is chosen over plain int4 because its code values are the quantiles of a
normal distribution, which pretrained weights follow: it is what QLoRA, peft and
bitsandbytes ship, so a fine-tuning recipe carries over.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SCALE", "NF4", "quantize", "dequantize", "logical_shape", "is_quantized"]

SCALE = "kernel_scale"
"""The leaf beside a quantized ``kernel`` that holds its scales."""

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
"""The 16 NF4 code values (QLoRA, Appendix E; bitsandbytes' table)."""


def is_quantized(kernel: Any) -> bool:
    """Whether ``kernel`` is stored quantized (an integer dtype)."""
    return bool(jnp.issubdtype(jnp.result_type(kernel), jnp.integer))


def logical_shape(kernel: Any, scale: Any = None) -> tuple[int, ...]:
    """The float kernel's shape: a packed NF4 kernel holds two values per byte."""
    shape = tuple(int(d) for d in np.shape(kernel))
    if scale is not None and jnp.result_type(kernel) == jnp.uint8:
        return (*shape[:-1], 2 * shape[-1])
    return shape


def quantize(w: jax.Array, bits: int, *, depth: int = 0, block_size: int = 64):
    """``(kernel, kernel_scale)`` of the float kernel ``w`` (see the module docstring).

    Args:
        w: ``(*stack, ..., out)`` with ``depth`` stacked axes in front.
        bits: 8 (int8 per output channel) or 4 (NF4 block-wise).
        depth: the number of stacked axes.
        block_size: values per NF4 block (``bits=4``); even, and it must divide each
            copy's size.

    Raises:
        ValueError: other ``bits``, or a shape the scheme cannot store.
    """
    w = jnp.asarray(w, jnp.float32)
    stack, shape = w.shape[:depth], w.shape[depth:]
    if bits == 8:
        axes = tuple(range(depth, w.ndim - 1))
        scale = jnp.max(jnp.abs(w), axis=axes) / 127.0  # (*stack, out)
        s = jnp.expand_dims(scale, axes)
        q = jnp.where(s > 0, jnp.round(w / jnp.where(s > 0, s, 1.0)), 0.0)
        return q.astype(jnp.int8), scale
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    size = math.prod(shape)
    if block_size < 2 or block_size % 2 or size % block_size or shape[-1] % 2:
        raise ValueError(
            f"NF4 needs an even block_size that divides the kernel's size and an even "
            f"last axis; kernel {tuple(shape)} ({size} values) with block_size {block_size}"
        )
    blocks = jnp.reshape(w, (*stack, size // block_size, block_size))
    scale = jnp.max(jnp.abs(blocks), axis=-1)  # (*stack, n_blocks)
    normed = blocks / jnp.where(scale > 0, scale, 1.0)[..., None]
    levels = jax.lax.broadcast_to_rank(jnp.asarray(NF4), normed.ndim + 1)
    codes = jnp.argmin(jnp.abs(normed[..., None] - levels), axis=-1).astype(jnp.uint8)
    pairs = jnp.reshape(codes, (*stack, *shape[:-1], shape[-1] // 2, 2))
    return (pairs[..., 0] << 4) | pairs[..., 1], scale


def dequantize(kernel: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel, in ``dtype``, from a quantized ``kernel`` and its ``scale``.

    The scale's leading axes (all but its last) are the stacked axes.
    """
    depth = jnp.ndim(scale) - 1
    scale = jnp.asarray(scale).astype(dtype)
    if jnp.result_type(kernel) == jnp.int8:
        s = jnp.reshape(scale, (*scale.shape[:-1], *(1,) * (kernel.ndim - depth - 1), -1))
        return kernel.astype(dtype) * s
    codes = jnp.stack([kernel >> 4, kernel & 15], axis=-1)
    values = jnp.asarray(NF4, dtype)[codes.astype(jnp.int32)]
    shape = logical_shape(kernel, scale)
    blocks = jnp.reshape(values, (*scale.shape, -1)) * scale[..., None]
    return jnp.reshape(blocks, shape)
