"""CausalLM against transformers' Llama, Qwen2, Qwen3, Mistral and Gemma with copied weights."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import CausalLM, CausalLMConfig
from tests.hf_reference import hf_model, nnjax_config, nnjax_params

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma"]
T = 12  # longer than Mistral's sliding window (4)


def _ids(shape, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@functools.cache
def _pair(family):
    model = hf_model(family)
    return model, nnjax_config(model), nnjax_params(model)


def _hf_logits(torch, model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), **kwargs).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(torch, family):
    model, cfg, params = _pair(family)
    ids = _ids((2, T), seed=1)
    logits, state = jax.jit(CausalLM(cfg).apply)(params, {}, ids)
    assert state == {} and logits.shape == (2, T, 64) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _hf_logits(torch, model, ids), rtol=1e-4, atol=1e-4)


def test_param_paths_follow_the_table():
    _, cfg, params = _pair("qwen3")
    planned, _ = jax.eval_shape(CausalLM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert jax.tree.map(jnp.shape, planned) == jax.tree.map(np.shape, params)
    paths = nj.paths.leaf_paths(planned)
    for p in (
        "blocks/1/attn/key/kernel",
        "blocks/0/attn/q_norm/scale",
        "blocks/0/mlp/gate/kernel",
        "blocks/0/mlp/down/kernel",
        "ln_f/scale",
        "lm_head/kernel",
    ):
        assert p in paths
    assert planned["blocks"]["stacked"]["attn"]["key"]["kernel"].shape == (2, 32, 2 * 8)


def test_left_padded_rows_with_positions_equal_unpadded_rows(torch):
    model, cfg, params = _pair("llama")
    rows = [_ids((1, 9), seed=2), _ids((1, 5), seed=3)]
    ids = np.zeros((2, 9), np.int32)
    segments = np.zeros((2, 9), np.int32)
    positions = np.zeros((2, 9), np.int32)
    for b, r in enumerate(rows):
        n = r.shape[1]
        ids[b, 9 - n :], segments[b, 9 - n :], positions[b, 9 - n :] = r[0], 1, np.arange(n)
    logits, _ = jax.jit(CausalLM(cfg).apply)(
        params, {}, {"ids": ids, "positions": positions, "segment_ids": segments}
    )
    for b, r in enumerate(rows):
        n = r.shape[1]
        expected = _hf_logits(torch, model, r)[0]
        np.testing.assert_allclose(logits[b, 9 - n :], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_segments_equal_separate_sequences(torch, family):
    model, cfg, params = _pair(family)
    parts = [_ids((1, 7), seed=4), _ids((1, 3), seed=5), _ids((1, 5), seed=6)]
    ids = np.concatenate([p[0] for p in parts] + [np.zeros(1, np.int32)])[None]  # + 1 padding
    segments = np.concatenate([np.full(p.shape[1], i + 1) for i, p in enumerate(parts)] + [[0]])
    positions = np.concatenate([np.arange(p.shape[1]) for p in parts] + [[0]])
    x = {"ids": ids, "positions": positions[None], "segment_ids": segments[None].astype(np.int32)}
    logits, _ = jax.jit(CausalLM(cfg).apply)(params, {}, x)
    start = 0
    for p in parts:
        n = p.shape[1]
        expected = _hf_logits(torch, model, p)[0]
        np.testing.assert_allclose(logits[0, start : start + n], expected, rtol=1e-4, atol=1e-4)
        start += n


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_decode_steps_equal_full_pass(family):
    _, cfg, params = _pair(family)
    ids = _ids((2, 9), seed=7)
    full, _ = jax.jit(CausalLM(cfg).apply)(params, {}, ids)
    dec = CausalLM(cfg, decode=True)
    _, state = jax.eval_shape(dec.init, jax.random.key(0), jnp.zeros((2, 10), jnp.int32))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    step = jax.jit(dec.apply)
    out, state = step(params, state, ids[:, :5])
    outs = [out]
    for t in range(5, 9):
        out, state = step(params, state, ids[:, t : t + 1])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_bfloat16_params_and_compute_and_remat():
    _, cfg, params = _pair("llama")
    ids = _ids((2, 8), seed=8)
    ref, _ = jax.jit(CausalLM(cfg).apply)(params, {}, ids)
    bf16 = dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16, _ = jax.eval_shape(CausalLM(bf16).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    cast = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    out, _ = jax.jit(CausalLM(bf16).apply)(cast, {}, ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)

    def loss(p, cfg):
        return jnp.mean(CausalLM(cfg).apply(p, {}, ids)[0] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1, g2 = grad(params, cfg), grad(params, dataclasses.replace(cfg, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_errors():
    cfg = CausalLMConfig(vocab_size=16, hidden_size=16, num_heads=4, num_kv_heads=2, mlp_hidden=8)
    model = CausalLM(cfg)
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(
        ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"
    ):
        CausalLM(dataclasses.replace(cfg, num_kv_heads=3))
    with pytest.raises(ValueError, match=r"norm must be one of \('rms', 'layer'\), got 'batch'"):
        CausalLM(dataclasses.replace(cfg, norm="batch"))
    with pytest.raises(nj.LayerError, match=r"unexpected input key\(s\) \['mask'\]"):
        model.apply(params, {}, {"ids": jnp.zeros((1, 4), jnp.int32), "mask": None})
    with pytest.raises(nj.LayerError, match=r"expected positions.shape == ids.shape == \(1, 4\)"):
        model.apply(
            params,
            {},
            {"ids": jnp.zeros((1, 4), jnp.int32), "positions": jnp.zeros((1, 3), jnp.int32)},
        )
    with pytest.raises(nj.LayerError, match=r"expected integer segment_ids"):
        model.apply(
            params, {}, {"ids": jnp.zeros((1, 4), jnp.int32), "segment_ids": jnp.zeros((1, 4))}
        )
    with pytest.raises(nj.LayerError, match=r"tok_embed: expected ids in \[0, 16\)"):
        model.apply(params, {}, jnp.full((1, 3), 16, jnp.int32))


def test_layers_without_positions_are_a_kind_of_a_mixed_stack():
    # position="none" on every other layer: those layers see no positions, so a model of
    # only such layers is unchanged by other positions (causal attention without positions
    # sees only the order), and a mixed one is not (rotary sees the gaps).
    base = CausalLMConfig(vocab_size=50, hidden_size=32, num_heads=4, mlp_hidden=48,
                          num_layers=4, initializer_range=0.2)  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 6)), jnp.int32)
    shifted = {"ids": ids, "positions": jnp.array([[0, 2, 3, 7, 8, 20]])}
    for kinds, invariant in (({"rope": {}, "nope": {"position": "none"}}, False), (None, True)):
        config = dataclasses.replace(
            base,
            layer_types=("nope", "rope") * 2 if kinds else None,
            layer_kinds=kinds,
            position="rope" if kinds else "none",
        )
        model = CausalLM(config)
        params, _ = model.init(jax.random.key(0), ids)
        a, b = model.apply(params, {}, ids)[0], model.apply(params, {}, shifted)[0]
        assert np.allclose(a, b, atol=1e-5) == invariant
    assert sorted(params["blocks"]) == ["stacked"]  # the uniform one
    with pytest.raises(nj.ArgumentError, match=r"layer_kinds\['bad'\] overrides \['vocab_size'\]"):
        CausalLM(dataclasses.replace(base, layer_types=("bad",) * 4,
                                     layer_kinds={"bad": {"vocab_size": 3}}))  # fmt: skip


def test_init_takes_token_ids_above_the_position_table():
    """GPT-2's learned positions have ``n_positions`` rows: init with token ids larger than
    that (a real batch) gives the params init gives for zeros (it read them as positions)."""
    hf = dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = CausalLM(nj.models.hf.config_from_hf(hf))
    ids = _ids((2, 8), vocab=50, seed=3)
    assert ids.max() >= 8
    got, _ = model.init(jax.random.key(0), ids)
    want, _ = model.init(jax.random.key(0), np.zeros_like(ids))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
