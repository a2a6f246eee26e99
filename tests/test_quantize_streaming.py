"""Streamed quantization (chunk by chunk), int8 token tables, and quantizing while loading.

References: the one-shot ``nnjax.layers.quantized`` computation (bit for bit), NumPy
float64 schemes typed in here, the dequantized float model, transformers' own logits.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax import finetune as ft
from nnjax.finetune import quantization
from nnjax.layers import quantized


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("shape", "depth", "block"),
    [
        ((37, 101), 0, 64),  # odd out, a padded last block
        ((3, 3, 3, 5), 0, 16),  # a conv kernel
        ((2, 9, 7), 1, 16),  # stacked, odd, padded
        ((2, 3, 10, 6), 2, 8),  # two stacked axes
        ((64, 48), 0, 64),  # blocks divide evenly
    ],
)
@pytest.mark.parametrize("chunk", [5, 64, 1 << 16])
def test_streamed_quantize_is_bit_identical_to_the_one_shot(
    monkeypatch, bits, shape, depth, block, chunk
):
    """Chunks of 5 values (smaller than a block: one block a chunk), of 64, and the
    default (the whole kernel in one chunk) give the one-shot leaves bit for bit."""
    monkeypatch.setattr(quantization, "CHUNK", chunk)
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 3.0
    q, scale = quantization.quantize_leaf(w, "kernel", bits, block, depth)
    want_q, want_scale = quantized.quantize(jnp.asarray(w), bits, depth=depth, block_size=block)
    assert q.dtype == want_q.dtype and scale.dtype == want_scale.dtype
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(scale, want_scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_streamed_quantize_of_bfloat16_and_jax_arrays(monkeypatch, bits):
    """A bf16 kernel (a jax array, read through a NumPy view) quantizes as the one-shot
    computation on its float32 values."""
    monkeypatch.setattr(quantization, "CHUNK", 24)
    w = jax.random.normal(jax.random.key(2), (2, 12, 9), jnp.bfloat16)
    params = {"blocks": {"stacked": {"fc": {"kernel": w}}}}
    got = nj.paths.flatten(ft.quantize(params, "**/kernel", bits=bits, block_size=16))
    want_q, want_scale = quantized.quantize(w, bits, depth=1, block_size=16)
    np.testing.assert_array_equal(got["blocks/stacked/fc/kernel"], want_q)
    np.testing.assert_array_equal(got["blocks/stacked/fc/kernel_scale"], want_scale)


def test_int8_rows_match_numpy_and_stream_bit_identically(monkeypatch):
    w = np.random.default_rng(5).normal(size=(301, 24)).astype(np.float32)
    w[7] = 0.0  # an all-zero row: scale 0, codes 0
    ref_scale = np.abs(w.astype(np.float64)).max(axis=1) / 127.0
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_q = np.where(ref_scale[:, None] > 0, np.round(w / ref_scale[:, None]), 0)
    one_q, one_scale = quantized.quantize_rows(jnp.asarray(w))
    np.testing.assert_array_equal(one_q, ref_q.astype(np.int8))
    np.testing.assert_allclose(one_scale, ref_scale, rtol=1e-6)
    monkeypatch.setattr(quantization, "CHUNK", 50)  # two rows a chunk
    q = ft.quantize({"tok": {"embedding": w}}, (), embeddings="tok/embedding")
    assert q["tok"]["embedding"].dtype == jnp.int8 and q["tok"]["embedding_scale"].shape == (301,)
    np.testing.assert_array_equal(q["tok"]["embedding"], one_q)
    np.testing.assert_array_equal(q["tok"]["embedding_scale"], one_scale)
    back = ft.dequantize(q)["tok"]
    assert list(back) == ["embedding"]
    np.testing.assert_allclose(back["embedding"], ref_q * ref_scale[:, None], rtol=1e-6, atol=1e-7)


def test_quantize_argument_errors_name_the_argument():
    params = {"tok": {"embedding": np.ones((4, 3), np.float32)}, "d": {"kernel": np.ones((3, 2))}}
    with pytest.raises(nj.GlobError, match=r"'emb/\*\*' matches no parameter path"):
        ft.quantize(params, embeddings="emb/**")
    with pytest.raises(nj.GlobError, match=r"select no kernel .* and no 2-axis token table"):
        ft.quantize(params, (), embeddings="d/kernel")
    with pytest.raises(nj.ArgumentError, match=r"quantize: 'tok/embedding' is already quantized"):
        ft.quantize(ft.quantize(params, (), embeddings="tok/**"), (), embeddings="tok/**")
    with pytest.raises(nj.ArgumentError, match=r"a Quantization gives every argument"):
        ft.quantize(params, ft.Quantization(), bits=4)
    with pytest.raises(nj.ArgumentError, match=r"quantize: embeddings must be a glob or globs"):
        ft.quantize(params, embeddings=3)
    bad = {"tok": {"embedding": np.array([[1.0, np.inf], [0.0, 1.0]], np.float32)}}
    with pytest.raises(
        nj.ArgumentError, match=r"'tok/embedding' holds 1 non-finite .* at \[0, 1\]"
    ):
        ft.quantize(bad, (), embeddings="tok/embedding")


def _table():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(11, 6)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, size=11).astype(np.float32)
    return q, scale


def test_int8_embedding_lookup_and_attend_against_numpy():
    """The lookup is ``q[ids] * scale[ids]``, the tied head ``x @ (q * scale).T``, by hand in
    NumPy float64; an id out of range is NaN under jit, as with a float table."""
    q, scale = _table()
    params = {"embedding": jnp.asarray(q), "embedding_scale": jnp.asarray(scale)}
    ids = np.array([[0, 3, 10], [5, 5, 1]])
    y, _ = nj.Embedding(11, 6).apply(params, {}, jnp.asarray(ids))
    want = q.astype(np.float64)[ids] * scale.astype(np.float64)[ids][..., None]
    np.testing.assert_allclose(y, want, rtol=1e-6)
    x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
    logits = nj.attend(params, jnp.asarray(x))
    np.testing.assert_allclose(
        logits,
        x.astype(np.float64) @ (q * scale[:, None].astype(np.float64)).T,
        rtol=1e-5,
        atol=1e-6,
    )
    lookup = jax.jit(lambda i: nj.Embedding(11, 6).apply(params, {}, i)[0])
    out = np.asarray(lookup(jnp.array([[1, 11, -1]])))
    assert np.isnan(out[0, 1:]).all() and np.isfinite(out[0, 0]).all()


def _lm(tie, vocab=301):
    cfg = nj.models.CausalLMConfig(
        vocab_size=vocab, hidden_size=32, num_heads=4, mlp_hidden=64, num_layers=2,
        tie_embeddings=tie, lazy_logits_from=1,
    )  # fmt: skip
    model = nj.models.CausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (2, 9)), jnp.int32)
    params, _ = model.init(jax.random.key(0), ids)
    return model, params, ids


@pytest.mark.parametrize("tie", [True, False])
def test_int8_embedding_in_a_causal_lm_equals_the_dequantized_model(tie):
    """Tied: the lookup and the head both read the int8 table (the head's matmul too).
    The logits and the training loss (the chunked loss, one vocabulary chunk dequantized
    at a time) equal the model with the dequantized table (1e-5)."""
    model, params, ids = _lm(tie)
    q = ft.quantize(params, "blocks/**/kernel", bits=4, embeddings="tok_embed/embedding")
    ref = ft.dequantize(q)
    got, _ = model.apply(q, {}, ids)
    want, _ = model.apply(ref, {}, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    x, y = ids[:, :-1], ids[:, 1:]

    def loss(p):
        out, _ = model.apply(p, {}, x, train=True)
        assert isinstance(out, nj.losses.LazyLogits)  # the chunked path, not full logits
        int8_head = "embedding_scale" in p["tok_embed"] and tie
        assert (out.scale is not None) == int8_head
        return nj.losses.softmax_cross_entropy(out, y)

    np.testing.assert_allclose(loss(q), loss(ref), rtol=1e-5)
    gq = jax.grad(lambda h: loss({**q, "ln_f": h}))(q["ln_f"])
    gr = jax.grad(lambda h: loss({**ref, "ln_f": h}))(ref["ln_f"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gq, gr)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_of_an_int8_head_equals_the_dequantized_head(transposed, smoothing):
    """Loss and d loss / d hidden over vocabulary chunks (3 of 4 entries, the last
    clamped) with an int8 head and its per-entry scales equal the float head's (1e-5)."""
    q, scale = _table()  # (11, 6): a tied table's rows
    w = q if transposed else q.T
    float_w = (q.astype(np.float32) * scale[:, None]) if transposed else (q * scale[:, None]).T
    h = jax.random.normal(jax.random.key(0), (2, 3, 6))
    labels = jnp.array([[0, 10, 4], [7, 7, 2]])

    def loss(hidden, weight, s):
        lazy = nj.losses.LazyLogits(hidden, weight, transposed=transposed, scale=s)
        nll = nj.losses.chunked_token_nll(lazy, labels, label_smoothing=smoothing, chunk_size=4)
        return jnp.mean(nll)

    got, g_got = jax.value_and_grad(loss)(h, jnp.asarray(w), jnp.asarray(scale))
    want, g_want = jax.value_and_grad(loss)(h, jnp.asarray(float_w, jnp.float32), None)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-7)
    lazy = nj.losses.LazyLogits(h, jnp.asarray(w), transposed=transposed, scale=jnp.asarray(scale))
    np.testing.assert_allclose(
        np.asarray(lazy), np.asarray(h, np.float64) @ float_w.astype(np.float64).T
        if transposed else np.asarray(h, np.float64) @ float_w.astype(np.float64),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_lazy_logits_with_an_int8_head_refuses_its_gradient():
    q, scale = _table()
    h = jnp.ones((3, 6))
    with pytest.raises(nj.ArgumentError, match=r"an int8 head .* is frozen"):
        jax.grad(
            lambda s: nj.losses.softmax_cross_entropy(
                nj.losses.LazyLogits(h, jnp.asarray(q), transposed=True, scale=s), jnp.zeros(3, int)
            )
        )(jnp.asarray(scale))


def test_lora_trains_on_an_nf4_base_with_an_int8_tied_embedding():
    model, params, ids = _lm(True)
    q = ft.quantize(params, "blocks/**/kernel", bits=4, embeddings="tok_embed/embedding")
    lora, m = ft.add_lora(q, jax.random.key(1), "blocks/**/kernel", rank=2)
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-2), trainable=m)
    ts = tr.init(lora, {})
    batch = (ids[:, :-1], ids[:, 1:])
    losses = []
    for _ in range(4):
        ts, met = tr.step(ts, batch)
        losses.append(float(met["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for k in ("embedding", "embedding_scale"):
        np.testing.assert_array_equal(ts.params["tok_embed"][k], q["tok_embed"][k])
    rep = ft.report(ts.params, m)  # logical parameters: the int8 table counts its values
    assert rep.total.trainable + rep.total.frozen == nj.count_params(ft.dequantize(lora))
    with pytest.raises(nj.MaskError, match=r"\['tok_embed/embedding_scale'\]"):
        bad = ft.union(m, ft.mask(lora, "tok_embed/embedding_scale"))
        nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-2), trainable=bad).init(
            lora, {}
        )


# ---------------------------------------------------------------- quantize while loading

pytest.importorskip("transformers", reason="transformers writes the checkpoints")


def _assert_same(a, b):
    fa, fb = nj.paths.flatten(a), nj.paths.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize(
    ("family", "spec", "dtype", "shard"),
    [
        (
            "qwen2",
            ft.Quantization("blocks/**/kernel", bits=4, embeddings="tok_embed/**"),
            None,
            None,
        ),
        (
            "llama",
            ft.Quantization(bits=8, exclude="lm_head/**", embeddings="tok_embed/**"),
            None,
            "20KB",
        ),
        ("gpt2", ft.Quantization(bits=4, block_size=16), jnp.bfloat16, None),  # fused qkv split
    ],
)
def test_from_pretrained_quantize_equals_quantize_after_loading(
    tmp_path, monkeypatch, family, spec, dtype, shard
):
    from tests import hf_tiny

    monkeypatch.setattr(quantization, "CHUNK", 100)  # the table read 3 rows at a time
    model_hf = hf_tiny.build(family, tmp_path, max_shard_size=shard)
    config, params = nj.models.hf.from_pretrained(tmp_path, quantize=spec, dtype=dtype)
    _, floats = nj.models.hf.from_pretrained(tmp_path, dtype=dtype)
    _assert_same(params, ft.quantize(floats, spec))
    ids = hf_tiny.ids((2, hf_tiny.SEQ))
    model = nj.models.CausalLM(config)
    got, _ = model.apply(params, {}, jnp.asarray(ids))
    want, _ = model.apply(
        ft.dequantize(params, floats["ln_f"]["scale"].dtype), {}, jnp.asarray(ids)
    )
    tol = 2e-2 if dtype is not None else 1e-4  # bf16 activations round differently
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
    if dtype is None:  # and the quantized model stays near transformers' float logits
        ref = hf_tiny.logits(model_hf, ids)
        err = np.abs(np.asarray(got) - ref).max() / np.ptp(ref)
        assert err < (0.3 if spec.bits == 4 else 0.05), err


def test_from_pretrained_quantize_errors_before_reading(tmp_path):
    from tests import hf_tiny

    hf_tiny.build("qwen2", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # never read
    load = nj.models.hf.from_pretrained
    with pytest.raises(
        nj.ArgumentError, match=r"from_pretrained: quantize must be an nj\.finetune"
    ):
        load(tmp_path, quantize=4)
    with pytest.raises(nj.ArgumentError, match=r"from_pretrained: quantize: bits must be 4 or 8"):
        load(tmp_path, quantize=ft.Quantization(bits=2))
    with pytest.raises(nj.ArgumentError, match=r"from_pretrained: quantize: block_size"):
        load(tmp_path, quantize=ft.Quantization(bits=4, block_size=0))
    with pytest.raises(nj.GlobError, match=r"'blocks/\*\*/qkv/kernel' matches no parameter path"):
        load(tmp_path, quantize=ft.Quantization("blocks/**/qkv/kernel"))
    with pytest.raises(nj.GlobError, match=r"only some copies of the stacked kernel"):
        load(tmp_path, quantize=ft.Quantization("blocks/0/**"))
    with pytest.raises(nj.CheckpointError):  # with good arguments, the file is read
        load(tmp_path, quantize=ft.Quantization())


def test_save_pretrained_of_an_int8_table_writes_the_dequantized_floats(tmp_path):
    from tests import hf_tiny

    hf_tiny.build("qwen2", tmp_path / "in")
    spec = ft.Quantization("blocks/**/kernel", embeddings="tok_embed/embedding")
    config, params = nj.models.hf.from_pretrained(tmp_path / "in", quantize=spec)
    nj.models.hf.save_pretrained(tmp_path / "out", config, params)
    _, back = nj.models.hf.from_pretrained(tmp_path / "out")
    _assert_same(back, ft.dequantize(params))


def test_bf16_reads_are_rounded_before_quantizing():
    """The loader quantizes the ``dtype``-cast float leaf (as quantize after loading
    would); a NumPy bf16 array streams as its float32 values."""
    w = np.random.default_rng(0).normal(size=(16, 8)).astype(ml_dtypes.bfloat16)
    q, s = quantization.quantize_leaf(w, "kernel", 8, 64)
    want_q, want_s = quantized.quantize(jnp.asarray(w, jnp.float32), 8)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(s, want_s)


def test_quantize_while_loading_a_bf16_checkpoint_as_float32_is_bit_identical(tmp_path):
    """bf16 tensors loaded as float32 are widened a chunk at a time inside the quantizer
    (no whole float32 copy of each tensor): the same leaves as loading in float32 and
    quantizing after."""
    import torch
    from safetensors import safe_open

    from tests import hf_tiny

    hf_tiny.build("llama", tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}  # what is widened
    spec = ft.Quantization(bits=4, exclude="lm_head/**", embeddings="tok_embed/**")
    _, params = nj.models.hf.from_pretrained(tmp_path, quantize=spec, dtype=jnp.float32)
    _, floats = nj.models.hf.from_pretrained(tmp_path, dtype=jnp.float32)
    _assert_same(params, ft.quantize(floats, spec))
