"""Chunked (vocabulary-tiled) cross-entropy: LazyLogits against torch's cross_entropy on the
materialised logits (loss and gradients, 1e-5 float32), and CausalLM's training path."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.core.errors import ArgumentError, LayerError, ShapeError
from nnjax.training import losses
from nnjax.training.chunked import LazyLogits, chunked_token_nll, token_log_probs

pytestmark = pytest.mark.torch


def _case(seed=0, b=2, t=7, d=16, v=301):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.5).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t))
    labels[0, :2] = -100
    labels[1, 5] = -100
    return h, w, labels


def _torch_ref(torch, h, w, labels, smoothing, softcap, transposed):
    th = torch.tensor(h, requires_grad=True)
    tw = torch.tensor(w.T.copy() if transposed else w, requires_grad=True)
    z = th @ (tw.T if transposed else tw)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = torch.nn.functional.cross_entropy(
        z.reshape(-1, z.shape[-1]),
        torch.tensor(labels).reshape(-1),
        ignore_index=-100,
        label_smoothing=smoothing,
    )
    loss.backward()
    return loss.item(), th.grad.numpy(), tw.grad.numpy()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [None, 64])  # 64: a ragged last chunk over 301 columns
def test_chunked_equals_torch_loss_and_gradients(torch, transposed, smoothing, softcap, chunk_size):
    h, w, labels = _case()
    weight = w.T.copy() if transposed else w

    def fn(h, weight):
        lazy = LazyLogits(h, weight, transposed=transposed, softcap=softcap)
        if chunk_size is None:
            return losses.softmax_cross_entropy(
                lazy, labels, ignore_index=-100, label_smoothing=smoothing
            )
        keep = labels != -100
        nll = chunked_token_nll(
            lazy, np.where(keep, labels, 0), label_smoothing=smoothing, chunk_size=chunk_size
        )
        return jnp.sum(nll * keep) / keep.sum()

    got, (gh, gw) = jax.value_and_grad(fn, (0, 1))(jnp.asarray(h), jnp.asarray(weight))
    ref, rh, rw = _torch_ref(torch, h, w, labels, smoothing, softcap, transposed)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh, rh, atol=1e-5)
    np.testing.assert_allclose(gw, rw, atol=1e-5)


@pytest.mark.parametrize("transposed, smoothing", [(False, 0.1), (True, 0.0)])
def test_frozen_head_gradient_from_the_forward_loop_equals_torch(torch, transposed, smoothing):
    """A frozen head (LoRA): d loss / d h is built in the forward loop, then scaled."""
    h, w, labels = _case(seed=5)
    weight = jnp.asarray(w.T.copy() if transposed else w)
    keep = labels != -100

    def fn(h):
        lazy = LazyLogits(h, weight, transposed=transposed)
        nll = chunked_token_nll(
            lazy, np.where(keep, labels, 0), label_smoothing=smoothing, chunk_size=64
        )
        return jnp.sum(nll * keep) / keep.sum()

    got, gh = jax.jit(jax.value_and_grad(fn))(jnp.asarray(h))
    ref, rh, _ = _torch_ref(torch, h, w, labels, smoothing, None, transposed)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh, rh, atol=1e-5)


def test_chunked_where_mask_and_jit_equal_plain():
    h, w, labels = _case(seed=3)
    labels = np.abs(labels)
    where = np.random.default_rng(4).random(labels.shape) > 0.3
    plain = losses.softmax_cross_entropy(h @ w, labels, where=where)
    lazy = jax.jit(lambda h, w: losses.softmax_cross_entropy(LazyLogits(h, w), labels, where=where))
    np.testing.assert_allclose(lazy(h, w), plain, rtol=1e-6)


def test_token_log_probs_equal_log_softmax(torch):
    h, w, labels = _case(seed=5)
    labels = np.abs(labels)
    ref = torch.log_softmax(torch.tensor(h @ w), -1).gather(-1, torch.tensor(labels)[..., None])
    np.testing.assert_allclose(token_log_probs(LazyLogits(h, w), labels), ref[..., 0], atol=1e-5)
    np.testing.assert_allclose(token_log_probs(h @ w, labels), ref[..., 0], atol=1e-5)


def test_lazy_logits_read_as_an_array():
    h, w, _ = _case(seed=6)
    lazy = LazyLogits(h, w, softcap=2.0)
    full = 2.0 * np.tanh(h @ w / 2.0)
    assert lazy.shape == full.shape and lazy.ndim == 3
    np.testing.assert_allclose(np.asarray(lazy), full, atol=1e-5)
    np.testing.assert_allclose(lazy[:, -1], full[:, -1], atol=1e-5)
    np.testing.assert_array_equal(jnp.argmax(lazy, -1), np.argmax(full, -1))


def test_chunked_refuses_bad_arguments():
    h, w, labels = _case()
    with pytest.raises(ShapeError, match=r"labels.shape"):
        chunked_token_nll(LazyLogits(h, w), labels[:, :3])
    with pytest.raises(ArgumentError, match="chunk_size"):
        chunked_token_nll(LazyLogits(h, w), np.abs(labels), chunk_size=0)
    with pytest.raises(ArgumentError, match="LazyLogits"):
        chunked_token_nll(h @ w, np.abs(labels))


def test_chunked_step_never_holds_the_logits():
    """XLA's own buffer plan (not a process measurement): the chunked loss's gradient
    needs less temporary memory than one (N, V) float32 block of logits."""
    n, d, v = 2048, 64, 32768  # chunks of 8192 columns
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    labels = jnp.zeros((n,), jnp.int32)

    def temp(loss):
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp(lambda h, w: losses.softmax_cross_entropy(h @ w, labels))
    lazy = temp(lambda h, w: losses.softmax_cross_entropy(LazyLogits(h, w), labels))
    assert plain >= n * v * 4
    assert lazy <= n * v * 4 / 2, (lazy, plain)


@pytest.mark.parametrize("tie, softcap", [(False, None), (True, None), (True, 2.0)])
def test_causal_lm_training_uses_lazy_logits_above_the_size(tie, softcap):
    cfg = nj.models.CausalLMConfig(
        final_logit_softcap=softcap,
        vocab_size=300,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=64,
        tie_embeddings=tie,
    )
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 300)
    labels = ids.at[0, :3].set(-100)
    loss = functools.partial(
        nj.losses.softmax_cross_entropy, ignore_index=-100, label_smoothing=0.1
    )
    results = []
    for threshold in (None, 1):
        model = nj.models.CausalLM(dataclasses.replace(cfg, lazy_logits_from=threshold))
        params, state = model.init(jax.random.PRNGKey(1), ids)
        out = model.apply(params, state, ids, train=True)[0]
        assert isinstance(out, LazyLogits) == (threshold == 1)
        # evaluation and generation always see the logits
        assert not isinstance(model.apply(params, state, ids)[0], LazyLogits)
        tr = nj.trainer(model, loss, optax.sgd(0.1))
        ts, metrics = tr.step(tr.init(params, state), (ids, labels))
        results.append((metrics["loss"], ts.params))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[1][1], results[0][1]
    )


def test_causal_lm_head_with_adapters_gives_logits():
    cfg = nj.models.CausalLMConfig(vocab_size=64, hidden_size=16, mlp_hidden=32, lazy_logits_from=1)
    model = nj.models.CausalLM(cfg)
    ids = jnp.ones((1, 4), jnp.int32)
    params, state = model.init(jax.random.PRNGKey(0), ids)
    params, _ = nj.finetune.add_lora(params, jax.random.PRNGKey(1), "lm_head/kernel", rank=2)
    out = model.apply(params, state, ids, train=True)[0]
    assert not isinstance(out, LazyLogits) and out.shape == (1, 4, 64)


def test_causal_lm_lazy_logits_input_key():
    """``lazy_logits`` overrides the train-mode rule both ways; the values are the logits'."""
    cfg = nj.models.CausalLMConfig(vocab_size=64, hidden_size=16, mlp_hidden=32)
    model = nj.models.CausalLM(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, 64)
    params, state = model.init(jax.random.PRNGKey(1), ids)
    full = model.apply(params, state, ids)[0]
    lazy = model.apply(params, state, {"ids": ids, "lazy_logits": True})[0]
    assert isinstance(lazy, LazyLogits)
    np.testing.assert_allclose(np.asarray(lazy), full, atol=1e-6)
    big = nj.models.CausalLM(dataclasses.replace(cfg, lazy_logits_from=1))
    out = big.apply(params, state, {"ids": ids, "lazy_logits": False}, train=True)[0]
    assert not isinstance(out, LazyLogits)
    np.testing.assert_allclose(out, full, atol=1e-6)
    with pytest.raises(LayerError, match="lazy_logits to be a Python bool"):
        model.apply(params, state, {"ids": ids, "lazy_logits": jnp.array(True)})
