"""Blockwise attention against the einsum path, torch's scaled_dot_product_attention,
and at the model level (a tiny Qwen2 / Mistral CausalLM's loss and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.layers import attention as attention_module
from nnjax.layers.attention import Logits, _einsum_attention
from nnjax.layers.blockwise_attention import blockwise_attention

TOL = dict(rtol=1e-5, atol=1e-5)
N, H, KV, HD = 2, 4, 2, 8


def _full_mask(t_q, t_kv, pad, causal, window, segments):
    """The ``(N, 1, T_q, T_kv)`` mask the einsum path takes, written out in NumPy."""
    i, j = np.arange(t_q)[:, None], np.arange(t_kv)[None, :]
    m = np.ones((t_q, t_kv), bool)
    if causal:
        m &= j <= i
    if window is not None:
        m &= j > i - window
    m = np.broadcast_to(m, (N, t_q, t_kv))
    if pad is not None:
        m = m & pad[:, None, :]
    if segments is not None:
        qs, ks = segments
        m = m & (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    return jnp.asarray(m[:, None])


def _inputs(t_q, t_kv, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (N, t_q, H, HD), dtype)
    k = jax.random.normal(ks[1], (N, t_kv, KV, HD), dtype)
    v = jax.random.normal(ks[2], (N, t_kv, KV, HD), dtype)
    w = jax.random.normal(ks[3], (N, t_q, H, HD), jnp.float32)  # a random cotangent
    return q, k, v, w


def _value_and_grads(f, q, k, v, w):
    """``(loss, y), grads`` of ``sum(f(q, k, v) * w)``, one compile."""

    def loss(q, k, v):
        y = f(q, k, v)
        return jnp.sum(y.astype(jnp.float32) * w), y

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)


def _pad_rows(t_kv):
    """Row 0: right padding; row 1: its first 3 keys padded (so its first causal queries
    see no key and get the mean of the values)."""
    j = np.arange(t_kv)
    return np.stack([j < t_kv - 4, j >= 3])


def _segment_rows(t):
    half = t // 2
    return np.array([[1] * half + [2] * (t - half), [0] * 3 + [1] * 9 + [3] * (t - 12)])


CASES = {
    # name: (t_q, t_kv, causal, window, padded, segments, softcap, block_q, block_k)
    "padding_softcap": (21, 21, False, None, True, False, 2.0, 8, 8),
    "causal_padded": (37, 37, True, None, True, False, None, 16, 8),
    "segments_window_softcap": (37, 37, True, 9, True, True, 5.0, 16, 8),
    "one_block": (19, 19, True, None, True, True, None, 256, 256),
    "cross_short_queries": (11, 30, True, None, True, False, None, 8, 8),
    "cross_long_queries_window": (30, 11, True, 4, False, False, None, 8, 8),
    # no pad mask: the blocks a query block sees whole skip the mask
    "causal_whole_blocks": (37, 37, True, None, False, False, None, 8, 8),
    "window_whole_blocks_softcap": (45, 45, True, 12, False, False, 3.0, 8, 4),
    "no_mask_last_block_partial": (21, 27, False, None, False, False, None, 8, 8),
    "cross_short_queries_whole_blocks": (11, 30, True, None, False, False, None, 4, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_equals_einsum_outputs_and_gradients(name):
    t_q, t_kv, causal, window, padded, segmented, cap, bq, bk = CASES[name]
    q, k, v, w = _inputs(t_q, t_kv)
    pad = _pad_rows(t_kv) if padded else None
    seg = _segment_rows(t_q) if segmented else None
    mask = _full_mask(t_q, t_kv, pad, causal, window, None if seg is None else (seg, seg))
    logits = Logits(softcap=cap)

    def plain(q, k, v):
        return _einsum_attention(q, k, v, mask, q.dtype, None, 0.0, logits)

    def blocks(q, k, v):
        return blockwise_attention(
            q, k, v, pad=pad, segments=seg, kv_segments=seg, causal=causal, window=window,
            softcap=cap, block_q=bq, block_k=bk,
        )  # fmt: skip

    (l_a, y_a), g_a = _value_and_grads(blocks, q, k, v, w)
    (l_b, y_b), g_b = _value_and_grads(plain, q, k, v, w)
    np.testing.assert_allclose(y_a, y_b, **TOL)
    np.testing.assert_allclose(l_a, l_b, rtol=1e-5)
    for a, b in zip(g_a, g_b, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_skip_the_mask_only_where_every_query_sees_every_key(name):
    from nnjax.layers import blockwise_attention as module

    t_q, t_kv, causal, window, padded, segmented, _, bq, bk = CASES[name]
    pad = _pad_rows(t_kv) if padded else None
    seg = _segment_rows(t_q) if segmented else None
    mask = np.asarray(
        _full_mask(t_q, t_kv, pad, causal, window, None if seg is None else (seg, seg))
    )
    bq, bk = min(bq, t_q), min(bk, t_kv)
    c = module._Config(t_q, t_kv, bq, bk, causal, window, 1.0, None, segmented, padded)
    lo, hi, full_lo, full_hi = module._schedule(c)
    for i in range(-(-t_q // bq)):
        for j in range(-(-t_kv // bk)):
            block = mask[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            # a pad mask or segments are traced: no block can be known whole
            known = not padded and not segmented
            whole = known and (j + 1) * bk <= t_kv and bool(block.all())
            assert (full_lo[i] <= j < full_hi[i]) == whole, (i, j)
            if block.any():  # a block with a visible key is visited
                assert lo[i] <= j < hi[i], (i, j)
    if "whole" in name or "no_mask" in name:  # those cases have whole blocks to skip
        assert (full_hi > full_lo).any()


def test_a_query_that_sees_no_key_gets_the_mean_of_the_values():
    q, k, v, _ = _inputs(6, 6)
    pad = np.array([[False] * 6, [False, False, True, True, True, True]])
    y = blockwise_attention(q, k, v, pad=pad, causal=True, block_q=4, block_k=4)
    mean = np.repeat(np.mean(np.asarray(v), axis=1), H // KV, axis=1)  # (N, H, hd)
    np.testing.assert_allclose(y[0], np.broadcast_to(mean[0], (6, H, HD)), **TOL)
    np.testing.assert_allclose(y[1, :2], np.broadcast_to(mean[1], (2, H, HD)), **TOL)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_blockwise_equals_torch_scaled_dot_product_attention(torch, scale):
    """torch's reference: causal with key padding, grouped-query heads, gradients."""
    t = 27
    q, k, v, w = _inputs(t, t)
    pad = np.stack([np.arange(t) < t - 5, np.ones(t, bool)])  # every query sees a key
    mask = np.tril(np.ones((t, t), bool))[None] & pad[:, None, :]

    def blocks(q, k, v):
        return blockwise_attention(q, k, v, pad=pad, causal=True, scale=scale, block_q=8, block_k=8)

    (_, y), grads = _value_and_grads(blocks, q, k, v, w)
    tq, tk, tv = (torch.tensor(np.asarray(a)).transpose(1, 2).requires_grad_() for a in (q, k, v))
    ty = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.tensor(mask)[:, None], scale=scale, enable_gqa=True
    )
    (ty * torch.tensor(np.asarray(w)).transpose(1, 2)).sum().backward()
    np.testing.assert_allclose(y, ty.transpose(1, 2).detach().numpy(), **TOL)
    for a, b in zip(grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(a, b.grad.transpose(1, 2).numpy(), **TOL)


def test_bfloat16_operands_stay_close_to_float32():
    q, k, v, _ = _inputs(40, 40)
    f = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, causal=True, block_q=16, block_k=16))
    y32 = f(q, k, v)
    y16 = f(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=3e-2, atol=3e-2)


def test_grad_temporaries_grow_linearly_not_quadratically():
    """XLA's own buffer plan (deterministic): doubling T about doubles the backward's
    temporaries (the einsum path's quadruple)."""

    def temp(t):
        q = jax.ShapeDtypeStruct((1, t, H, HD), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, KV, HD), jnp.float32)
        f = lambda q, k, v: blockwise_attention(q, k, v, causal=True, block_q=32, block_k=32)
        grad = jax.jit(jax.grad(lambda *a: f(*a).sum(), (0, 1, 2)))
        return grad.lower(q, k, k).compile().memory_analysis().temp_size_in_bytes

    small, large = temp(512), temp(1024)
    assert large < 2.5 * small


def test_bad_shapes_raise_argument_errors():
    q, k, v, _ = _inputs(8, 8)
    with pytest.raises(nj.ArgumentError, match=r"pad\.shape"):
        blockwise_attention(q, k, v, pad=np.ones((N, 7), bool))
    with pytest.raises(nj.ArgumentError, match="H % KV"):
        blockwise_attention(q[:, :, :3], k, v)
    with pytest.raises(nj.ArgumentError, match="both segments"):
        blockwise_attention(q, k, v, segments=np.ones((N, 8), int))
    with pytest.raises(nj.ArgumentError, match="block_q"):
        blockwise_attention(q, k, v, block_q=0)


# --- in the layer and the model -----------------------------------------------------


def test_layer_blockwise_equals_einsum_with_param_gradients():
    t, d = 33, 16
    x = jax.random.normal(jax.random.key(1), (N, t, d))
    inp = {"query": x, "mask": _pad_rows(t), "segment_ids": _segment_rows(t)}
    kw = dict(num_kv_heads=KV, causal=True, sliding_window=10, logits=Logits(softcap=3.0))
    a = nj.MultiHeadAttention(H, implementation="blockwise", **kw)
    b = nj.MultiHeadAttention(H, implementation="einsum", **kw)
    params, _ = a.init(jax.random.key(0), inp)

    def loss(layer):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(layer.apply(p, {}, inp)[0] ** 2)))

    (l_a, g_a), (l_b, g_b) = loss(a)(params), loss(b)(params)
    np.testing.assert_allclose(l_a, l_b, rtol=1e-5)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, **TOL), g_a, g_b)


def test_implementation_none_takes_blockwise_from_the_threshold_on_cpu(monkeypatch):
    calls = []
    real = attention_module.blockwise_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "blockwise_attention", spy)
    monkeypatch.setattr(attention_module, "BLOCKWISE_FROM", 12)
    layer = nj.MultiHeadAttention(2, causal=True)
    short, long = (jnp.ones((1, t, 8)) for t in (11, 12))
    params, _ = layer.init(jax.random.key(0), long)
    jax.eval_shape(layer.apply, params, {}, short)  # tracing is enough to see the path
    assert calls == []
    jax.eval_shape(layer.apply, params, {}, long)
    assert calls == ([(1, 12, 2, 4)] if jax.default_backend() == "cpu" else [])
    # decode steps and dropout keep the einsum path even when asked for blockwise
    calls.clear()
    drop = nj.MultiHeadAttention(2, causal=True, dropout_rate=0.5, implementation="blockwise")
    jax.eval_shape(lambda p: drop.apply(p, {}, long, train=True, rng=jax.random.key(1)), params)
    step = nj.MultiHeadAttention(2, decode=True, implementation="blockwise")
    _, state = step.init(jax.random.key(0), long)
    jax.eval_shape(step.apply, params, state, long[:, :3])
    assert calls == []


def test_causal_lm_blockwise_gives_the_einsum_loss_and_gradients():
    """A tiny Qwen2 (biased q/k/v, grouped-query heads): loss and every param's gradient."""
    base = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        mlp_hidden=48, family="qwen2", qkv_bias=True,
    )  # fmt: skip
    ids = np.random.default_rng(0).integers(0, 64, (2, 41))
    x, y = ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)
    results = []
    for impl in ("blockwise", "einsum"):
        model = nj.models.CausalLM(nj.models.CausalLMConfig(**base, attention_implementation=impl))
        params, state = model.init(jax.random.key(0), x)

        def loss(p, model=model, state=state):
            logits, _ = model.apply(p, state, x, train=True)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l_a, g_a), (l_b, g_b) = results
    np.testing.assert_allclose(l_a, l_b, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_a, g_b)
