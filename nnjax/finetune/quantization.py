"""Quantized frozen kernels by path glob: int8 per output channel or 4-bit NF4 (QLoRA).

``nj.finetune.quantize(params, "**/kernel", bits=4)`` stores each selected kernel as
the ``kernel`` leaf in an integer dtype with its scales beside it in
``kernel_scale``, so every path (masks, sharding rules, checkpoints) stays what it
was; the layer dequantizes inside its matmul. The formats are
:mod:`nnjax.layers.quantized`'s:

- ``bits=8``: ``kernel`` int8 (the kernel's shape), ``kernel_scale (*stack, out)``
  float32, symmetric per output channel (``absmax / 127``).
- ``bits=4``: NF4 as QLoRA defines it: blocks of (at most) ``block_size`` consecutive
  values of each copy's row-major kernel, the last one zero-padded when the size does
  not divide (as bitsandbytes pads it), ``kernel_scale (*stack, ceil(size /
  block_size))`` their absmax, codes packed two per byte (first in the high nibble):
  ``kernel`` uint8 ``(*stack, ..., ceil(out / 2))``; any kernel quantizes, an output
  head over an odd vocabulary too.

A quantized kernel is frozen: the trainer refuses a mask that trains it or its
scale. LoRA / DoRA / IA3 adapters sit on top of it (``add_lora`` after ``quantize``),
which is QLoRA.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, GlobError
from nnjax.core.paths import flatten, stack_depth, unflatten
from nnjax.finetune.masks import mask
from nnjax.layers import quantized

__all__ = ["quantize", "dequantize"]


def _sibling(path: str, name: str) -> str:
    parent = path.rpartition("/")[0]
    return f"{parent}/{name}" if parent else name


def _check_finite(path: str, kernel: Any) -> None:
    """An ArgumentError naming ``path`` and the first non-finite value's index."""
    finite = jnp.isfinite(kernel)
    if bool(jnp.all(finite)):
        return
    bad = np.argwhere(~np.asarray(finite))
    where = tuple(int(i) for i in bad[0])
    raise ArgumentError(
        f"quantize: {path!r} holds {len(bad)} non-finite value(s), the first "
        f"{np.asarray(kernel)[where]} at {list(where)}; fix or exclude it"
    )


def _streamed(kernel: Any, bits: int, depth: int, block_size: int) -> tuple[Any, Any]:
    """``quantized.quantize`` one copy of a stacked kernel at a time.

    Each copy's channels and NF4 blocks are its own, so the result is the one-shot
    result bit for bit, while the float temporaries (NF4's nearest-code search holds 16
    distances per value) are one copy's instead of the whole stack's.
    """
    if depth == 0:
        return quantized.quantize(kernel, bits, depth=0, block_size=block_size)
    qs, scales = [], []
    for i in range(np.shape(kernel)[0]):
        q, scale = _streamed(kernel[i], bits, depth - 1, block_size)
        qs.append(np.asarray(q))
        scales.append(np.asarray(scale))
    return jnp.asarray(np.stack(qs)), jnp.asarray(np.stack(scales))


def quantize(
    params: Any,
    include: str | Iterable[str] = "**/kernel",
    exclude: str | Iterable[str] = (),
    *,
    bits: int = 8,
    block_size: int = 64,
) -> Any:
    """``params`` with the selected kernels stored quantized (see the module docstring).

    Args:
        params: the params tree (float kernels).
        include: globs over logical paths; the ``kernel`` leaves they select are
            quantized (other leaves they select are left as they are).
        exclude: globs taken out of ``include`` (``"head/**"``).
        bits: 8 (int8 per output channel) or 4 (NF4, block-wise).
        block_size: the most values per NF4 block (``bits=4``); QLoRA uses 64.

    Returns:
        New params; the selected ``kernel`` leaves int8 / uint8 with a float32
        ``kernel_scale`` beside each. A stacked kernel is quantized one copy at a time
        (the temporaries are one layer's, not the stack's).

    Raises:
        ArgumentError: ``bits`` not 4 or 8, a ``block_size`` that is not an int >= 1, a
            kernel already quantized or holding a NaN or an infinity (named by path: a
            non-finite weight would turn its whole column or block into NaN).
        GlobError: a glob that matches nothing, a selection with no kernel in it, or
            one that takes only some copies of a stacked kernel (one array, one format).

    Example:
        >>> model = nj.serial(nj.Dense(64), jax.nn.relu, head=nj.Dense(10))
        >>> params, _ = model.init(key, jnp.zeros((1, 128)))
        >>> q = nj.finetune.quantize(params, "**/kernel", exclude="head/**", bits=4)
        >>> jax.tree.map(lambda a: (a.shape, str(a.dtype)), q["dense_0"])
        {'bias': ((64,), 'float32'), 'kernel': ((128, 32), 'uint8'), 'kernel_scale': ((128,), 'float32')}
    """
    if check_int(bits, "quantize: bits") not in (4, 8):
        raise ArgumentError(f"quantize: bits must be 4 or 8, got {bits!r}")
    bits = int(bits)
    block_size = check_int(block_size, "quantize: block_size")
    chosen = flatten(mask(params, include, exclude))
    flat = flatten(params)
    out = dict(flat)
    picked = []
    for path, m in chosen.items():
        if m is False or path.rpartition("/")[2] != "kernel":
            continue
        if m is not True:
            raise GlobError(
                f"quantize: the globs select only some copies of the stacked kernel {path!r} "
                f"({int(np.sum(m))} of {np.size(m)}); one array has one format"
            )
        kernel = flat[path]
        if quantized.is_quantized(kernel) or _sibling(path, quantized.SCALE) in flat:
            raise ArgumentError(f"quantize: {path!r} is already quantized")
        depth = stack_depth(path)
        if np.ndim(kernel) - depth < 2:
            continue  # not a layer kernel
        _check_finite(path, kernel)
        q, scale = _streamed(kernel, bits, depth, block_size)
        out[path], out[_sibling(path, quantized.SCALE)] = q, scale
        picked.append(path)
    if not picked:
        raise GlobError(
            f"quantize: include {include!r} (exclude {exclude!r}) selects no kernel with 2 or "
            "more axes per copy"
        )
    return unflatten(out)


def dequantize(params: Any, dtype: Any = jnp.float32) -> Any:
    """``params`` with every quantized kernel back in float (``dtype``) and no ``kernel_scale``.

    Dequantizing loses what quantizing rounded off: ``dequantize(quantize(p))`` is
    the kernel the quantized model computes with, not ``p``.

    Example:
        >>> params = {"dense": {"kernel": jnp.array([[0.5, -1.0], [0.25, 2.0]])}}
        >>> q = nj.finetune.quantize(params, "dense/kernel", bits=8)
        >>> q["dense"]["kernel"].tolist()  # scales: absmax / 127 per column
        [[127, -64], [64, 127]]
        >>> np.asarray(nj.finetune.dequantize(q)["dense"]["kernel"], np.float64).round(3).tolist()
        [[0.5, -1.008], [0.252, 2.0]]
    """
    flat = flatten(params)
    out = {}
    for path, value in flat.items():
        if path.rpartition("/")[2] == quantized.SCALE:
            continue
        scale = flat.get(_sibling(path, quantized.SCALE))
        if path.rpartition("/")[2] == "kernel" and scale is not None:
            value = quantized.dequantize(value, scale, dtype)
        out[path] = value
    return unflatten(out)
