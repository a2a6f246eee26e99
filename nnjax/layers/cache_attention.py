"""Attention of a decode step over the filled part of its KV cache only.

A decode step's query attends to the cache's slots ``0 .. filled - 1``; the cache is
allocated for the whole generation (prompt plus every new token), so reading all of it
reads, on average over a generation, twice the keys and values that exist. Here the
cache is read one block of slots at a time, up to the last filled block (a loop whose
length is traced: ``ceil(filled / block)``), with an online softmax in float32, so a
step's cost grows with the tokens so far, not with the cache's size. The result is the
einsum path's softmax over the same masks (causal, window, segments, padding; a query
that sees no key gets the mean of all the cache's values, as the einsum path's uniform
softmax over masked logits gives).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.layers.base import accumulating_einsum

__all__ = ["filled_cache_attention", "CACHE_BLOCK"]

CACHE_BLOCK = 256
"""Slots per block read by :func:`filled_cache_attention`."""


def filled_cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    filled: Any,
    q_index: jax.Array,
    q_segments: Any,
    kv_segments: Any,
    pad: Any,
    causal: bool,
    window: int | None,
    scale: float | None,
    softcap: float | None,
    dtype: Any,
    block: int = CACHE_BLOCK,
) -> jax.Array:
    """``softmax(mask(cap(scale * q k^T))) v`` over the cache slots ``[0, filled)``.

    Args:
        q: ``(N, T_q, H, hd)`` queries at slots ``q_index (T_q,)``.
        k, v: ``(N, S, KV, hd)``: the whole cache, ``H % KV == 0``.
        filled: traced int: slots from ``filled`` on are never read.
        q_segments, kv_segments: ``(N, T_q)``, ``(N, S)`` int segment ids (a key is seen
            when they are equal and nonzero), or both ``None``.
        pad: ``(N, S)`` bool, True = attend, or ``None``.
        causal, window: key ``j`` is seen from query ``i`` when ``j <= i`` and
            ``j > i - window``.
        scale: the logits' scale (``None``: ``1 / sqrt(hd)``); softcap: ``cap *
            tanh(logits / cap)`` or ``None``.
        dtype: the output dtype (the value products take ``v`` in it).

    Returns:
        ``(N, T_q, H, hd)`` in ``dtype``.

    Example:
        >>> from nnjax.layers.cache_attention import filled_cache_attention
        >>> q, kv = jnp.ones((1, 1, 2, 4)), jnp.ones((1, 8, 1, 4))
        >>> y = filled_cache_attention(q, kv, kv, filled=jnp.array(3), q_index=jnp.array([2]),
        ...     q_segments=None, kv_segments=None, pad=None, causal=True, window=None,
        ...     scale=None, softcap=None, dtype=jnp.float32)
        >>> y.shape
        (1, 1, 2, 4)
    """
    n, t_q, h, hd = q.shape
    slots, kv = k.shape[1], k.shape[2]
    block = min(block, slots)
    acc = jnp.promote_types(dtype, jnp.float32)
    factor = float(1.0 / np.sqrt(hd) if scale is None else scale)
    qg = jnp.reshape(q, (n, t_q, kv, h // kv, hd))

    def body(j, carry):
        m, total, out = carry
        start = jnp.minimum(j * block, slots - block)  # the last block may start earlier
        idx = start + jnp.arange(block)
        k_j = jax.lax.dynamic_slice_in_dim(k, start, block, axis=1)
        v_j = jax.lax.dynamic_slice_in_dim(v, start, block, axis=1)
        seen = (idx >= j * block) & (idx < filled)  # not read by an earlier block; written
        seen = jnp.broadcast_to(seen[None, None, :], (n, t_q, block))
        if causal:
            seen = seen & (idx[None, None, :] <= q_index[None, :, None])
        if window is not None:
            seen = seen & (idx[None, None, :] > q_index[None, :, None] - window)
        if q_segments is not None:
            ks = jax.lax.dynamic_slice_in_dim(kv_segments, start, block, axis=1)
            seen = seen & (q_segments[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
        if pad is not None:
            seen = seen & jax.lax.dynamic_slice_in_dim(pad, start, block, axis=1)[:, None, :]
        s = accumulating_einsum("nqkgd,nskd->nkgqs", qg, k_j).astype(acc) * factor
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(seen[:, None, None], s, -jnp.inf)  # (N, KV, G, T_q, block)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        total = total * corr + jnp.sum(p, axis=-1)
        pv = accumulating_einsum("nkgqs,nskd->nkgqd", p.astype(dtype), v_j.astype(dtype))
        return m_new, total, out * corr[..., None] + pv.astype(acc)

    shape = (n, kv, h // kv, t_q)
    init = (
        jnp.full(shape, -jnp.inf, acc),
        jnp.zeros(shape, acc),
        jnp.zeros((*shape, hd), acc),
    )
    blocks = (jnp.asarray(filled, jnp.int32) + block - 1) // block
    _, total, out = jax.lax.fori_loop(0, blocks, body, init)
    seen_any = total > 0
    y = out / jnp.where(seen_any, total, 1.0)[..., None]  # (N, KV, G, T_q, hd)

    def mean_of_all():  # the einsum path's uniform softmax over a fully masked row
        mean = jnp.mean(v.astype(acc), axis=1)  # (N, KV, hd)
        return jnp.broadcast_to(mean[:, :, None, None, :], y.shape)

    fallback = jax.lax.cond(jnp.all(seen_any), lambda: jnp.zeros_like(y), mean_of_all)
    y = jnp.where(seen_any[..., None], y, fallback)
    y = jnp.transpose(y, (0, 3, 1, 2, 4))  # (N, T_q, KV, G, hd)
    return jnp.reshape(y, (n, t_q, h, hd)).astype(dtype)
