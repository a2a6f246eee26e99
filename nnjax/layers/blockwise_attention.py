"""Blockwise (flash-style) attention: never holds the ``(T_q, T_kv)`` scores.

The queries are cut into blocks of ``block_q`` rows and the keys into blocks of
``block_k``; each query block loops over its key blocks with an online softmax (a
running maximum, normaliser and weighted sum in float32), so the largest temporary
is one ``(N, H, block_q, block_k)`` block of scores. Key blocks that a causal or
sliding-window mask hides entirely are never visited, and blocks it shows whole are
not masked (both worked out from the static shapes). The backward pass (a custom
VJP) recomputes each block's scores from the saved output and log-sum-exp instead
of storing them, so the memory of a training step is ``O(T * head_dim)`` per layer,
not ``O(T^2)``.

Grouped-query heads are handled by broadcast (each key/value head serves its group
of query heads; k and v are never repeated); bfloat16/float16 operands are
multiplied with float32 accumulation. A query whose keys are all masked gets the
mean of all values, as the einsum path gives.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import shape_str
from nnjax.core.errors import ArgumentError

__all__ = ["blockwise_attention", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 256
"""Default query and key block length (see docs/benchmarks.md for the measurement)."""


class _Config(NamedTuple):
    """The static part of a call (hashable: ``nondiff_argnums`` of the custom VJP)."""

    t_q: int
    t_kv: int
    block_q: int
    block_k: int
    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    segments: bool
    padded: bool  # a pad mask was given (no block can skip masking)


def _acc(x) -> Any:
    """The accumulation dtype for operands like ``x``: at least float32."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _bounds(c: _Config) -> tuple[np.ndarray, np.ndarray]:
    """For each query block, the first and one-past-last key block it can see."""
    n_q, n_k = -(-c.t_q // c.block_q), -(-c.t_kv // c.block_k)
    first_q = np.arange(n_q) * c.block_q
    last_q = np.minimum(first_q + c.block_q, c.t_q) - 1
    lo = np.zeros(n_q, np.int64)
    hi = np.full(n_q, n_k, np.int64)
    if c.causal:  # key j <= query i
        hi = np.minimum(hi, np.minimum(last_q, c.t_kv - 1) // c.block_k + 1)
    if c.window is not None:  # key j > query i - window
        lo = np.maximum(lo, (first_q - c.window + 1).clip(0) // c.block_k)
    hi = np.maximum(hi, lo)
    return lo.astype(np.int32), hi.astype(np.int32)


def _schedule(c: _Config) -> tuple[np.ndarray, ...]:
    """Per query block: ``lo, hi`` (the key blocks it can see, :func:`_bounds`) and
    ``full_lo, full_hi``: the blocks inside ``[lo, hi)`` that it sees whole (every query
    row sees every key), which need no mask. The others, ``[lo, full_lo)`` and
    ``[full_hi, hi)``, are masked. No block is whole with a pad mask or segments."""
    lo, hi = _bounds(c)
    full_lo, full_hi = hi.copy(), hi.copy()
    if c.padded or c.segments:
        return lo, hi, full_lo, full_hi
    n_q = len(lo)
    first_q = np.arange(n_q) * c.block_q
    last_q = np.minimum(first_q + c.block_q, c.t_q) - 1
    for i in range(n_q):
        j = np.arange(lo[i], hi[i])
        first_k, last_k = j * c.block_k, (j + 1) * c.block_k - 1
        whole = last_k < c.t_kv
        if c.causal:
            whole &= last_k <= first_q[i]
        if c.window is not None:
            whole &= first_k > last_q[i] - c.window
        if whole.any():  # whole blocks are contiguous: an intersection of intervals
            full_lo[i], full_hi[i] = j[whole][0], j[whole][-1] + 1
    return lo, hi, full_lo.astype(np.int32), full_hi.astype(np.int32)


def _visit(bounds, i, body, carry):
    """Run ``body(j, carry, masked)`` over query block ``i``'s key blocks (``bounds``:
    :func:`_schedule`'s four arrays): the masked ones, then the whole ones
    (``masked=False``)."""
    lo, hi, full_lo, full_hi = bounds
    before = full_lo[i] - lo[i]

    def masked(k, carry):
        j = jnp.where(k < before, lo[i] + k, full_hi[i] + k - before)
        return body(j, carry, True)

    n_masked = before + hi[i] - full_hi[i]
    carry = jax.lax.fori_loop(0, n_masked, masked, carry)
    return jax.lax.fori_loop(full_lo[i], full_hi[i], lambda j, c: body(j, c, False), carry)


def _block_mask(c: _Config, i, j, pad_j, qseg_i, kseg_j):
    """``(N, 1, 1, block_q, block_k)`` bool: which keys of block ``j`` each query of ``i`` sees."""
    q_pos = i * c.block_q + jnp.arange(c.block_q)
    k_pos = j * c.block_k + jnp.arange(c.block_k)
    ok = jnp.broadcast_to(k_pos[None, :] < c.t_kv, (c.block_q, c.block_k))
    if c.causal:
        ok = ok & (k_pos[None, :] <= q_pos[:, None])
    if c.window is not None:
        ok = ok & (k_pos[None, :] > q_pos[:, None] - c.window)
    mask = ok[None] & pad_j[:, None, :]  # (N, bq, bk)
    if c.segments:
        mask = mask & (qseg_i[:, :, None] == kseg_j[:, None, :]) & (kseg_j[:, None, :] != 0)
    return mask[:, None, None]


def _scores(c: _Config, q_i, k_j, mask):
    """Masked logits ``(N, KV, G, bq, bk)`` float32 and ``tanh`` of the cap (or None);
    ``mask`` None: a block seen whole."""
    s = jnp.einsum("nkgqd,nksd->nkgqs", q_i, k_j, preferred_element_type=_acc(q_i))
    s = s * c.scale
    t = None
    if c.softcap is not None:
        t = jnp.tanh(s / c.softcap)
        s = c.softcap * t
    return (s if mask is None else jnp.where(mask, s, -jnp.inf)), t


def _pv(p, v_j):
    """``p (N, KV, G, bq, bk) @ v_j (N, KV, bk, hd)``, float32."""
    n, kv, g, bq, bk = p.shape
    p2 = jnp.reshape(p.astype(v_j.dtype), (n, kv, g * bq, bk))
    y = jnp.einsum("nkqs,nksd->nkqd", p2, v_j, preferred_element_type=_acc(v_j))
    return jnp.reshape(y, (n, kv, g, bq, v_j.shape[-1]))


def _tn(a, b):
    """``a^T b`` over the merged ``(G, bq)`` rows: ``a (N, KV, G, bq, bk)``,
    ``b (N, KV, G, bq, hd)`` -> ``(N, KV, bk, hd)`` float32."""
    n, kv, g, bq, bk = a.shape
    a2 = jnp.reshape(a, (n, kv, g * bq, bk))
    b2 = jnp.reshape(b, (n, kv, g * bq, b.shape[-1]))
    return jnp.einsum("nkqs,nkqd->nksd", a2, b2, preferred_element_type=_acc(b))


def _forward(c: _Config, q, k, v, pad, qseg, kseg):
    """Blocked ``q (n_q, N, KV, G, bq, hd)``, ``k, v (n_k, N, KV, bk, hd)`` ->
    ``o`` like q (zero where no key is seen) and ``lse (n_q, N, KV, G, bq)`` (-inf there)."""
    bounds = [jnp.asarray(b) for b in _schedule(c)]

    def one_block(i):
        q_i = q[i]
        qseg_i = qseg[i] if c.segments else None

        def body(j, carry, masked):
            m, total, acc = carry
            mask = None
            if masked:
                mask = _block_mask(c, i, j, pad[j], qseg_i, kseg[j] if c.segments else None)
            s, _ = _scores(c, q_i, k[j], mask)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # a masked block can leave a row with no key yet (m_new = -inf)
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if masked else m_new
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            total = total * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + _pv(p, v[j])
            return m_new, total, acc

        shape = q_i.shape[:-1]
        init = (
            jnp.full(shape, -jnp.inf, _acc(q_i)),
            jnp.zeros(shape, _acc(q_i)),
            jnp.zeros(q_i.shape, _acc(q_i)),
        )
        m, total, acc = _visit(bounds, i, body, init)
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        o = acc / total[..., None]
        lse = jnp.where(seen, m + jnp.log(total), -jnp.inf)
        return o.astype(q.dtype), lse

    return jax.lax.map(one_block, jnp.arange(q.shape[0]))


def _backward(c: _Config, res, cotangents):
    q, k, v, pad, qseg, kseg, o, lse = res
    do, dlse = cotangents
    bounds = [jnp.asarray(b) for b in _schedule(c)]
    do = do.astype(q.dtype)
    delta = jnp.sum(do.astype(_acc(q)) * o.astype(_acc(q)), axis=-1) - dlse
    lse_b = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that saw no key: p = 0

    def one_block(carry, i):
        dk, dv = carry
        q_i, do_i, lse_i, delta_i = q[i], do[i], lse_b[i], delta[i]
        qseg_i = qseg[i] if c.segments else None

        def body(j, inner, masked):
            dq_i, dk, dv = inner
            mask = None
            if masked:
                mask = _block_mask(c, i, j, pad[j], qseg_i, kseg[j] if c.segments else None)
            s, t = _scores(c, q_i, k[j], mask)
            p = jnp.exp(s - lse_i[..., None])
            dv = dv.at[j].add(_tn(p.astype(q.dtype), do_i))
            dp = jnp.einsum("nkgqd,nksd->nkgqs", do_i, v[j], preferred_element_type=_acc(q_i))
            ds = p * (dp - delta_i[..., None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = (ds * c.scale).astype(q.dtype)
            dq_i = dq_i + jnp.einsum(
                "nkgqs,nksd->nkgqd", ds, k[j], preferred_element_type=_acc(q_i)
            )
            dk = dk.at[j].add(_tn(ds, q_i))
            return dq_i, dk, dv

        init = (jnp.zeros(q_i.shape, _acc(q)), dk, dv)
        dq_i, dk, dv = _visit(bounds, i, body, init)
        return (dk, dv), dq_i

    zeros = jnp.zeros(k.shape, _acc(k))
    (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros), jnp.arange(q.shape[0]))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c, q, k, v, pad, qseg, kseg):
    return _forward(c, q, k, v, pad, qseg, kseg)


def _flash_fwd(c, q, k, v, pad, qseg, kseg):
    o, lse = _forward(c, q, k, v, pad, qseg, kseg)
    return (o, lse), (q, k, v, pad, qseg, kseg, o, lse)


_flash.defvjp(_flash_fwd, _backward)


def _blocks(x, t_pad, block, fill=0):
    """``x (N, T, ...)`` padded to ``t_pad`` on axis 1, then ``(t_pad // block, N, block, ...)``."""
    n, t = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = jnp.reshape(x, (n, t_pad // block, block, *x.shape[2:]))
    return jnp.moveaxis(x, 1, 0)


def _check(q, k, v, pad, segments, kv_segments, block_q, block_k, window) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ArgumentError(
            "blockwise_attention: expected q (N, T_q, H, hd) and k, v (N, T_kv, KV, hd), got "
            f"q {shape_str(q.shape)}, k {shape_str(k.shape)}, v {shape_str(v.shape)}"
        )
    n, _, h, hd = q.shape
    if k.shape[0] != n or k.shape[3] != hd or h % k.shape[2]:
        raise ArgumentError(
            "blockwise_attention: expected k.shape == (N, T_kv, KV, hd) with N, hd as q's and "
            f"H % KV == 0, got q {shape_str(q.shape)}, k {shape_str(k.shape)}"
        )
    if pad is not None and tuple(pad.shape) != (n, k.shape[1]):
        raise ArgumentError(
            f"blockwise_attention: expected pad.shape == {shape_str((n, k.shape[1]))} (N, T_kv), "
            f"got pad.shape == {shape_str(pad.shape)}"
        )
    if (segments is None) != (kv_segments is None):
        raise ArgumentError("blockwise_attention: give both segments and kv_segments, or neither")
    if segments is not None and (
        tuple(segments.shape) != q.shape[:2] or tuple(kv_segments.shape) != k.shape[:2]
    ):
        raise ArgumentError(
            f"blockwise_attention: expected segments {shape_str(q.shape[:2])} and kv_segments "
            f"{shape_str(k.shape[:2])}, got {shape_str(segments.shape)} and "
            f"{shape_str(kv_segments.shape)}"
        )
    if block_q < 1 or block_k < 1 or (window is not None and window < 1):
        raise ArgumentError(
            f"blockwise_attention: block_q, block_k and window must be >= 1, got {block_q}, "
            f"{block_k}, {window}"
        )


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    pad: Any = None,
    segments: Any = None,
    kv_segments: Any = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> jax.Array:
    """``softmax(mask(cap(scale * q k^T))) v`` one block of scores at a time.

    Query ``i`` sees key ``j`` when ``pad[n, j]``; with ``causal``, ``j <= i`` (for
    ``T_q != T_kv`` aligned at the first position, as torch's ``is_causal``); with
    ``window``, ``j > i - window``; with segment ids, ``segments[n, i] ==
    kv_segments[n, j] != 0``. A query that sees no key gets the mean of all ``T_kv``
    values. Logits and the softmax are float32; the output has q's dtype.

    Args:
        q: ``(N, T_q, H, hd)`` queries.
        k, v: ``(N, T_kv, KV, hd)``, ``H % KV == 0`` (query heads ``g * H // KV ...``
            share key/value head ``g``).
        pad: ``(N, T_kv)`` bool, True = attend; ``None``: every key.
        segments, kv_segments: ``(N, T_q)``, ``(N, T_kv)`` int segment ids, or both None.
        causal: mask keys after the query.
        window: sliding window (Hugging Face's Mistral convention).
        scale: logits scale; ``None``: ``1 / sqrt(hd)``.
        softcap: logits ``softcap * tanh(logits / softcap)``; ``None``: none.
        block_q, block_k: block lengths (``T`` need not be a multiple).

    Returns:
        ``(N, T_q, H, hd)`` in q's dtype.

    Raises:
        ArgumentError: shapes that do not agree, blocks or window < 1.

    Example:
        >>> from nnjax.layers.blockwise_attention import blockwise_attention
        >>> q = jax.random.normal(key, (1, 300, 4, 16))
        >>> k = v = jax.random.normal(key, (1, 300, 2, 16))
        >>> y = blockwise_attention(q, k, v, causal=True, block_q=128, block_k=128)
        >>> y.shape
        (1, 300, 4, 16)
    """
    _check(q, k, v, pad, segments, kv_segments, block_q, block_k, window)
    n, t_q, h, hd = q.shape
    t_kv, kv = k.shape[1], k.shape[2]
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    block_q, block_k = min(block_q, t_q), min(block_k, t_kv)
    c = _Config(
        t_q,
        t_kv,
        block_q,
        block_k,
        causal,
        window,
        float(1.0 / np.sqrt(hd) if scale is None else scale),
        None if softcap is None else float(softcap),
        segments is not None,
        pad is not None,
    )
    tq_pad, tk_pad = -(-t_q // block_q) * block_q, -(-t_kv // block_k) * block_k
    g = h // kv
    # (n_q, N, bq, KV, G, hd) -> (n_q, N, KV, G, bq, hd): each block a batched matmul.
    qb = _blocks(jnp.reshape(q, (n, t_q, kv, g, hd)), tq_pad, block_q)
    qb = jnp.transpose(qb, (0, 1, 3, 4, 2, 5))
    kb = jnp.transpose(_blocks(k, tk_pad, block_k), (0, 1, 3, 2, 4))  # (n_k, N, KV, bk, hd)
    vb = jnp.transpose(_blocks(v, tk_pad, block_k), (0, 1, 3, 2, 4))
    pad = jnp.ones((n, t_kv), bool) if pad is None else jnp.asarray(pad, bool)
    padb = _blocks(pad, tk_pad, block_k, fill=False)
    qseg = kseg = jnp.zeros((1,), jnp.int32)  # unused placeholders
    if segments is not None:
        qseg = _blocks(jnp.asarray(segments, jnp.int32), tq_pad, block_q)
        kseg = _blocks(jnp.asarray(kv_segments, jnp.int32), tk_pad, block_k)
    o, lse = cast(tuple[jax.Array, jax.Array], _flash(c, qb, kb, vb, padb, qseg, kseg))
    mean = jnp.mean(v.astype(_acc(v)), axis=1)  # (N, KV, hd): for rows that saw no key
    o = jnp.where(jnp.isfinite(lse)[..., None], o, mean[None, :, :, None, None].astype(o.dtype))
    o = jnp.transpose(o, (1, 0, 4, 2, 3, 5))  # (N, n_q, bq, KV, G, hd)
    return jnp.reshape(o, (n, tq_pad, h, hd))[:, :t_q]
