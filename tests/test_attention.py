"""MultiHeadAttention and TransformerBlock against PyTorch, each other, and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj

B, T, D, H = 2, 5, 8, 2
IMPLS = ["einsum", "xla"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _pad_mask():
    """Right padding: row 0 attends all 5 keys, row 1 the first 3."""
    return np.array([[True] * 5, [True, True, True, False, False]])


def _apply(layer, params, state, x, **kwargs):
    """``layer.apply`` under jit: one compile is cheaper than eager op-by-op dispatch."""
    return jax.jit(layer.apply, static_argnames="train")(params, state, x, **kwargs)


def _np(a):
    return np.array(a, dtype=np.float32)  # a writable copy: torch.from_numpy wants one


def _torch_mha(torch, params, d, num_heads, d_kv=None):
    """torch.nn.MultiheadAttention with nnjax's query/key/value/out weights copied in."""
    d_kv = d_kv or d
    ref = torch.nn.MultiheadAttention(d, num_heads, batch_first=True, kdim=d_kv, vdim=d_kv)
    w = {k: torch.from_numpy(_np(params[k]["kernel"]).T.copy()) for k in ("query", "key", "value")}
    with torch.no_grad():
        if d_kv == d:
            ref.in_proj_weight.copy_(torch.cat([w["query"], w["key"], w["value"]]))
        else:
            ref.q_proj_weight.copy_(w["query"])
            ref.k_proj_weight.copy_(w["key"])
            ref.v_proj_weight.copy_(w["value"])
        bias = [torch.from_numpy(_np(params[k]["bias"])) for k in ("query", "key", "value")]
        ref.in_proj_bias.copy_(torch.cat(bias))
        ref.out_proj.weight.copy_(torch.from_numpy(_np(params["out"]["kernel"]).T.copy()))
        ref.out_proj.bias.copy_(torch.from_numpy(_np(params["out"]["bias"])))
    return ref


def _torch_causal(torch, t_q, t_kv):
    """torch's bool attn_mask: True = NOT allowed (upper triangle)."""
    return torch.triu(torch.ones(t_q, t_kv, dtype=torch.bool), diagonal=1)


# --- MultiHeadAttention against torch -------------------------------------------------


@pytest.mark.parametrize(
    "impl, causal, padded",
    [("einsum", c, p) for c in (False, True) for p in (False, True)] + [("xla", True, True)],
)
def test_self_attention_matches_torch(torch, impl, causal, padded):
    x = _normal(0, (B, T, D))
    layer = nj.MultiHeadAttention(H, causal=causal, implementation=impl)
    params, state = layer.init(jax.random.key(0), x)
    inp = {"query": x, "mask": _pad_mask()} if padded else x
    y, _ = _apply(layer, params, state, inp)

    ref = _torch_mha(torch, params, D, H)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        expected, _ = ref(
            xt,
            xt,
            xt,
            need_weights=False,
            attn_mask=_torch_causal(torch, T, T) if causal else None,
            key_padding_mask=torch.from_numpy(~_pad_mask()) if padded else None,
        )
    np.testing.assert_allclose(y, expected.numpy(), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_matches_torch(torch, impl):
    t_q, t_kv, d_kv = 3, 5, 6
    x_q, x_kv = _normal(0, (B, t_q, D)), _normal(1, (B, t_kv, d_kv))
    layer = nj.MultiHeadAttention(H, implementation=impl)
    params, state = layer.init(jax.random.key(0), (x_q, x_kv))
    assert params["key"]["kernel"].shape == (d_kv, D)
    y_tuple, _ = _apply(layer, params, state, (x_q, x_kv))
    y_masked, _ = _apply(
        layer, params, state, {"query": x_q, "key_value": x_kv, "mask": _pad_mask()}
    )

    ref = _torch_mha(torch, params, D, H, d_kv=d_kv)
    q, kv = torch.from_numpy(x_q), torch.from_numpy(x_kv)
    with torch.no_grad():
        expected, _ = ref(q, kv, kv, need_weights=False)
        expected_masked, _ = ref(
            q, kv, kv, need_weights=False, key_padding_mask=torch.from_numpy(~_pad_mask())
        )
    np.testing.assert_allclose(y_tuple, expected.numpy(), **TOL)
    np.testing.assert_allclose(y_masked, expected_masked.numpy(), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_qkv_and_out_features_match_torch_sdpa(torch, impl):
    qkv, out, heads = 12, 5, 3
    x = _normal(2, (B, T, D))
    layer = nj.MultiHeadAttention(
        heads, qkv_features=qkv, out_features=out, causal=True, implementation=impl
    )
    params, state = layer.init(jax.random.key(0), x)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["query"] == {"kernel": (D, qkv), "bias": (qkv,)}
    assert shapes["out"] == {"kernel": (qkv, out), "bias": (out,)}
    y, _ = _apply(layer, params, state, x)

    t = {k: {n: torch.from_numpy(_np(v)) for n, v in p.items()} for k, p in params.items()}
    xt = torch.from_numpy(x)

    def heads_of(name):  # (B, T, qkv) -> (B, H, T, hd)
        y = xt @ t[name]["kernel"] + t[name]["bias"]
        return y.reshape(B, T, heads, qkv // heads).transpose(1, 2)

    with torch.no_grad():
        o = torch.nn.functional.scaled_dot_product_attention(
            heads_of("query"), heads_of("key"), heads_of("value"), is_causal=True
        )
        expected = o.transpose(1, 2).reshape(B, T, qkv) @ t["out"]["kernel"] + t["out"]["bias"]
    np.testing.assert_allclose(y, expected.numpy(), **TOL)


def test_leading_batch_axes_fold_into_batch():
    x = jax.random.normal(jax.random.key(1), (3, B, T, D))
    mask = jnp.asarray(np.broadcast_to(_pad_mask(), (3, B, T)))
    layer = nj.MultiHeadAttention(H, causal=True)
    params, state = layer.init(jax.random.key(0), x)
    y, _ = _apply(layer, params, state, {"query": x, "mask": mask})
    flat, _ = _apply(
        layer, params, state, {"query": x.reshape(-1, T, D), "mask": mask.reshape(-1, T)}
    )
    np.testing.assert_allclose(y, flat.reshape(3, B, T, D), **TOL)
    single, _ = _apply(layer, params, state, x[1, 0])  # (T, d): no batch axis at all
    np.testing.assert_allclose(single, y[1, 0], **TOL)


# --- the two implementations -----------------------------------------------------------


@pytest.mark.parametrize(
    "kind, dtype",
    [(k, "float32") for k in ("self", "causal_padded", "cross_padded", "cross_causal")]
    + [("causal_padded", "bfloat16")],
)
def test_dot_product_attention_path_equals_einsum_path(kind, dtype):
    x_q = jax.random.normal(jax.random.key(1), (B, 4 if "cross" in kind else T, D), dtype)
    x_kv = jax.random.normal(jax.random.key(2), (B, T, 6), dtype)
    inp = {
        "self": x_q,
        "causal_padded": {"query": x_q, "mask": _pad_mask()},
        "cross_padded": {"query": x_q, "key_value": x_kv, "mask": _pad_mask()},
        "cross_causal": (x_q, x_kv),
    }[kind]
    causal = kind != "self"
    a = nj.MultiHeadAttention(H, causal=causal, implementation="einsum")
    b = nj.MultiHeadAttention(H, causal=causal, implementation="xla")
    params, state = a.init(jax.random.key(0), inp)
    y_a, _ = _apply(a, params, state, inp)
    y_b, _ = _apply(b, params, state, inp)
    assert y_a.dtype == y_b.dtype == jnp.dtype(dtype)
    tol = TOL if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(_np(y_a), _np(y_b), **tol)


def test_implementation_none_picks_einsum_on_cpu_and_dot_product_attention_elsewhere(
    monkeypatch,
):
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    layer = nj.MultiHeadAttention(H, causal=True)
    params, state = layer.init(jax.random.key(0), x)
    y_cpu, _ = layer.apply(params, state, x)
    assert jax.default_backend() != "cpu" or calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    y_gpu, _ = layer.apply(params, state, x)
    assert calls[-1] is None
    np.testing.assert_allclose(y_cpu, y_gpu, **TOL)


# --- KV cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl, padded", [("einsum", False), ("einsum", True), ("xla", True)])
def test_kv_cache_steps_equal_full_causal_pass(impl, padded):
    max_len = 7
    x = jax.random.normal(jax.random.key(1), (B, max_len, D))
    mask = np.array([[True] * 7, [True] * 5 + [False] * 2])
    full_layer = nj.MultiHeadAttention(H, causal=True, implementation=impl)
    step_layer = nj.MultiHeadAttention(H, decode=True, implementation=impl)
    params, state = step_layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, state) == {
        "cached_key": (B, max_len, H, D // H),
        "cached_value": (B, max_len, H, D // H),
        "cached_segment_ids": (B, max_len),
        "cache_index": (),
    }
    assert state["cache_index"].dtype == jnp.int32
    full, _ = _apply(full_layer, params, {}, {"query": x, "mask": mask} if padded else x)

    step = jax.jit(step_layer.apply)
    wrap = (lambda a: {"query": a, "mask": mask}) if padded else (lambda a: a)
    y, state = step(params, state, wrap(x[:, :3]))  # prefill 3 tokens at once
    outs = [y]
    for t in range(3, max_len):
        y, state = step(params, state, wrap(x[:, t : t + 1]))
        assert int(state["cache_index"]) == t + 1
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    # the cache holds every position's key, head 0 = the first head_dim columns
    keys = np.asarray(x) @ np.asarray(params["key"]["kernel"]) + np.asarray(params["key"]["bias"])
    np.testing.assert_allclose(state["cached_key"][:, :, 0], keys[..., : D // H], **TOL)


@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_cache_is_a_ring_buffer_equal_to_the_full_pass(padded):
    # window 3 < max_len 9: the cache keeps 3 slots; a 5-token prefill (longer than the
    # ring) and single steps that wrap it give the windowed full pass's outputs
    max_len, window = 9, 3
    x = jax.random.normal(jax.random.key(1), (B, max_len, D))
    mask = np.ones((B, max_len), bool)
    mask[1, [1, 6]] = False  # padded keys inside the sequence, before and after a wrap
    full_layer = nj.MultiHeadAttention(H, causal=True, sliding_window=window)
    step_layer = nj.MultiHeadAttention(H, decode=True, sliding_window=window)
    params, state = step_layer.init(jax.random.key(0), x)
    assert state["cached_key"].shape == (B, window, H, D // H)  # not (B, max_len, ...)
    full, _ = _apply(full_layer, params, {}, {"query": x, "mask": mask} if padded else x)
    step = jax.jit(step_layer.apply)
    wrap = (lambda a: {"query": a, "mask": mask}) if padded else (lambda a: a)
    y, state = step(params, state, wrap(x[:, :5]))
    outs = [y]
    for t in range(5, max_len):
        y, state = step(params, state, wrap(x[:, t : t + 1]))
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    assert int(state["cache_index"]) == max_len  # and no overflow: the ring never ends
    y, state = step(params, state, wrap(x[:, :1]) if not padded else {"query": x[:, :1]})
    assert np.isfinite(np.asarray(y)).all()


def test_kv_cache_overflow_under_jit_gives_nan():
    layer = nj.MultiHeadAttention(H, decode=True)
    x = jax.random.normal(jax.random.key(1), (B, 3, D))
    params, state = layer.init(jax.random.key(0), x)
    step = jax.jit(layer.apply)
    for t in range(3):
        y, state = step(params, state, x[:, t : t + 1])
        assert bool(jnp.all(jnp.isfinite(y)))
    y, _ = step(params, state, x[:, :1])
    assert bool(jnp.all(jnp.isnan(y)))


# --- TransformerBlock -------------------------------------------------------------------


def _torch_block(torch, params, x, padding=None):
    """A GPT-2 block from torch layers with nnjax's params copied in."""
    d = x.shape[-1]
    ln_1, ln_2 = torch.nn.LayerNorm(d, eps=1e-5), torch.nn.LayerNorm(d, eps=1e-5)
    attn = _torch_mha(torch, params["attn"], d, H)
    fc, proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
    with torch.no_grad():
        for mod, p in ((ln_1, params["ln_1"]), (ln_2, params["ln_2"])):
            mod.weight.copy_(torch.from_numpy(_np(p["scale"])))
            mod.bias.copy_(torch.from_numpy(_np(p["bias"])))
        for mod, p in ((fc, params["mlp"]["fc"]), (proj, params["mlp"]["proj"])):
            mod.weight.copy_(torch.from_numpy(_np(p["kernel"]).T.copy()))
            mod.bias.copy_(torch.from_numpy(_np(p["bias"])))
        xt = torch.from_numpy(x)
        h = ln_1(xt)
        kpm = None if padding is None else torch.from_numpy(~padding)
        a, _ = attn(
            h, h, h, need_weights=False, attn_mask=_torch_causal(torch, T, T), key_padding_mask=kpm
        )
        xt = xt + a
        xt = xt + proj(torch.nn.GELU(approximate="tanh")(fc(ln_2(xt))))
    return xt.numpy()


def _randomize(params, seed):
    """Nonzero biases and non-unit norms, so every param matters in the comparison."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )


@pytest.mark.parametrize("padded", [False, True])
def test_transformer_block_matches_torch(torch, padded):
    x = _normal(3, (B, T, D))
    block = nj.TransformerBlock(H)
    params, state = block.init(jax.random.key(0), x)
    params = _randomize(params, 1)
    if padded:
        out, _ = _apply(block, params, state, {"query": x, "mask": _pad_mask()})
        assert set(out) == {"query", "mask"}
        np.testing.assert_array_equal(out["mask"], _pad_mask())
        y = out["query"]
    else:
        y, _ = _apply(block, params, state, x)
    expected = _torch_block(torch, params, x, _pad_mask() if padded else None)
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)


def test_transformer_block_param_layout():
    block = nj.TransformerBlock(H, mlp_features=12)
    params, state = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((B, T, D)))
    assert state == {}
    assert {p: v.shape for p, v in nj.paths.flatten(params).items()} == {
        "ln_1/scale": (D,),
        "ln_1/bias": (D,),
        "attn/query/kernel": (D, D),
        "attn/query/bias": (D,),
        "attn/key/kernel": (D, D),
        "attn/key/bias": (D,),
        "attn/value/kernel": (D, D),
        "attn/value/bias": (D,),
        "attn/out/kernel": (D, D),
        "attn/out/bias": (D,),
        "ln_2/scale": (D,),
        "ln_2/bias": (D,),
        "mlp/fc/kernel": (D, 12),
        "mlp/fc/bias": (12,),
        "mlp/proj/kernel": (12, D),
        "mlp/proj/bias": (D,),
    }


def _copy(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def test_repeat_block_equals_blocks_in_turn_with_and_without_mask():
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    block = nj.TransformerBlock(H)
    model = nj.serial(blocks=nj.repeat(block, 2))
    params, state = model.init(jax.random.key(0), x)
    assert "blocks/1/attn/query/kernel" in nj.paths.leaf_paths(params)
    stacked = params["blocks"]["stacked"]
    for inp in (x, {"query": x, "mask": _pad_mask()}):
        y, _ = _apply(model, params, state, inp)
        expected = inp
        for i in range(2):
            expected, _ = _apply(block, _copy(stacked, i), {}, expected)
        if isinstance(inp, dict):  # a dict in, the same dict out: the mask flows through
            assert set(y) == {"query", "mask"}
            np.testing.assert_array_equal(y["mask"], inp["mask"])
            y, expected = y["query"], expected["query"]
        np.testing.assert_allclose(y, expected, **TOL)


def test_repeat_block_decode_steps_equal_full_pass():
    max_len = 6
    x = jax.random.normal(jax.random.key(1), (B, max_len, D))
    full = nj.repeat(nj.TransformerBlock(H), 2)
    cached = nj.repeat(nj.TransformerBlock(H, decode=True), 2)
    params, state = cached.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, state["stacked"]["attn"]) == {
        "cached_key": (2, B, max_len, H, D // H),
        "cached_value": (2, B, max_len, H, D // H),
        "cached_segment_ids": (2, B, max_len),
        "cache_index": (2,),
    }
    expected, _ = _apply(full, params, {}, x)
    step = jax.jit(cached.apply)
    outs = []
    for t in range(max_len):
        y, state = step(params, state, x[:, t : t + 1])
        outs.append(y)
    np.testing.assert_array_equal(state["stacked"]["attn"]["cache_index"], [max_len] * 2)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, **TOL)


# --- gradients, adapters, dropout ---------------------------------------------------------


def test_attention_grads_by_finite_differences():
    # float64 throughout (the einsum path's softmax runs in promote(dtype, float32)).
    with jax.enable_x64(True):
        layer = nj.MultiHeadAttention(
            2, qkv_features=4, causal=True, param_dtype=jnp.float64, implementation="einsum"
        )
        x = jax.random.normal(jax.random.key(1), (1, 3, 4), jnp.float64)
        params, state = layer.init(jax.random.key(0), x)
        mask = jnp.array([[True, True, False]])
        f = jax.jit(lambda p, x: _apply(layer, p, state, {"query": x, "mask": mask})[0])
        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-5, atol=1e-6, rtol=1e-6)


def test_dot_product_attention_grads_equal_einsum_grads():
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    grads = []
    for impl in IMPLS:
        layer = nj.MultiHeadAttention(H, causal=True, implementation=impl)
        params, state = layer.init(jax.random.key(0), x)

        def loss(p, x, layer=layer, state=state):
            return jnp.sum(jnp.sin(_apply(layer, p, state, {"query": x, "mask": _pad_mask()})[0]))

        grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lora_beside_projection_kernels_is_used():
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    layer = nj.MultiHeadAttention(H, causal=True)
    params, state = layer.init(jax.random.key(0), x)
    a = jax.random.normal(jax.random.key(2), (D, 2))
    b = jax.random.normal(jax.random.key(3), (2, D))
    adapted = {**params, "value": {**params["value"], "lora_a": a, "lora_b": b}}
    merged = {**params, "value": {**params["value"], "kernel": params["value"]["kernel"] + a @ b}}
    y, _ = _apply(layer, adapted, state, x)
    y_merged, _ = _apply(layer, merged, state, x)
    y_plain, _ = _apply(layer, params, state, x)
    np.testing.assert_allclose(y, y_merged, **TOL)
    assert float(jnp.abs(y - y_plain).max()) > 1e-2


def test_attention_dropout_is_unbiased_and_only_in_train_mode():
    x = jax.random.normal(jax.random.key(1), (1, 4, D))
    layer = nj.MultiHeadAttention(H, dropout_rate=0.5, implementation="xla")
    params, state = layer.init(jax.random.key(0), x)
    y_eval, _ = _apply(layer, params, state, x, rng=jax.random.key(5))
    y_plain, _ = _apply(nj.MultiHeadAttention(H), params, state, x)
    np.testing.assert_array_equal(y_eval, y_plain)

    def train(rng):
        return _apply(layer, params, state, x, rng=rng, train=True)[0]

    ys = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(6), 4000))
    assert float(jnp.abs(ys[0] - y_eval).max()) > 0.05
    np.testing.assert_array_equal(train(jax.random.key(7)), train(jax.random.key(7)))
    # E[dropped weights] = weights, and the output is linear in them.
    np.testing.assert_allclose(ys.mean(0), y_eval, atol=0.03)


# --- errors -------------------------------------------------------------------------------


def _init(layer, x):
    return layer.init(jax.random.key(0), x)


def test_error_d_not_divisible_by_num_heads():
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[-1\] divisible by num_heads == 3 .*got x.shape == \(2, 5, 8\)",
    ):
        _init(nj.MultiHeadAttention(3), jnp.zeros((B, T, D)))
    with pytest.raises(
        ValueError, match=r"qkv_features \(8\) must be divisible by num_heads \(3\)"
    ):
        nj.MultiHeadAttention(3, qkv_features=8)


def test_error_mask_shape_and_dtype_with_path():
    model = nj.serial(attn=nj.MultiHeadAttention(H))
    x = jnp.zeros((B, T, D))
    params, state = _init(model, x)
    with pytest.raises(
        nj.LayerError,
        match=r"^attn: expected mask.shape == \(2, 5\) \(batch axes, T_kv\), "
        r"got mask.shape == \(2, 4\)$",
    ):
        model.apply(params, state, {"query": x, "mask": jnp.ones((B, 4), bool)})
    with pytest.raises(nj.LayerError, match=r"expected a bool mask .*got mask.dtype == float32"):
        model.apply(params, state, {"query": x, "mask": jnp.ones((B, T))})


def test_error_bad_inputs():
    layer = nj.MultiHeadAttention(H)
    x = jnp.zeros((B, T, D))
    params, state = _init(layer, x)
    with pytest.raises(nj.LayerError, match=r"unexpected input key\(s\) \['kv'\]"):
        layer.apply(params, state, {"query": x, "kv": x})
    with pytest.raises(
        nj.LayerError,
        match=r"expected key_value.shape\[:-2\] == \(2,\) .*got key_value.shape == \(3, 5, 8\)",
    ):
        layer.apply(params, state, (x, jnp.zeros((3, T, D))))
    with pytest.raises(
        nj.LayerError, match=r"at least 2 axes \(\.\.\., T, d\), got x.shape == \(8,\)"
    ):
        layer.apply(params, state, jnp.zeros((D,)))
    with pytest.raises(ValueError, match="implementation must be one of"):
        nj.MultiHeadAttention(H, implementation="flash")
    rotary = nj.MultiHeadAttention(H, rotary=nj.layers.rope.rope_frequencies(D // H))
    with pytest.raises(nj.LayerError, match="rotary embeddings are for self-attention"):
        rotary.apply(params, state, (x, x))
    with pytest.raises(
        nj.LayerError,
        match=r"expected positions.shape == \(2, 5\) .*got positions.shape == \(2, 4\)",
    ):
        rotary.apply(params, state, {"query": x, "positions": jnp.zeros((B, 4), jnp.int32)})
    with pytest.raises(
        ValueError, match=r"num_heads \(2\) must be >= 1 and divisible by num_kv_heads"
    ):
        nj.MultiHeadAttention(H, num_kv_heads=3)


def test_error_dropout_in_train_mode_needs_rng():
    layer = nj.MultiHeadAttention(H, dropout_rate=0.1)
    x = jnp.zeros((B, T, D))
    params, state = _init(layer, x)
    with pytest.raises(nj.LayerError, match=r"dropout_rate=0.1\) in train mode needs an rng"):
        layer.apply(params, state, x, train=True)


def test_error_decode_state_missing():
    x = jnp.zeros((B, T, D))
    params, _ = _init(nj.MultiHeadAttention(H), x)
    with pytest.raises(
        nj.LayerError,
        match=r"decode=True needs the KV cache in state: keys \['cache_index', 'cached_key', "
        r"'cached_segment_ids', 'cached_value'\], made by init\(key, x\) .*got state keys \[\]",
    ):
        nj.MultiHeadAttention(H, decode=True).apply(params, {}, x[:, :1])


def test_error_decode_cache_overflow_and_mismatch():
    layer = nj.MultiHeadAttention(H, decode=True)
    x = jnp.zeros((B, 4, D))
    params, state = _init(layer, x)
    with pytest.raises(
        nj.LayerError,
        match=r"decode cache overflow: expected cache_index \+ x.shape\[-2\] <= max_len == 4, "
        r"got cache_index == \? and x.shape\[-2\] == 5",
    ):
        jax.jit(layer.apply)(params, state, jnp.zeros((B, 5, D)))
    _, state = layer.apply(params, state, x[:, :3])
    with pytest.raises(nj.LayerError, match=r"got cache_index == 3 and x.shape\[-2\] == 2"):
        layer.apply(params, state, x[:, :2])
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[:-2\] == \(2,\) \(the KV cache.s batch, "
        r"cached_key \(2, 4, 2, 4\)\), got x.shape == \(3, 1, 8\)",
    ):
        layer.apply(params, state, jnp.zeros((3, 1, D)))
    with pytest.raises(nj.LayerError, match="decode=True is for self-attention"):
        layer.apply(params, state, (x[:, :1], x))


def test_error_block_rejects_tuple_and_names_child_path():
    block = nj.TransformerBlock(H)
    x = jnp.zeros((B, T, D))
    params, state = _init(block, x)
    with pytest.raises(nj.LayerError, match="TransformerBlock is self-attention"):
        block.apply(params, state, (x, x))
    with pytest.raises(nj.LayerError, match=r"^attn: expected mask.shape == \(2, 5\)"):
        block.apply(params, state, {"query": x, "mask": jnp.ones((B, 3), bool)})
