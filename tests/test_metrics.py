"""nnjax.training.metrics against hand counts in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.training import metrics


def _logits(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_accuracy_integer_and_onehot_labels():
    logits = _logits((10, 4))
    labels = np.random.default_rng(1).integers(0, 4, size=10)
    labels[:3] = logits[:3].argmax(-1)  # some sure hits
    expected = np.mean(logits.argmax(-1) == labels)
    np.testing.assert_allclose(metrics.accuracy(logits, labels), expected)
    np.testing.assert_allclose(metrics.accuracy(logits, np.eye(4)[labels]), expected)
    where = np.arange(10) < 6
    np.testing.assert_allclose(
        metrics.accuracy(logits, labels, where=where), np.mean((logits.argmax(-1) == labels)[:6])
    )


def test_accuracy_on_sequences():
    logits = _logits((2, 5, 7), seed=2)  # (B, T, V)
    labels = np.random.default_rng(3).integers(0, 7, size=(2, 5))
    np.testing.assert_allclose(
        metrics.accuracy(logits, labels), np.mean(logits.argmax(-1) == labels)
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_accuracy(k):
    logits = _logits((12, 5), seed=4)
    labels = np.random.default_rng(5).integers(0, 5, size=12)
    top = np.argsort(-logits, axis=-1)[:, :k]
    expected = np.mean([labels[i] in top[i] for i in range(12)])
    np.testing.assert_allclose(metrics.top_k_accuracy(logits, labels, k), expected)
    fn = metrics.top_k(k)
    assert fn.__name__ == f"top{k}_accuracy"
    np.testing.assert_allclose(jax.jit(fn)(logits, labels), expected)


def test_perplexity_is_exp_of_mean_loss():
    np.testing.assert_allclose(metrics.perplexity(jnp.float32(np.log(7.0))), 7.0, rtol=1e-6)


def test_metrics_average_weights_by_example_count():
    batches = [
        ({"loss": 2.0, "acc": 0.5}, 4),
        ({"loss": 1.0, "acc": 1.0}, 2),
        ({"loss": 4.0, "acc": 0.0}, 1),
    ]
    avg = metrics.MetricsAverage()
    for m, n in batches:
        avg = metrics.update(avg, m, n)
    got = metrics.compute(avg)
    n = np.array([b[1] for b in batches], float)
    for key in ("loss", "acc"):
        expected = np.sum([b[0][key] for b in batches] * n) / n.sum()
        np.testing.assert_allclose(got[key], expected, rtol=1e-6)
    assert float(avg.count) == 7.0
    # pure and jit-able: the same under jax.jit
    jitted = jax.jit(metrics.update)(metrics.MetricsAverage(), batches[0][0], 4)
    np.testing.assert_allclose(metrics.compute(jitted)["loss"], 2.0)
    with pytest.raises(ValueError, match=r"expected metrics with keys \['acc', 'loss'\]"):
        metrics.update(avg, {"loss": 1.0}, 3)


def test_label_shape_error():
    with pytest.raises(
        nj.ShapeError, match=r"expected labels.shape == logits.shape\[:-1\] == \(4,\)"
    ):
        metrics.accuracy(jnp.zeros((4, 3)), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("metric", [metrics.accuracy, metrics.top_k(2)])
@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_outside_the_classes_agree_with_the_loss(metric, bad):
    """As nj.losses.softmax_cross_entropy: an error eagerly, NaN under jit."""
    logits = jnp.array([[2.0, 1.0, 0.0]] * 4)
    labels = jnp.array([0, 1, bad, 2])
    with pytest.raises(
        nj.ShapeError, match=rf"^expected labels in \[0, 3\) .*got {bad} at labels\[2\]"
    ):
        metric(logits, labels)
    assert np.isnan(float(jax.jit(metric)(logits, labels)))
    keep = labels != bad  # a position that does not count may hold anything
    want = {"accuracy": 1 / 3, "top2_accuracy": 2 / 3}[metric.__name__]
    got = (
        metrics.accuracy(logits, labels, where=keep)
        if metric is metrics.accuracy
        else (metrics.top_k_accuracy(logits, labels, 2, where=keep))
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
