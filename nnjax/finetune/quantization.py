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

- token tables (``embeddings=``, e.g. ``"tok_embed/embedding"``): ``embedding``
  int8 ``(vocab, features)`` with ``embedding_scale (vocab,)`` float32, symmetric per
  row (``absmax / 127``); the lookup and a tied output head
  (:func:`nnjax.layers.embed.attend`) read it.

The computation streams: leaf by leaf, one stacked copy at a time, and each copy in
chunks of about 65,536 values, so no float temporary is more than a few MB whatever
the kernel's size (NF4's nearest-code search holds 16 distances per value: done at
once on a 545 MB table it would need 8.7 GB); the result is the one-shot result bit
for bit. :class:`Quantization` names one such choice, so
``nj.models.hf.from_pretrained(path, quantize=Quantization(...))`` can quantize each
tensor as it is read.

A quantized kernel is frozen: the trainer refuses a mask that trains it or its
scale. LoRA / DoRA / IA3 adapters sit on top of it (``add_lora`` after ``quantize``),
which is QLoRA.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, GlobError
from nnjax.core.paths import flatten, stack_depth, unflatten
from nnjax.finetune.masks import mask
from nnjax.layers import quantized

__all__ = ["Quantization", "quantize", "dequantize", "quantize_leaf"]

CHUNK = 1 << 16
"""Values per chunk of a streamed quantization (their float temporaries: a few MB)."""

Globs = str | Iterable[str]


class Quantization(NamedTuple):
    """Which leaves :func:`quantize` stores quantized, and how: its arguments as one value.

    ``quantize(params, q)`` is ``quantize(params, q.include, q.exclude, bits=q.bits,
    block_size=q.block_size, embeddings=q.embeddings)``; ``from_pretrained(path,
    quantize=q)`` gives the same leaves bit for bit, quantizing each tensor as it is read.

    Attributes:
        include: globs over logical paths; the ``kernel`` leaves they select are quantized.
        exclude: globs taken out of ``include`` (``"lm_head/**"``).
        bits: 8 (int8 per output channel) or 4 (NF4 in blocks of ``block_size``).
        block_size: the most values per NF4 block; QLoRA uses 64.
        embeddings: globs of token tables (``embedding`` leaves, ``(vocab, features)``)
            stored int8 per row whatever ``bits`` is; ``()``: none.

    Example:
        >>> q = nj.finetune.Quantization("blocks/**/kernel", bits=4, embeddings="tok_embed/embedding")
        >>> q.bits, q.block_size
        (4, 64)
    """

    include: Globs = "**/kernel"
    exclude: Globs = ()
    bits: int = 8
    block_size: int = 64
    embeddings: Globs = ()

    def checked(self, where: str = "quantize") -> Quantization:
        """Itself with ``bits`` and ``block_size`` checked (an ArgumentError naming them)."""
        if check_int(self.bits, f"{where}: bits") not in (4, 8):
            raise ArgumentError(f"{where}: bits must be 4 or 8, got {self.bits!r}")
        check_int(self.block_size, f"{where}: block_size")
        for name in ("include", "exclude", "embeddings"):
            globs = getattr(self, name)
            items = [globs] if isinstance(globs, str) else globs
            if not isinstance(items, Iterable) or not all(isinstance(g, str) for g in items):
                raise ArgumentError(f"{where}: {name} must be a glob or globs, got {globs!r}")
        return self._replace(bits=int(self.bits), block_size=int(self.block_size))

    def plan(self, params: Any, where: str = "quantize") -> dict[str, str]:
        """``{path: "kernel" | "embedding"}``: the leaves of ``params`` (arrays or
        ``ShapeDtypeStruct``s) this quantizes, in their order.

        Raises:
            GlobError: a glob that matches nothing, a selection with nothing to quantize,
                one that takes only some copies of a stacked kernel.
        """
        flat = flatten(params)
        kernels = flatten(mask(params, self.include, self.exclude)) if _any(self.include) else {}
        tables = flatten(mask(params, self.embeddings)) if _any(self.embeddings) else {}
        out = {}
        for path in flat:
            leaf = path.rpartition("/")[2]
            m = tables.get(path, False) if leaf == "embedding" else kernels.get(path, False)
            if m is False or leaf not in ("kernel", "embedding"):
                continue
            if m is not True:
                raise GlobError(
                    f"{where}: the globs select only some copies of the stacked {leaf} {path!r} "
                    f"({int(np.sum(m))} of {np.size(m)}); one array has one format"
                )
            if quantized.is_quantized(flat[path]) or _sibling(path, f"{leaf}_scale") in flat:
                raise ArgumentError(f"{where}: {path!r} is already quantized")
            rank = np.ndim(flat[path]) - stack_depth(path)
            if leaf == "kernel" and rank >= 2:
                out[path] = "kernel"
            elif leaf == "embedding" and rank == 2 and not stack_depth(path):
                out[path] = "embedding"
        if not out:
            raise GlobError(
                f"{where}: include {self.include!r} (exclude {self.exclude!r}) and embeddings "
                f"{self.embeddings!r} select no kernel with 2 or more axes per copy and no "
                "2-axis token table"
            )
        return out


def _any(globs: Globs) -> bool:
    return bool(globs) if isinstance(globs, str) else bool(list(globs))


def _sibling(path: str, name: str) -> str:
    parent = path.rpartition("/")[0]
    return f"{parent}/{name}" if parent else name


def scale_path(path: str) -> str:
    """The scale leaf beside the quantized leaf at ``path`` (``kernel`` -> ``kernel_scale``)."""
    return f"{path}_scale"


def _check_finite(path: str, w: np.ndarray) -> None:
    """An ArgumentError naming ``path`` and the first non-finite value's index (chunked)."""
    flat = w.reshape(-1)
    bad, first = 0, None
    for start in range(0, flat.size, 16 * CHUNK):
        finite = np.isfinite(flat[start : start + 16 * CHUNK])
        if finite.all():
            continue
        hits = np.flatnonzero(~finite)
        bad += hits.size
        first = start + int(hits[0]) if first is None else first
    if first is not None:
        where = [int(i) for i in np.unravel_index(first, w.shape)]
        raise ArgumentError(
            f"quantize: {path!r} holds {bad} non-finite value(s), the first "
            f"{flat[first]} at {where}; fix or exclude it"
        )


def _int8_kernel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 per output channel of one copy ``(..., out)``, in chunks of rows."""
    rows = w.reshape(-1, w.shape[-1])
    step = max(1, CHUNK // rows.shape[1])
    amax = jnp.zeros(rows.shape[1], jnp.float32)  # |w| >= 0: max(0, m) is m
    for r in range(0, rows.shape[0], step):
        m = jnp.max(jnp.abs(jnp.asarray(rows[r : r + step], jnp.float32)), axis=0)
        amax = jnp.maximum(amax, m)
    scale = amax / 127.0
    q = np.empty(rows.shape, np.int8)
    for r in range(0, rows.shape[0], step):
        q[r : r + step] = quantized.int8_codes(jnp.asarray(rows[r : r + step]), scale[None])
    return q.reshape(w.shape), np.asarray(scale)


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 per row of a table ``(rows, features)``, in chunks of rows."""
    step = max(1, CHUNK // w.shape[1])
    q, scale = np.empty(w.shape, np.int8), np.empty(w.shape[0], np.float32)
    for r in range(0, w.shape[0], step):
        s = quantized.row_scale(jnp.asarray(w[r : r + step]))
        q[r : r + step] = quantized.int8_codes(jnp.asarray(w[r : r + step]), s[:, None])
        scale[r : r + step] = s
    return q, scale


def _nf4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NF4 of one copy, whole blocks at a time (the chunk padded with zero blocks so
    every chunk has one shape: one compilation)."""
    flat = w.reshape(-1)
    size = flat.size
    n, length = quantized.nf4_blocks(size, block_size)
    per = max(1, CHUNK // length)  # blocks per chunk
    codes, scale = np.empty(size, np.uint8), np.empty(n, np.float32)
    for b in range(0, n, per):
        e = min(b + per, n)
        lo, hi = b * length, min(e * length, size)
        chunk = np.zeros(per * length, np.float32)
        chunk[: hi - lo] = flat[lo:hi]
        c, s = quantized.nf4_codes(jnp.asarray(chunk.reshape(per, length)))
        codes[lo:hi] = np.asarray(c).reshape(-1)[: hi - lo]
        scale[b:e] = np.asarray(s)[: e - b]
    return quantized.pack_nf4(codes.reshape(w.shape), scale, 0)


def quantize_leaf(
    value: Any, kind: str, bits: int, block_size: int, depth: int = 0, path: str = "value"
) -> tuple[jax.Array, jax.Array]:
    """``(quantized leaf, its scale)`` of one float leaf, streamed: one stacked copy at a
    time, each in chunks of :data:`CHUNK` values; bit for bit the one-shot
    ``nnjax.layers.quantized.quantize`` (``kind="kernel"``) or ``quantize_rows``
    (``kind="embedding"``).

    Args:
        value: ``(*stack, ..., out)`` float (NumPy or jax; read through a NumPy view).
        kind: ``"kernel"`` (``bits`` as :func:`quantize`) or ``"embedding"`` (int8 rows).
        bits, block_size: as :func:`quantize`.
        depth: the number of stacked axes in front.
        path: named in the error.

    Returns:
        ``kind="kernel"``: as :func:`nnjax.layers.quantized.quantize`; ``"embedding"``:
        int8 ``(rows, features)`` and float32 scales ``(rows,)``.

    Raises:
        ArgumentError: a NaN or an infinity in ``value`` (named by ``path`` and index).

    Example:
        >>> w = jax.random.normal(key, (2, 96, 40))  # two stacked copies
        >>> q, scale = nj.finetune.quantize_leaf(w, "kernel", 4, 64, depth=1)
        >>> q.shape, q.dtype, scale.shape
        ((2, 96, 20), dtype('uint8'), (2, 60))
    """
    host = np.asarray(value)  # a view of a CPU array, not a copy
    _check_finite(path, host)
    one = (
        _int8_rows
        if kind == "embedding"
        else _int8_kernel
        if bits == 8
        else lambda w: _nf4(w, block_size)
    )
    if depth == 0:
        q, scale = one(host)
        return jnp.asarray(q), jnp.asarray(scale)
    stack = host.shape[:depth]
    qs = scales = None
    for index in np.ndindex(*stack):
        q, scale = one(host[index])
        if qs is None or scales is None:
            qs = np.empty((*stack, *q.shape), q.dtype)
            scales = np.empty((*stack, *scale.shape), scale.dtype)
        qs[index], scales[index] = q, scale
    return jnp.asarray(qs), jnp.asarray(scales)


def quantize(
    params: Any,
    include: Globs | Quantization = "**/kernel",
    exclude: Globs = (),
    *,
    bits: int = 8,
    block_size: int = 64,
    embeddings: Globs = (),
) -> Any:
    """``params`` with the selected kernels (and token tables) stored quantized (see the
    module docstring).

    Args:
        params: the params tree (float kernels).
        include: globs over logical paths; the ``kernel`` leaves they select are
            quantized (other leaves they select are left as they are); ``()``: none.
            Or a :class:`Quantization`, which then gives every argument.
        exclude: globs taken out of ``include`` (``"head/**"``).
        bits: 8 (int8 per output channel) or 4 (NF4, block-wise).
        block_size: the most values per NF4 block (``bits=4``); QLoRA uses 64.
        embeddings: globs of token tables (``"tok_embed/embedding"``) to store as int8
            rows (``embedding`` int8 ``(vocab, features)``, ``embedding_scale (vocab,)``),
            whatever ``bits`` is.

    Returns:
        New params; the selected ``kernel`` leaves int8 / uint8 with a float32
        ``kernel_scale`` beside each, the selected tables int8 with ``embedding_scale``.
        Streamed: beyond ``params`` and the result, memory holds a few MB of
        temporaries (one chunk of one copy).

    Raises:
        ArgumentError: ``bits`` not 4 or 8, a ``block_size`` that is not an int >= 1, a
            leaf already quantized or holding a NaN or an infinity (named by path: a
            non-finite weight would turn its whole column or block into NaN).
        GlobError: a glob that matches nothing, a selection with nothing to quantize in
            it, or one that takes only some copies of a stacked kernel (one array, one
            format).

    Example:
        >>> model = nj.serial(nj.Dense(64), jax.nn.relu, head=nj.Dense(10))
        >>> params, _ = model.init(key, jnp.zeros((1, 128)))
        >>> q = nj.finetune.quantize(params, "**/kernel", exclude="head/**", bits=4)
        >>> jax.tree.map(lambda a: (a.shape, str(a.dtype)), q["dense_0"])
        {'bias': ((64,), 'float32'), 'kernel': ((128, 32), 'uint8'), 'kernel_scale': ((128,), 'float32')}
    """
    given = Quantization(exclude=exclude, bits=bits, block_size=block_size, embeddings=embeddings)
    if isinstance(include, Quantization) and given != Quantization():
        raise ArgumentError("quantize: a Quantization gives every argument; pass it alone")
    spec = include if isinstance(include, Quantization) else given._replace(include=include)
    spec = spec.checked()
    plan = spec.plan(params)
    out = dict(flatten(params))
    for path, kind in plan.items():
        q, scale = quantize_leaf(
            out[path], kind, spec.bits, spec.block_size, stack_depth(path), path
        )
        out[path], out[scale_path(path)] = q, scale
    return unflatten(out)


def dequantize(params: Any, dtype: Any = jnp.float32) -> Any:
    """``params`` with every quantized kernel and token table back in float (``dtype``)
    and no ``kernel_scale`` / ``embedding_scale``.

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
        leaf = path.rpartition("/")[2]
        if leaf in (quantized.SCALE, quantized.ROW_SCALE) and path[: -len("_scale")] in flat:
            continue
        scale = flat.get(scale_path(path))
        if leaf == "kernel" and scale is not None:
            value = quantized.dequantize(value, scale, dtype)
        elif leaf == "embedding" and scale is not None:
            value = quantized.dequantize_rows(value, scale, dtype)
        out[path] = value
    return unflatten(out)
