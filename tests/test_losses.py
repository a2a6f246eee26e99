"""nnjax.training.losses against torch.nn.functional with the same inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.training import losses

pytestmark = pytest.mark.torch


def _rand(shape, seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _t(torch, a):
    return torch.tensor(np.asarray(a))


def test_cross_entropy_classification(torch):
    logits = _rand((6, 5))
    labels = np.array([0, 4, 2, 2, 1, 3])
    ref = torch.nn.functional.cross_entropy(_t(torch, logits), _t(torch, labels))
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), ref.item(), rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_lm_ignore_index_and_smoothing(torch, smoothing):
    logits = _rand((3, 7, 11), seed=1)  # (B, T, V)
    labels = np.random.default_rng(2).integers(0, 11, size=(3, 7))
    labels[0, 5:] = -100
    labels[2, :3] = -100
    fn = functools.partial(
        losses.softmax_cross_entropy, label_smoothing=smoothing, ignore_index=-100
    )
    got, grad = jax.value_and_grad(fn)(jnp.asarray(logits), jnp.asarray(labels))

    t_logits = _t(torch, logits).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        t_logits.permute(0, 2, 1), _t(torch, labels), ignore_index=-100, label_smoothing=smoothing
    )
    ref.backward()
    np.testing.assert_allclose(got, ref.item(), rtol=1e-6)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_where_equals_ignored_positions(torch):
    logits = _rand((4, 6), seed=3)
    labels = np.array([1, 5, 0, 2])
    where = np.array([True, False, True, True])
    ignored = np.where(where, labels, -1)
    ref = torch.nn.functional.cross_entropy(_t(torch, logits), _t(torch, ignored), ignore_index=-1)
    got = losses.softmax_cross_entropy(logits, labels, where=where)
    np.testing.assert_allclose(got, ref.item(), rtol=1e-6)
    assert losses.softmax_cross_entropy(logits, np.full(4, -1), ignore_index=-1) == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_onehot(torch, smoothing):
    logits = _rand((5, 4), seed=4)
    probs = np.random.default_rng(5).dirichlet(np.ones(4), size=5).astype(np.float32)
    ref = torch.nn.functional.cross_entropy(
        _t(torch, logits), _t(torch, probs), label_smoothing=smoothing
    )
    got = losses.softmax_cross_entropy_onehot(logits, probs, label_smoothing=smoothing)
    np.testing.assert_allclose(got, ref.item(), rtol=1e-6)


def test_sigmoid_binary_cross_entropy(torch):
    logits = _rand((4, 3), seed=6)
    labels = np.random.default_rng(7).uniform(size=(4, 3)).astype(np.float32)
    labels[0] = [0.0, 1.0, 1.0]
    ref = torch.nn.functional.binary_cross_entropy_with_logits(_t(torch, logits), _t(torch, labels))
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(logits, labels), ref.item(), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (losses.mse, "mse_loss"),
        (losses.mae, "l1_loss"),
        (losses.huber, "huber_loss"),
        (functools.partial(losses.huber, delta=0.5), "huber_loss:0.5"),
    ],
)
def test_regression_losses(torch, ours, theirs):
    pred, target = _rand((6, 3), seed=8), _rand((6, 3), seed=9)
    name, _, delta = theirs.partition(":")
    kwargs = {"delta": float(delta)} if delta else {}
    ref = getattr(torch.nn.functional, name)(_t(torch, pred), _t(torch, target), **kwargs)
    np.testing.assert_allclose(ours(pred, target), ref.item(), rtol=1e-6)


def test_shape_errors():
    with pytest.raises(
        nj.ShapeError,
        match=r"expected targets.shape == predictions.shape == \(4, 1\), got targets.shape == \(4,\)",
    ):
        losses.mse(jnp.zeros((4, 1)), jnp.zeros(4))
    with pytest.raises(
        nj.ShapeError,
        match=r"expected labels.shape == logits.shape\[:-1\] == \(4,\), got labels.shape == \(4, 3\)",
    ):
        losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(nj.ShapeError, match="expected integer labels"):
        losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_outside_the_classes_error_eagerly_and_give_nan_under_jit(bad, smoothing):
    """optax alone reads label -1 as the last class and, smoothed, gives 3 a finite loss."""
    logits, labels = jnp.zeros((4, 3)), jnp.array([0, 1, bad, 2])
    loss = functools.partial(losses.softmax_cross_entropy, label_smoothing=smoothing)
    match = rf"^expected labels in \[0, 3\) \(logits.shape\[-1\] == 3\), got {bad} at labels\[2\]"
    with pytest.raises(nj.ShapeError, match=match):
        loss(logits, labels)
    assert np.isnan(float(jax.jit(loss)(logits, labels)))
    # positions that do not count may hold anything (padding): log(3) for uniform logits
    np.testing.assert_allclose(loss(logits, labels, ignore_index=bad), np.log(3), rtol=1e-6)
    masked = jax.jit(lambda lg, lb, w: loss(lg, lb, where=w))(logits, labels, labels != bad)
    np.testing.assert_allclose(masked, np.log(3), rtol=1e-6)
