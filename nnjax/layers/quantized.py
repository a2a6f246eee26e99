"""Quantized kernels: the storage format a layer dequantizes inside its matmul.

A quantized kernel is the ``kernel`` leaf in an integer dtype with its scales in
the sibling leaf ``kernel_scale`` (float32), so every path stays what it was.
Two schemes, told apart by the kernel's dtype; ``depth`` is the number of stacked
axes (``nj.repeat``) in front, and the scale has them too:

- **int8** (``bits=8``): ``kernel`` int8, the float kernel's shape; ``kernel_scale
  (*stack, out)``, symmetric per output channel: ``scale = absmax / 127`` over all
  per-copy axes but the last, ``kernel = round(w / scale)``.
- **NF4** (``bits=4``), as QLoRA (Dettmers et al. 2023) defines it: each copy's
  kernel, flattened in row-major order, is cut into ``n = ceil(size / block_size)``
  blocks of ``ceil(size / n)`` values (``block_size`` when it divides the size; else
  the last block is shorter and zero-padded, as bitsandbytes pads it, so any kernel
  quantizes); ``kernel_scale (*stack, n)`` is each block's absmax, and each value
  ``w / absmax`` is stored as the index of the nearest of the 16 :data:`NF4` code
  values. Two 4-bit codes share a byte, the first in the high nibble: ``kernel``
  uint8 ``(*stack, *shape[:-1], ceil(out / 2))``; an odd ``out`` (a head over a
  vocabulary of 50,257) ends each row with a zero code, and its scale then has the
  kernel's rank, ``(*stack, 1, ..., 1, n)``, which is how the shapes tell ``out``.
  The scales are float32 (QLoRA's double quantization of the scales is not done:
  0.5 bit per weight more).

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

from nnjax.core.errors import ArgumentError

__all__ = [
    "SCALE",
    "ROW_SCALE",
    "NF4",
    "quantize_rows",
    "dequantize_rows",
    "row_scale",
    "quantize",
    "dequantize",
    "logical_shape",
    "is_quantized",
    "int8_codes",
    "nf4_codes",
    "nf4_blocks",
    "pack_nf4",
]

SCALE = "kernel_scale"
"""The leaf beside a quantized ``kernel`` that holds its scales."""

ROW_SCALE = "embedding_scale"
"""The leaf beside an int8 token table (``embedding``) that holds its per-row scales."""

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


def _odd(kernel: Any, scale: Any) -> int:
    """1 when a packed NF4 kernel's last axis is odd (its scale has the kernel's rank), else 0."""
    return int(np.ndim(scale) >= np.ndim(kernel))


def logical_shape(kernel: Any, scale: Any = None) -> tuple[int, ...]:
    """The float kernel's shape: a packed NF4 kernel holds two values per byte."""
    shape = tuple(int(d) for d in np.shape(kernel))
    if scale is not None and jnp.result_type(kernel) == jnp.uint8:
        return (*shape[:-1], 2 * shape[-1] - _odd(kernel, scale))
    return shape


def _normalized(w: jax.Array, absmax: jax.Array) -> jax.Array:
    """``w / absmax`` (``absmax`` broadcast against ``w``; 0 where it is 0), exact for huge scales.

    XLA turns the division into a product with ``1 / absmax``, which flushes to zero
    above about 8.5e37 (the reciprocal is subnormal); dividing by the mantissa and
    shifting by the exponent keeps every factor normal.
    """
    mantissa, exponent = jnp.frexp(jnp.where(absmax > 0, absmax, 1.0))
    return jnp.ldexp(w, -exponent) / mantissa


@jax.jit
def int8_codes(w: jax.Array, scale: jax.Array) -> jax.Array:
    """``round(w / scale)`` as int8 (``scale`` broadcast against ``w``; 0 where it is 0)."""
    return jnp.round(_normalized(w.astype(jnp.float32), scale)).astype(jnp.int8)


@jax.jit
def nf4_codes(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(codes uint8, absmax float32)`` of NF4 blocks ``(..., length)``: each block's
    absmax ``(...)`` and the index of the nearest :data:`NF4` value of ``w / absmax``."""
    blocks = blocks.astype(jnp.float32)
    scale = jnp.max(jnp.abs(blocks), axis=-1)
    normed = _normalized(blocks, scale[..., None])
    levels = jax.lax.broadcast_to_rank(jnp.asarray(NF4), normed.ndim + 1)
    codes = jnp.argmin(jnp.abs(normed[..., None] - levels), axis=-1).astype(jnp.uint8)
    return codes, scale


def nf4_blocks(size: int, block_size: int) -> tuple[int, int]:
    """``(n, length)``: a copy of ``size`` values is cut into ``n = ceil(size / block_size)``
    blocks of ``length = ceil(size / n)`` values (the last zero-padded)."""
    n = -(-size // block_size)
    return n, -(-size // n)


def pack_nf4(codes: Any, scale: Any, depth: int) -> tuple[Any, Any]:
    """``(kernel, kernel_scale)`` from NF4 codes in the kernel's shape ``(*stack, ..., out)``
    and the block scales ``(*stack, n)``: two codes a byte, the first in the high nibble;
    an odd ``out`` ends each row with a zero code (index 7) and gives the scale the
    kernel's rank. NumPy in, NumPy out; jax arrays in, jax arrays out."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    out = codes.shape[-1]
    if out % 2:
        codes = xp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)], constant_values=7)
        rank = codes.ndim - depth
        scale = xp.reshape(scale, (*scale.shape[:-1], *(1,) * (rank - 1), scale.shape[-1]))
    pairs = xp.reshape(codes, (*codes.shape[:-1], codes.shape[-1] // 2, 2))
    return (pairs[..., 0] << 4) | pairs[..., 1], scale


def row_scale(w: jax.Array) -> jax.Array:
    """Per-row int8 scales ``(rows,)`` of a table ``(rows, features)``: ``absmax / 127``."""
    return jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=-1) / 127.0


def quantize_rows(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(embedding int8 (rows, features), embedding_scale (rows,))`` of a token table,
    symmetric per row (a row is one token's vector; a tied head's output channel).

    Example:
        >>> q, s = nj.layers.quantized.quantize_rows(jnp.array([[0.5, -1.0], [0.25, 2.0]]))
        >>> q.tolist()
        [[64, -127], [16, 127]]
    """
    scale = row_scale(w)
    return int8_codes(jnp.asarray(w), scale[:, None]), scale


def dequantize_rows(table: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The float table ``(rows, features)`` in ``dtype`` from int8 rows and their scales.

    Example:
        >>> table = jnp.array([[64, -127], [16, 127]], jnp.int8)
        >>> nj.layers.quantized.dequantize_rows(table, jnp.array([0.5, 0.25])).tolist()
        [[32.0, -63.5], [4.0, 31.75]]
    """
    return table.astype(dtype) * jnp.asarray(scale).astype(dtype)[:, None]


def quantize(w: jax.Array, bits: int, *, depth: int = 0, block_size: int = 64):
    """``(kernel, kernel_scale)`` of the float kernel ``w`` (see the module docstring).

    The whole kernel at once: its float temporaries are several times its size
    (NF4's nearest-code search holds 16 distances per value);
    :func:`nnjax.finetune.quantize` streams the same computation in chunks.

    Args:
        w: ``(*stack, ..., out)`` with ``depth`` stacked axes in front; finite.
        bits: 8 (int8 per output channel) or 4 (NF4 block-wise).
        depth: the number of stacked axes.
        block_size: the most values per NF4 block (``bits=4``).

    Raises:
        ArgumentError: other ``bits``, or a ``block_size`` below 1.

    Example:
        >>> q, scale = nj.layers.quantized.quantize(jnp.array([[0.5, -1.0], [0.25, 2.0]]), 8)
        >>> q.tolist(), scale.tolist()
        ([[127, -64], [64, 127]], [0.003937007859349251, 0.015748031437397003])
    """
    w = jnp.asarray(w, jnp.float32)
    stack, shape = w.shape[:depth], w.shape[depth:]
    if bits == 8:
        axes = tuple(range(depth, w.ndim - 1))
        scale = jnp.max(jnp.abs(w), axis=axes) / 127.0  # (*stack, out)
        return int8_codes(w, jnp.expand_dims(scale, axes)), scale
    if bits != 4:
        raise ArgumentError(f"bits must be 4 or 8, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ArgumentError(f"block_size must be an int >= 1, got {block_size!r}")
    size = math.prod(shape)
    n, length = nf4_blocks(size, block_size)
    flat = jnp.reshape(w, (*stack, size))
    blocks = jnp.pad(flat, [(0, 0)] * depth + [(0, n * length - size)])
    codes, scale = nf4_codes(jnp.reshape(blocks, (*stack, n, length)))  # scale (*stack, n)
    codes = jnp.reshape(jnp.reshape(codes, (*stack, n * length))[..., :size], w.shape)
    return pack_nf4(codes, scale, depth)


def dequantize(kernel: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel, in ``dtype``, from a quantized ``kernel`` and its ``scale``.

    The int8 scale's leading axes (all but its last) are the stacked axes; an NF4
    scale's last axis is the blocks, the others the copies.
    """
    scale = jnp.asarray(scale).astype(dtype)
    if jnp.result_type(kernel) == jnp.int8:
        depth = jnp.ndim(scale) - 1
        s = jnp.reshape(scale, (*scale.shape[:-1], *(1,) * (kernel.ndim - depth - 1), -1))
        return kernel.astype(dtype) * s
    shape = logical_shape(kernel, scale)
    codes = jnp.stack([kernel >> 4, kernel & 15], axis=-1)
    codes = jnp.reshape(codes, (*kernel.shape[:-1], -1))[..., : shape[-1]]
    n = scale.shape[-1]
    copies = math.prod(scale.shape[:-1])
    size = math.prod(shape) // copies
    length = -(-size // n)
    values = jnp.reshape(jnp.asarray(NF4, dtype)[codes.astype(jnp.int32)], (copies, size))
    values = jnp.pad(values, [(0, 0), (0, n * length - size)])
    blocks = jnp.reshape(values, (copies, n, length)) * jnp.reshape(scale, (copies, n, 1))
    return jnp.reshape(jnp.reshape(blocks, (copies, n * length))[:, :size], shape)
