"""Helpers every layer family uses: the dtype a layer computes in, the 2D matmul, and
products of low-precision operands with float32 accumulation."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "matmul_last",
    "add_bias",
    "compute_dtype",
    "accumulating_einsum",
    "transposed_copy",
    "LOW_PRECISION",
]

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""Operand dtypes whose products accumulate in float32 (:func:`accumulating_einsum`)."""


def transposed_copy(a: jax.Array) -> jax.Array:
    """``a.T`` of a 2D array, materialised in the transposed order.

    XLA folds a plain transpose into the product that reads it; XLA:CPU then runs a
    product contracting the first axis of its left operand as a float32 Eigen dot (the
    weight gradient ``x.T @ g`` in bfloat16: 61 GF/s instead of the library's ~800 on
    a 2-core Xeon with AMX). Through a unit axis the transpose stays a copy.
    """
    n, k = a.shape
    return jnp.reshape(jnp.swapaxes(jnp.reshape(a, (n, k, 1)), 0, 1), (k, n))


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """``a (n, k)`` times ``b`` contracted on its axis ``contract_b``, float32 result."""
    dims = (((1,), (contract_b,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _f32_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _f32_einsum_fwd(spec, a, b):
    # The product itself, not a call of the custom-VJP function: a remat policy that
    # saves matmul outputs (the CPU layer scan's) sees a dot_general here and keeps it,
    # where a nested custom-VJP call was recomputed in the backward pass.
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), (a, b)


def _f32_einsum_bwd(spec, res, g):
    # The cotangent is rounded to the operands' dtype so both backward products are
    # again low-precision operands with float32 accumulation; JAX's own transpose would
    # multiply the float32 cotangent by a bf16 operand (a float32 product, ~3x slower).
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g = g.astype(a.dtype)
    if spec == _MATMUL:
        # The weight gradient contracts the rows of ``a (n, k)`` and ``g (n, m)``: ``a``
        # is copied transposed. Transposing ``g`` instead and then the product (k, m)
        # made XLA fuse that transpose into the write of the gradient into a stacked
        # buffer (the layer scan's), 8 ms per 2048 x 768 kernel (docs/benchmarks.md).
        db = _dot(transposed_copy(a), g, 0)
        return _dot(g, b, 1).astype(a.dtype), db.astype(b.dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_f32_einsum.defvjp(_f32_einsum_fwd, _f32_einsum_bwd)
_MATMUL = "nk,km->nm"


def accumulating_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` accumulated in at least float32; the result is float32
    for bfloat16/float16 operands (cast it back where the layer's dtype is wanted).

    With both operands in :data:`LOW_PRECISION`, forward and backward products take
    the operands in that dtype and accumulate in float32
    (``preferred_element_type=float32``): XLA:CPU runs these on the matrix units
    (AMX, AVX-512 BF16), where a product that writes bfloat16 runs several times slower.
    ``spec`` is explicit (``"nk,km->nm"``) and every index of each operand appears in
    the output or the other operand (true of matmuls and attention).

    Example:
        >>> from nnjax.layers.base import accumulating_einsum
        >>> a = jnp.ones((2, 3), jnp.bfloat16)
        >>> accumulating_einsum("nk,km->nm", a, jnp.ones((3, 4), jnp.bfloat16)).dtype
        dtype('float32')
    """
    if jnp.result_type(a) in LOW_PRECISION and jnp.result_type(b) == jnp.result_type(a):
        return _f32_einsum(spec, a, b)
    acc = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=acc)


@jax.custom_vjp
def _low_precision_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + jax.lax.broadcast_to_rank(bias.astype(y.dtype), y.ndim)


def _low_precision_bias_fwd(y, bias):
    return _low_precision_bias(y, bias), bias


def _low_precision_bias_bwd(bias, g):
    # Summed in float32: XLA:CPU reduces a bfloat16 cotangent with a windowed
    # reduction (several times slower than the float32 sum) and rounds the sum.
    axes = tuple(range(g.ndim - 1))
    return g, jnp.sum(g.astype(jnp.float32), axis=axes).astype(bias.dtype)


_low_precision_bias.defvjp(_low_precision_bias_fwd, _low_precision_bias_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` for ``y (..., features)`` and ``bias (features,)``, in ``y``'s dtype.

    For a bfloat16/float16 ``y`` the bias gradient is summed in float32 (and comes back
    in the bias' own dtype), not in ``y``'s dtype: more accurate, and on XLA:CPU several
    times faster (``docs/benchmarks.md``).

    Example:
        >>> from nnjax.layers.base import add_bias
        >>> add_bias(jnp.ones((2, 3), jnp.bfloat16), jnp.arange(3.0)).dtype
        dtype(bfloat16)
    """
    if jnp.result_type(y) in LOW_PRECISION:
        return _low_precision_bias(y, bias)
    return y + jax.lax.broadcast_to_rank(bias.astype(y.dtype), y.ndim)


def compute_dtype(x: Any, dtype: Any, param_dtype: Any = jnp.float32) -> Any:
    """The dtype a layer computes in: ``dtype`` if given, else a float input's own dtype.

    So a bfloat16 input stays bfloat16 through float32 params, as the contract
    asks; integer inputs (token ids) compute in ``param_dtype``.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    x_dtype = jnp.result_type(x)
    return x_dtype if jnp.issubdtype(x_dtype, jnp.floating) else jnp.dtype(param_dtype)


def matmul_last(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x (..., in)``, ``w (in, out)``, computed on ``x`` flattened to 2D.

    XLA:CPU runs the weight gradient of a matmul over several leading axes (two
    contracting axes) 2.4x slower than over one (fwd+bwd of a 128-512-128 MLP on
    ``(12, 64, 128)``: 8.1 ms vs 3.3 ms); merging the leading axes is a bitcast on
    every backend, so it is done everywhere. bfloat16/float16 operands accumulate in
    float32 (:func:`accumulating_einsum`); the result is in ``x``'s dtype.
    """
    if jnp.result_type(x) in LOW_PRECISION and jnp.result_type(w) == jnp.result_type(x):
        x2 = jnp.reshape(x, (-1, x.shape[-1]))
        y = accumulating_einsum(_MATMUL, x2, w).astype(x.dtype)
        return jnp.reshape(y, (*x.shape[:-1], w.shape[-1]))
    if x.ndim <= 2:
        return x @ w
    return jnp.reshape(jnp.reshape(x, (-1, x.shape[-1])) @ w, (*x.shape[:-1], w.shape[-1]))
