import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.models import generate, make_generate
from nnjax.models.gpt import GPT, GPTConfig, weight_decay_mask

# the module (nj.models.generate is the function)
generate_lib = sys.modules["nnjax.models.generate"]
CFG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=8)


def _ids(shape, vocab=13, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@functools.cache
def _init(cfg=CFG, t=None, seed=0):
    t = cfg.block_size if t is None else t
    return jax.jit(GPT(cfg).init)(jax.random.key(seed), jnp.zeros((2, t), jnp.int32))[0]


def _numpy_gpt(params, ids, cfg):
    """GPT-2 forward in float64 NumPy, written from the paper's equations."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    blocks = p["blocks"]["stacked"]

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.epsilon) * g + b

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, t = ids.shape
    h_dim = cfg.n_embd // cfg.n_head
    x = p["tok_embed"]["embedding"][ids] + p["pos_embed"]["embedding"][:t]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.n_layer):
        lp = jax.tree.map(lambda a, i=i: a[i], blocks)
        a = ln(x, lp["ln_1"]["scale"], lp["ln_1"]["bias"])
        q, k, v = (
            (a @ lp["attn"][n]["kernel"] + lp["attn"][n]["bias"])
            .reshape(b, t, cfg.n_head, h_dim)
            .transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h_dim)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, cfg.n_embd)
        x = x + y @ lp["attn"]["out"]["kernel"] + lp["attn"]["out"]["bias"]
        m = ln(x, lp["ln_2"]["scale"], lp["ln_2"]["bias"])
        m = gelu_tanh(m @ lp["mlp"]["fc"]["kernel"] + lp["mlp"]["fc"]["bias"])
        x = x + m @ lp["mlp"]["proj"]["kernel"] + lp["mlp"]["proj"]["bias"]
    x = ln(x, p["ln_f"]["scale"], p["ln_f"]["bias"])
    return x @ p["tok_embed"]["embedding"].T


def test_param_shapes_snapshot():
    params = _init()
    assert jax.tree.map(jnp.shape, params) == {
        "tok_embed": {"embedding": (13, 8)},
        "pos_embed": {"embedding": (16, 8)},
        "blocks": {
            "stacked": {
                "ln_1": {"scale": (2, 8), "bias": (2, 8)},
                "attn": {
                    n: {"kernel": (2, 8, 8), "bias": (2, 8)}
                    for n in ("query", "key", "value", "out")
                },
                "ln_2": {"scale": (2, 8), "bias": (2, 8)},
                "mlp": {
                    "fc": {"kernel": (2, 8, 32), "bias": (2, 32)},
                    "proj": {"kernel": (2, 32, 8), "bias": (2, 8)},
                },
            }
        },
        "ln_f": {"scale": (8,), "bias": (8,)},
    }
    assert "blocks/1/attn/query/kernel" in nj.paths.leaf_paths(params)
    # planning costs nothing and agrees with init
    planned, _ = jax.eval_shape(GPT(CFG).init, jax.random.key(0), jnp.zeros((2, 16), jnp.int32))
    assert jax.tree.map(jnp.shape, planned) == jax.tree.map(jnp.shape, params)


def test_init_follows_gpt2():
    cfg = GPTConfig(vocab_size=512, block_size=256, n_layer=3, n_head=2, n_embd=64)
    params = _init(cfg, t=4)
    blocks = params["blocks"]["stacked"]

    def std(x):
        return float(jnp.std(x))

    for x in (params["tok_embed"]["embedding"], blocks["attn"]["query"]["kernel"]):
        assert std(x) == pytest.approx(0.02, rel=0.05)
    for x in (blocks["attn"]["out"]["kernel"], blocks["mlp"]["proj"]["kernel"]):
        assert std(x) == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.05)
    assert std(params["pos_embed"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    np.testing.assert_array_equal(blocks["mlp"]["fc"]["bias"], 0)
    np.testing.assert_array_equal(blocks["ln_1"]["scale"], 1)


def test_logits_match_numpy_reference():
    params = _init()
    ids = _ids((2, 11))
    logits, state = GPT(CFG).apply(params, {}, ids)
    assert logits.shape == (2, 11, 13) and logits.dtype == jnp.float32 and state == {}
    np.testing.assert_allclose(logits, _numpy_gpt(params, ids, CFG), rtol=1e-5, atol=1e-5)
    unrolled = dataclasses.replace(CFG, scan_unroll=CFG.n_layer)
    logits_unrolled, _ = GPT(unrolled).apply(params, {}, ids)
    np.testing.assert_allclose(logits_unrolled, _numpy_gpt(params, ids, CFG), rtol=1e-5, atol=1e-5)
    # leading batch axes: any
    logits3, _ = GPT(CFG).apply(params, {}, ids.reshape(2, 1, 11))
    np.testing.assert_allclose(logits3.reshape(2, 11, 13), logits, rtol=1e-6, atol=1e-6)


def test_decode_step_by_step_matches_full_sequence():
    params = _init()
    ids = _ids((2, 9), seed=1)
    full, _ = GPT(CFG).apply(params, {}, ids)
    dec = GPT(CFG, decode=True)
    _, state = jax.jit(dec.init)(jax.random.key(0), jnp.zeros((2, 12), jnp.int32))
    assert jax.tree.map(jnp.shape, state) == {
        "blocks": {
            "stacked": {
                "attn": {
                    "cached_key": (2, 2, 12, 2, 4),
                    "cached_value": (2, 2, 12, 2, 4),
                    "cached_segment_ids": (2, 2, 12),
                    "cache_index": (2,),
                }
            }
        },
        "position": (),
    }
    assert not any(np.any(a) for a in jax.tree.leaves(state))  # empty cache, position 0
    step = jax.jit(dec.apply)
    first, state = step(params, state, ids[:, :4])  # prefill 4 tokens
    outs = [first]
    for t in range(4, 9):
        out, state = step(params, state, ids[:, t : t + 1])
        outs.append(out)
    assert int(state["position"]) == 9
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def _greedy_without_cache(params, prompt, n, cfg=CFG):
    """Recompute the whole (zero-padded, causal) sequence for every new token."""
    apply = jax.jit(GPT(cfg).apply)
    t0 = prompt.shape[1]
    seq = np.zeros((prompt.shape[0], t0 + n), np.int32)
    seq[:, :t0] = prompt
    for t in range(t0, t0 + n):
        logits, _ = apply(params, {}, seq)
        seq[:, t] = np.argmax(logits[:, t - 1], -1)
    return seq


def test_greedy_kv_cache_generation_equals_recomputing_the_sequence():
    # a trained-looking model (larger weights) so that argmax ties are impossible
    params = jax.tree.map(lambda a: a * 8, _init(seed=3))
    prompt = _ids((3, 4), seed=2)
    ref = _greedy_without_cache(params, prompt, 12)
    out = generate(CFG, params, prompt, 12, temperature=0.0)
    assert out.shape == (3, 16) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(generate(CFG, params, prompt, 12, top_k=1), ref)
    # max_new_tokens == 1: the prefill alone
    np.testing.assert_array_equal(generate(CFG, params, prompt, 1, temperature=0), ref[:, :5])


def test_generate_compiles_once_per_shape():
    params = _init()
    gen = make_generate(CFG, 6, temperature=0)
    a = gen(params, _ids((2, 3), seed=4))
    b = gen(params, _ids((2, 3), seed=5))
    assert gen._cache_size() == 1
    assert not np.array_equal(a, b)
    before = generate_lib._generate_jit._cache_size()
    for seed in (6, 7, 8):
        generate(
            CFG,
            params,
            _ids((2, 5), seed=seed),
            4,
            top_k=3,
            temperature=0.5 + seed,
            rng=jax.random.key(seed),
        )
    assert generate_lib._generate_jit._cache_size() == before + 1


def test_sampling_with_top_k_stays_in_the_top_k():
    params = jax.tree.map(lambda a: a * 4, _init(seed=1))
    prompt = _ids((4, 2), seed=3)
    out = np.asarray(generate(CFG, params, prompt, 10, top_k=3, rng=jax.random.key(0)))
    logits, _ = GPT(CFG).apply(params, {}, out[:, :-1])
    top3 = np.argsort(np.asarray(logits), axis=-1)[..., -3:]  # (B, T, 3)
    for t in range(2, 12):
        assert all(out[b, t] in top3[b, t - 1] for b in range(4))
    again = generate(CFG, params, prompt, 10, top_k=3, rng=jax.random.key(0))
    np.testing.assert_array_equal(out, again)
    other = generate(CFG, params, prompt, 10, top_k=3, rng=jax.random.key(1))
    assert not np.array_equal(out, other)


def test_a_few_training_steps_lower_the_loss():
    cfg = dataclasses.replace(CFG, dropout=0.1)
    model = GPT(cfg)
    ids = _ids((4, 17), seed=9)
    x, y = ids[:, :-1], ids[:, 1:]
    params, state = _init(), {}  # dropout does not change the params
    opt = optax.adamw(1e-2, weight_decay=0.1, mask=weight_decay_mask(params))
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, opt, steps_per_call=15)
    ts = tr.init(params, state)
    batch = jax.tree.map(lambda a: np.stack([a] * 15), (x, y))
    losses = []
    for i in range(2):
        ts, m = tr.step(ts, batch, jax.random.key(i))
        losses.extend(np.asarray(m["loss"]))
    assert losses[0] == pytest.approx(math.log(13), rel=0.05)  # GPT-2 init: near uniform
    assert np.mean(losses[-5:]) < losses[0] - 0.5


def test_remat_changes_nothing_but_memory():
    params = _init()
    ids = _ids((2, 16), seed=2)

    def loss(p, cfg):
        return jnp.mean(GPT(cfg).apply(p, {}, ids)[0] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1 = grad(params, CFG)
    g2 = grad(params, dataclasses.replace(CFG, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g1, g2)


def test_dropout_and_dtypes():
    cfg = dataclasses.replace(CFG, dropout=0.5)
    params = _init()
    ids = _ids((2, 8))
    eval_out = _numpy_gpt(params, ids, cfg)  # dropout is off in eval mode
    train_out, _ = jax.jit(GPT(cfg).apply, static_argnames="train")(
        params, {}, ids, train=True, rng=jax.random.key(0)
    )
    assert np.abs(train_out - eval_out).max() > 0.1
    with pytest.raises(nj.LayerError, match=r"Dropout\(rate=0.5\) in train mode needs an rng"):
        GPT(cfg).apply(params, {}, ids, train=True)
    bf16 = dataclasses.replace(CFG, dtype=jnp.bfloat16)
    out, _ = jax.jit(GPT(bf16).apply)(params, {}, ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), eval_out, atol=0.05)


def test_weight_decay_mask_is_nanogpt_groups():
    params = _init()
    m = nj.paths.flatten(weight_decay_mask(params))
    decayed = sorted(p for p, v in m.items() if v)
    assert decayed == sorted(
        ["tok_embed/embedding", "pos_embed/embedding"]
        + [f"blocks/stacked/attn/{n}/kernel" for n in ("query", "key", "value", "out")]
        + ["blocks/stacked/mlp/fc/kernel", "blocks/stacked/mlp/proj/kernel"]
    )
    assert set(m) == set(nj.paths.flatten(params))


def test_errors():
    params = _init()
    model = GPT(CFG)
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[-1\] <= max_position == 16 .*got x.shape == \(2, 17\)",
    ):
        model.apply(params, {}, _ids((2, 17)))
    with pytest.raises(nj.LayerError, match=r"expected integer token ids, got x.dtype == float32"):
        model.apply(params, {}, jnp.zeros((2, 3)))
    with pytest.raises(nj.LayerError, match=r"tok_embed: expected ids in \[0, 13\)"):
        model.apply(params, {}, jnp.full((1, 3), 13, jnp.int32))
    with pytest.raises(nj.LayerError, match=r"blocks: .*missing param\(s\) \['mlp'\]"):
        bad = jax.tree.map(lambda a: a, params)
        del bad["blocks"]["stacked"]["mlp"]
        model.apply(bad, {}, _ids((1, 3)))
    with pytest.raises(
        nj.ArgumentError,
        match=r"prompt length \+ max_new_tokens - 1 <= max_position == 16 \(the learned position "
        r"table\), got 10 \+ 8 - 1 == 17; keep only the last 9 prompt tokens",
    ):
        generate(CFG, params, _ids((1, 10)), 8, temperature=0)
    with pytest.raises(ValueError, match=r"pass rng=jax.random.key"):
        generate(CFG, params, _ids((1, 3)), 2)
    with pytest.raises(
        nj.ArgumentError, match=r"prompt_ids: expected integer ids of shape \(B, T\)"
    ):
        generate(CFG, params, _ids((3,)), 2, temperature=0)
    with pytest.raises(ValueError, match=r"n_embd \(10\) must be divisible by n_head \(4\)"):
        GPT(GPTConfig(n_embd=10, n_head=4))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        GPT(dataclasses.replace(CFG, activation="gelu_fast"))
    dec = GPT(CFG, decode=True)
    _, spec = jax.eval_shape(dec.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
    with pytest.raises(nj.LayerError, match=r"decode cache overflow"):
        dec.apply(params, state, _ids((1, 5)))
    with pytest.raises(nj.LayerError, match=r"missing state\(s\) \['blocks', 'position'\]"):
        dec.apply(params, {}, _ids((1, 2)))
