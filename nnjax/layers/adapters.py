"""The adapter table: every kind of adapter a kernel can carry, written once.

An adapter is a few leaves beside a kernel (``.../query/kernel`` gets
``.../query/lora_a``). Every layer with a ``kernel`` (Dense and so the attention
projections, Conv, ConvTranspose, the recurrent cells' input kernel) views it, per
copy, as a matrix ``(in, out)``: ``out`` its last axis, ``in`` the product of the
others (a Conv kernel ``(3, 3, 16, 32)`` is ``(144, 32)``), and applies the adapters
it finds in the order of :data:`ADAPTERS`. Fine-tuning (``nj.finetune.add_*``,
``merge_*``, save/load) and the tensor-parallel presets read the same table, so a
new adapter is one entry here.

Shapes are written over the axis names ``in``, ``out`` (the kernel's matrix view)
and ``r`` (the rank): LoRA's ``lora_a`` is ``("in", "r")``. A stacked kernel
(inside ``nj.repeat``) has its adapters stacked the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import shape_str
from nnjax.core.errors import LayerError
from nnjax.kernels import small_matmul
from nnjax.layers import quantized
from nnjax.layers.base import matmul_last

__all__ = [
    "AdapterKind",
    "ADAPTERS",
    "ADAPTER_KEYS",
    "KERNEL_KEYS",
    "adapted_matmul",
    "adapted_kernel",
    "kernel_shape",
    "check_adapters",
    "leaf_shape",
]

_HIGHEST = jax.lax.Precision.HIGHEST

Leaves = dict[str, jax.Array]


class AdapterKind(NamedTuple):
    """One kind of adapter.

    Attributes:
        leaves: ``{leaf name: per-copy shape over "in", "out", "r"}``.
        create: ``create(key, w, rank, alpha, a_init) -> {leaf: value}``: the leaves
            for the matrix ``w (*stack, in, out)`` (float32) that leave the layer's
            output unchanged.
        weight: ``weight(w, leaves) -> w'``: the adapted matrix ``(..., in, out)``.
        output: ``output(y, x, leaves) -> y'`` for ``y = x @ w``: the same on the
            outputs without forming ``w'`` (cheaper for a matmul), or None.
        merge: ``merge(group) -> group``: ``group`` holds ``kernel (*stack, in, out)``
            (float32) and the adapter leaves beside it; the result has this kind
            folded into ``kernel`` and its leaves removed, outputs unchanged.
    """

    leaves: Mapping[str, tuple[str, ...]]
    create: Callable[..., Leaves]
    weight: Callable[[jax.Array, Mapping[str, Any]], jax.Array]
    output: Callable[[jax.Array, jax.Array, Mapping[str, Any]], jax.Array] | None
    merge: Callable[[Mapping[str, Any]], Leaves]


def _col_norm(w: jax.Array) -> jax.Array:
    """Column norms ``(..., out)`` of ``w (..., in, out)``, summed in float32."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


def _lora_create(key, w, rank, alpha, a_init):
    *stack, n_in, n_out = w.shape
    a = a_init(key, (*stack, n_in, rank), w.dtype) * jnp.asarray(alpha / rank, w.dtype)
    return {"lora_a": a, "lora_b": jnp.zeros((*stack, rank, n_out), w.dtype)}


def _lora_weight(w, leaves):
    a, b = leaves["lora_a"].astype(w.dtype), leaves["lora_b"].astype(w.dtype)
    return w + jnp.matmul(a, b, precision=_HIGHEST)


def _lora_output(y, x, leaves):
    # (x @ A) @ B never forms the full-size weight gradient of the kernel.
    return y + (x @ leaves["lora_a"].astype(y.dtype)) @ leaves["lora_b"].astype(y.dtype)


def _lora_merge(group):
    group = dict(group)
    group["kernel"] = _lora_weight(group["kernel"], group)
    del group["lora_a"], group["lora_b"]
    return group


def _dora_create(key, w, rank, alpha, a_init):
    return {**_lora_create(key, w, rank, alpha, a_init), "dora_magnitude": _col_norm(w)}


def _dora_weight(w, leaves):
    m = leaves["dora_magnitude"].astype(w.dtype)
    return w * (m / _col_norm(w).astype(w.dtype))[..., None, :]


def _dora_merge(group):
    # DoRA normalises kernel + a @ b: the LoRA pair is folded with it.
    group = _lora_merge(group) if "lora_a" in group else dict(group)
    group["kernel"] = _dora_weight(group["kernel"], group)
    del group["dora_magnitude"]
    return group


def _ia3_create(key, w, rank, alpha, a_init):
    del key, rank, alpha, a_init
    return {"ia3_scale": jnp.ones((*w.shape[:-2], w.shape[-1]), w.dtype)}


def _ia3_weight(w, leaves):
    return w * leaves["ia3_scale"].astype(w.dtype)[..., None, :]


def _ia3_output(y, x, leaves):
    del x
    return y * jax.lax.broadcast_to_rank(leaves["ia3_scale"].astype(y.dtype), y.ndim)


def _ia3_merge(group):
    # (x @ W) * s == x @ (W * s): scale the columns of what forms the output: the
    # DoRA magnitude if there is one (it sets the column norms), else the kernel
    # and a LoRA's lora_b.
    group = dict(group)
    s = group.pop("ia3_scale")
    for name in ["dora_magnitude"] if "dora_magnitude" in group else ["kernel", "lora_b"]:
        if name in group:
            col = s if name == "dora_magnitude" else s[..., None, :]
            group[name] = group[name] * col
    return group


ADAPTERS: dict[str, AdapterKind] = {
    # y = x @ kernel + (x @ lora_a) @ lora_b; alpha / r is folded into lora_a at
    # creation, lora_b starts at 0.
    "lora": AdapterKind(
        {"lora_a": ("in", "r"), "lora_b": ("r", "out")},
        _lora_create,
        _lora_weight,
        _lora_output,
        _lora_merge,
    ),
    # W' = kernel (+ lora_a @ lora_b), each column normalised and scaled by the
    # magnitude; it starts at the kernel's column norms.
    "dora": AdapterKind(
        {"dora_magnitude": ("out",)}, _dora_create, _dora_weight, None, _dora_merge
    ),
    # y = (x @ kernel) * ia3_scale; starts at 1.
    "ia3": AdapterKind({"ia3_scale": ("out",)}, _ia3_create, _ia3_weight, _ia3_output, _ia3_merge),
}
"""The adapter kinds, in the order a layer applies them (and ``merge_adapters`` folds them)."""

ADAPTER_KEYS: tuple[str, ...] = tuple(n for kind in ADAPTERS.values() for n in kind.leaves)
"""Every adapter leaf name."""

KERNEL_KEYS: tuple[str, ...] = (*ADAPTER_KEYS, quantized.SCALE)
"""The optional leaves a layer with a ``kernel`` accepts beside it: adapters and the
quantization scale (see :mod:`nnjax.layers.quantized`)."""


def leaf_shape(name: str, n_in: int, n_out: int, rank: int) -> tuple[int, ...]:
    """The per-copy shape of the adapter leaf ``name`` beside an ``(n_in, n_out)`` kernel."""
    shape = next(kind.leaves[name] for kind in ADAPTERS.values() if name in kind.leaves)
    return tuple({"in": n_in, "out": n_out, "r": rank}[d] for d in shape)


def _present(params: Mapping[str, Any]) -> list[AdapterKind]:
    return [kind for kind in ADAPTERS.values() if any(n in params for n in kind.leaves)]


def check_adapters(params: Mapping[str, Any], n_in: int, n_out: int) -> None:
    """Every adapter beside an ``(n_in, n_out)`` kernel is whole and has its shapes.

    Raises:
        LayerError: a leaf without its sibling (``lora_a`` without ``lora_b``), or a
            leaf whose shape does not fit the kernel (the rank taken from ``lora_a``).
    """
    names = [n for n in ADAPTER_KEYS if n in params]
    if not names:
        return
    rank = None
    for kind in _present(params):
        missing = [n for n in kind.leaves if n not in params]
        if missing:
            have = [n for n in kind.leaves if n in params]
            want = ", ".join(f"{n} {_symbolic(s)}" for n, s in kind.leaves.items())
            raise LayerError(f"adapter param(s) {have} without {missing}: the adapter needs {want}")
    if "lora_a" in params:
        rank = int(np.shape(params["lora_a"])[-1]) if np.ndim(params["lora_a"]) else 0
    for n in names:
        want = leaf_shape(n, n_in, n_out, rank or 0)
        got = tuple(np.shape(params[n]))
        if got != want:
            sym = _symbolic(next(k.leaves[n] for k in ADAPTERS.values() if n in k.leaves))
            raise LayerError(
                f"expected adapter param {n!r} {sym} with shape {shape_str(want)} beside "
                f"kernel (in, out) == {shape_str((n_in, n_out))}"
                f"{f' and r == {rank} (from lora_a)' if 'r' in sym else ''}, got {shape_str(got)}"
            )


def _symbolic(shape: tuple[str, ...]) -> str:
    return f"({', '.join(shape)}{',' if len(shape) == 1 else ''})"


def _kernel(params: Mapping[str, Any], dtype: Any) -> jax.Array:
    """The kernel in ``dtype``, dequantized if a scale sits beside it."""
    if quantized.SCALE in params:
        return quantized.dequantize(params["kernel"], params[quantized.SCALE], dtype)
    return params["kernel"].astype(dtype)


def kernel_shape(params: Mapping[str, Any]) -> tuple[int, ...]:
    """The kernel's float shape (a packed 4-bit kernel stores half its last axis)."""
    return quantized.logical_shape(params["kernel"], params.get(quantized.SCALE))


def adapted_kernel(params: Mapping[str, Any], dtype: Any) -> jax.Array:
    """The kernel with every adapter beside it folded in, in ``dtype``, its own shape.

    For layers that do not multiply by the kernel as a matrix (convolutions).
    """
    kernel = _kernel(params, dtype)
    kinds = _present(params)
    if not kinds:
        return kernel
    check_adapters(params, math.prod(kernel.shape[:-1]), kernel.shape[-1])
    w = jnp.reshape(kernel, (-1, kernel.shape[-1]))
    for kind in kinds:
        w = kind.weight(w, params)
    return jnp.reshape(w, kernel.shape)


def adapted_matmul(params: Mapping[str, Any], x: jax.Array, dtype: Any) -> jax.Array:
    """``x @ kernel`` (``x (..., in)``, ``kernel (in, out)``) with the adapters beside it.

    Kinds up to the last one without an output form (DoRA) act on the weight; the
    rest act on the output (LoRA as ``(x @ a) @ b``, which never forms ``a @ b``).
    """
    kinds = _present(params)
    lead = x.shape[:-1]
    x = jnp.reshape(x, (-1, x.shape[-1])) if x.ndim > 2 else x  # see layers.base.matmul_last
    split = max((i + 1 for i, k in enumerate(kinds) if k.output is None), default=0)
    stored, scale = params["kernel"], params.get(quantized.SCALE)
    if split == 0 and jnp.dtype(dtype) == jnp.float32 and small_matmul.takes(x, stored, scale):
        # few rows (decoding): the stored kernel read once, dequantized in registers
        check_adapters(params, *kernel_shape(params))
        y = small_matmul.small_matmul(x, stored, scale)
    else:
        kernel = _kernel(params, dtype)
        check_adapters(params, *kernel.shape)
        for kind in kinds[:split]:
            kernel = kind.weight(kernel, params)
        y = matmul_last(x, kernel)
    for kind in kinds[split:]:
        assert kind.output is not None  # split is past the last kind without one
        y = kind.output(y, x, params)
    return jnp.reshape(y, (*lead, y.shape[-1]))
