"""Products with few rows against a large stored weight: decoding's matrix-vector products.

A decode step multiplies 1-16 rows by every weight matrix, so it runs at the rate the
weights stream from memory. On CPU, XLA's dot reads float32 weights well below the
memory's rate for a few rows, and dequantizes int8 (or widens bfloat16) weights into
a float32 copy in memory before it multiplies. :func:`small_matmul` calls nnjax's
own CPU kernel (``small_matmul.cc``, built by :mod:`nnjax.kernels.native`), which
reads each stored weight once and converts it in registers; on other platforms, or
where the kernel cannot be built, it computes the same product with XLA's operations.

The layers take this path by themselves (:func:`takes`): a Dense kernel or a tied
head's table in float32, bfloat16 or int8, at least :data:`MIN_WEIGHTS` weights,
multiplied by at most :data:`ROWS` rows. Gradients are those of the plain formula.
``docs/benchmarks.md`` has the measured rates.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from nnjax.kernels.native import ffi_target

__all__ = [
    "ROWS",
    "MIN_WEIGHTS",
    "WEIGHT_DTYPES",
    "TRANSPOSED_FLOAT32_ROWS",
    "available",
    "takes",
    "small_matmul",
]

ROWS = 16
"""The most rows the kernel takes: beyond, a product is compute-bound and XLA's dot is
the faster one."""

MIN_WEIGHTS = 1 << 16
"""The fewest weights for which the kernel's call is worth it."""

WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8))
"""The weight storage dtypes the kernel reads."""

TRANSPOSED_FLOAT32_ROWS = 4
"""The most rows for which a float32 weight stored ``(N, K)`` (a tied head's table) takes
the kernel: XLA's own row-by-row product of that layout is as fast from 8 rows on."""


def available() -> bool:
    """Whether this process runs the native kernel on CPU (built, not turned off)."""
    return _target() is not None


def _target() -> str | None:
    return ffi_target("small_matmul", "NnjaxSmallMatmul")


def takes(x: Any, w: Any, scale: Any = None, *, transposed: bool = False) -> bool:
    """Whether ``x (..., K)`` times the 2-D weight ``w`` takes :func:`small_matmul` on this
    backend: at most :data:`ROWS` rows (:data:`TRANSPOSED_FLOAT32_ROWS` for a float32
    ``w`` stored ``(N, K)``), at least :data:`MIN_WEIGHTS` weights stored in
    :data:`WEIGHT_DTYPES`, a float ``x``, and a per-output-channel ``scale (N,)`` exactly
    when ``w`` is int8. Decided from shapes and dtypes, at trace time."""
    if jax.default_backend() != "cpu" or jnp.ndim(w) != 2 or jnp.ndim(x) < 1:
        return False
    w_dtype = jnp.result_type(w)
    if w_dtype not in WEIGHT_DTYPES or (scale is not None) != (w_dtype == jnp.int8):
        return False
    if scale is not None and jnp.ndim(scale) != 1:
        return False
    rows = math.prod(jnp.shape(x)[:-1])
    if transposed and w_dtype == jnp.float32 and rows > TRANSPOSED_FLOAT32_ROWS:
        return False
    return (
        jnp.issubdtype(jnp.result_type(x), jnp.floating)
        and 1 <= rows <= ROWS
        and math.prod(jnp.shape(w)) >= MIN_WEIGHTS
    )


def small_matmul(x: Any, w: Any, scale: Any = None, *, transposed: bool = False) -> jax.Array:
    """``x @ w`` (``w (K, N)``) or ``x @ w.T`` (``transposed``, ``w (N, K)``), times ``scale``.

    Args:
        x: ``(..., K)`` float; computed in float32.
        w: the stored weight, float32, bfloat16 or int8 (any shape XLA's path takes;
            the kernel itself takes 2-D).
        scale: ``(N,)`` float32 per output channel (an int8 weight's), or ``None``.
        transposed: ``w`` is stored ``(N, K)`` (a token table used as the head).

    Returns:
        ``(..., N)`` float32.

    Example:
        >>> from nnjax.kernels.small_matmul import small_matmul
        >>> w = jnp.array([[1, -2], [3, 4]], jnp.int8)
        >>> small_matmul(jnp.array([[1.0, 1.0]]), w, jnp.array([0.5, 0.25])).tolist()
        [[2.0, 0.5]]
    """
    x = jnp.asarray(x, jnp.float32)
    lead = x.shape[:-1]
    x2 = jnp.reshape(x, (-1, x.shape[-1]))
    s = jnp.zeros((0,), jnp.float32) if scale is None else jnp.asarray(scale, jnp.float32)
    w = jnp.asarray(w)
    y: jax.Array = _product(x2, w, s, transposed)  # type: ignore[assignment]  # custom_vjp's type
    return jnp.reshape(y, (*lead, w.shape[0] if transposed else w.shape[-1]))


def _reference(x: jax.Array, w: jax.Array, scale: jax.Array, transposed: bool) -> jax.Array:
    """The product with XLA's operations (float32); its gradients are the kernel's."""
    wf = w.astype(jnp.float32)
    y = x @ (wf.T if transposed else wf)
    return y * scale[None, :] if scale.shape[0] else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(x: jax.Array, w: jax.Array, scale: jax.Array, transposed: bool) -> jax.Array:
    target = _target() if w.ndim == 2 else None
    if target is None:
        return _reference(x, w, scale, transposed)
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if transposed else w.shape[1]), x.dtype)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return jax.lax.platform_dependent(
        x,
        w,
        scale,
        cpu=lambda x, w, s: call(x, w, s, transposed=transposed),
        default=lambda x, w, s: _reference(x, w, s, transposed),
    )


def _product_fwd(x, w, scale, transposed):
    return _product(x, w, scale, transposed), (x, w, scale)


def _product_bwd(transposed, residuals, dy):
    _, vjp = jax.vjp(lambda x, w, s: _reference(x, w, s, transposed), *residuals)
    return vjp(dy)


_product.defvjp(_product_fwd, _product_bwd)
