"""Keras-style names for the trainer's optimizer, loss and metrics: the same steps as the objects."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.training import names

MODEL = nj.serial(nj.Dense(8), jax.nn.relu, nj.Dense(3))


def _batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)


def _run(tr, steps=3):
    params, state = MODEL.init(jax.random.key(0), jnp.zeros((1, 4)))
    ts, out = tr.init(params, state), []
    for _ in range(steps):
        ts, m = tr.step(ts, _batch())
        out.append(jax.device_get(m))
    return jax.device_get(ts.params), out


def test_names_train_exactly_as_the_objects_they_stand_for():
    by_name = nj.trainer(MODEL, "sparse_categorical_crossentropy", "adam", metrics=["accuracy"])
    by_object = nj.trainer(
        MODEL, nj.losses.softmax_cross_entropy, optax.adam(1e-3), metrics=[nj.metrics.accuracy]
    )
    (p1, m1), (p2, m2) = _run(by_name), _run(by_object)
    assert m1 == m2 and sorted(m1[0]) == ["accuracy", "loss"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sgd_name_uses_its_default_learning_rate():
    # one SGD step moves each param by exactly lr * grad: lr recovered from the step
    tr = nj.trainer(MODEL, "sparse_categorical_crossentropy", "SGD")
    params, state = MODEL.init(jax.random.key(0), jnp.zeros((1, 4)))
    ts, _ = tr.step(tr.init(params, state), _batch())
    x, y = _batch()
    grads = jax.grad(
        lambda p: nj.losses.softmax_cross_entropy(MODEL.apply(p, state, x)[0], jnp.asarray(y))
    )(params)
    k = "dense_1/kernel"
    moved = params["dense_1"]["kernel"] - ts.params["dense_1"]["kernel"]
    np.testing.assert_allclose(
        moved, 1e-2 * grads["dense_1"]["kernel"], rtol=1e-3, atol=1e-7, err_msg=k
    )


def test_every_name_resolves_to_a_working_function():
    p = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    for name, entry in names.OPTIMIZERS.items():
        tx = names.resolve_optimizer(name)
        updates, _ = tx.update({"w": p}, tx.init({"w": p}), {"w": p})
        assert updates["w"].shape == p.shape, name
        assert entry.learning_rate > 0
    assert names.resolve_loss("mse")(p, p * 0) == pytest.approx(float(jnp.mean(p**2)))
    assert names.resolve_loss("mean_absolute_error") is nj.losses.mae
    assert names.resolve_loss("categorical_crossentropy") is nj.losses.softmax_cross_entropy_onehot
    assert names.resolve_loss("binary_crossentropy") is nj.losses.sigmoid_binary_cross_entropy
    fns = names.resolve_metrics(["accuracy", "mse", nj.metrics.top_k(2)])
    assert list(fns) == ["accuracy", "mse", "top2_accuracy"]
    assert float(fns["accuracy"](p, jnp.array([0, 1]))) == 0.5  # argmax rows: 0 (hit), 2 (miss)
    assert set(names.resolve_metrics({"acc": "accuracy"})) == {"acc"}


@pytest.mark.parametrize(
    "args, kw, match",
    [
        (("sparse_categorical_crossentropy", "adamm"), {}, r"optimizer: expected an optax Gradi.*'adam', 'adamw', 'sgd'.*got 'adamm'"),
        (("sparse_categorical_crossentropy", 0.001), {}, r"optimizer: expected .*; got 0.001"),
        (("crossentropy", "adam"), {}, r"loss: expected a function .*'sparse_categorical_crossentropy'.*got 'crossentropy'"),
        (("mse", "adam"), {"metrics": ["acuracy"]}, r"metrics\[0\]: expected .*'accuracy'.*got 'acuracy'"),
        (("mse", "adam"), {"metrics": ["mse", nj.losses.mse]}, r"metrics\[1\]: .* needs a unique __name__"),
    ],
)  # fmt: skip
def test_unknown_names_fail_at_once_listing_the_accepted_ones(args, kw, match):
    with pytest.raises(nj.ArgumentError, match=match):
        nj.trainer(MODEL, *args, **kw)
