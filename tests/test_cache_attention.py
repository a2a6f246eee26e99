"""A decode step's attention over the filled part of its KV cache, against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.layers.cache_attention import filled_cache_attention


def _numpy_attention(q, k, v, seen, scale, softcap):
    """float64 softmax attention; ``seen (N, T_q, S)``; a row that sees nothing averages all."""
    n, t_q, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(n, t_q, kv, h // kv, hd).astype(np.float64)
    s = np.einsum("nqkgd,nskd->nkgqs", qg, k.astype(np.float64)) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    mask = seen[:, None, None]
    s = np.where(mask, s, -np.inf)
    any_seen = mask.any(axis=-1, keepdims=True)
    s = np.where(any_seen, s, 0.0)  # a row that sees nothing: uniform over every slot
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w = np.where(mask | ~any_seen, w, 0.0)
    w /= w.sum(axis=-1, keepdims=True)
    y = np.einsum("nkgqs,nskd->nqkgd", w, v.astype(np.float64))
    return y.reshape(n, t_q, h, hd)


def _case(rng, n=2, slots=19, h=4, kv=2, hd=8):
    q = rng.standard_normal((n, 1, h, hd)).astype(np.float32)
    k = rng.standard_normal((n, slots, kv, hd)).astype(np.float32)
    v = rng.standard_normal((n, slots, kv, hd)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("block", [4, 8, 19, 256])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0)])
def test_equals_numpy_and_never_reads_past_the_filled_slots(block, window, softcap):
    rng = np.random.default_rng(block)
    q, k, v = _case(rng)
    filled, slots = 13, k.shape[1]
    k[:, filled:], v[:, filled:] = 1e3, 1e3  # never written: masked where read
    read = min(slots, -(-filled // block) * block)  # the blocks that hold written slots
    k[:, read:], v[:, read:] = np.nan, np.nan  # past them: never read
    q_index = np.array([filled - 1])
    kv_seg = np.ones((2, slots), np.int32)
    kv_seg[1, :3] = 0  # row 1: a left-padded prompt
    kv_seg[:, filled:] = 0
    pad = np.ones((2, slots), bool)
    pad[0, 5] = False
    idx = np.arange(slots)
    seen = (idx <= q_index[0]) & (kv_seg != 0) & pad
    if window is not None:
        seen &= idx > q_index[0] - window
    scale = 0.3
    expected = _numpy_attention(
        q, k[:, :filled], v[:, :filled], seen[:, None, :filled], scale, softcap
    )
    y = jax.jit(
        lambda q, k, v: filled_cache_attention(
            q,
            k,
            v,
            filled=jnp.asarray(filled),
            q_index=jnp.asarray(q_index),
            q_segments=jnp.ones((2, 1), jnp.int32),
            kv_segments=jnp.asarray(kv_seg),
            pad=jnp.asarray(pad),
            causal=True,
            window=window,
            scale=scale,
            softcap=softcap,
            dtype=jnp.float32,
            block=block,
        )
    )(q, k, v)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_nothing_gets_the_mean_of_every_value():
    rng = np.random.default_rng(0)
    q, k, v = _case(rng)
    slots = k.shape[1]
    q_seg = np.array([[1], [0]], np.int32)  # row 1's query is padding: sees no key
    seen = np.ones((2, 1, slots), bool)
    seen[:, :, 10:] = False
    seen[1] = False
    expected = _numpy_attention(q, k, v, seen, 0.5, None)
    kv_seg = np.ones((2, slots), np.int32)
    kv_seg[:, 10:] = 0
    y = filled_cache_attention(
        q,
        k,
        v,
        filled=jnp.asarray(10),
        q_index=jnp.asarray([9]),
        q_segments=jnp.asarray(q_seg),
        kv_segments=jnp.asarray(kv_seg),
        pad=None,
        causal=True,
        window=None,
        scale=0.5,
        softcap=None,
        dtype=jnp.float32,
        block=4,
    )
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_a_decode_step_takes_it_and_equals_the_whole_cache_step():
    # one attention layer decoding step by step: the filled-slots path against the same
    # steps computed over the whole cache (the einsum path, as before) in NumPy
    rng = np.random.default_rng(1)
    layer = nj.MultiHeadAttention(num_heads=4, num_kv_heads=2, decode=True, causal=True)
    x = rng.standard_normal((2, 12, 16)).astype(np.float32)
    params, state = layer.init(jax.random.key(0), x)
    full = nj.MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True)
    expected, _ = full.apply(params, {}, x)
    step = jax.jit(layer.apply)
    hlo = step.lower(params, state, x[:, :1]).compile().as_text()
    assert "while" in hlo  # the loop over the cache's filled blocks
    out = []
    for t in range(x.shape[1]):
        y, state = step(params, state, x[:, t : t + 1])
        out.append(y)
    np.testing.assert_allclose(np.concatenate(out, axis=1), expected, rtol=2e-5, atol=2e-5)
