"""Fine-tuning end to end: transfer on digits, and what a frozen backbone saves in a step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax import finetune as ft
from nnjax.training.losses import softmax_cross_entropy
from nnjax.training.metrics import accuracy
from nnjax.training.trainer import trainer


def _cnn(classes):
    backbone = nj.serial(
        nj.Conv(16, (3, 3)),
        jax.nn.relu,
        nj.MaxPool((2, 2)),
        nj.Conv(32, (3, 3)),
        jax.nn.relu,
        nj.MaxPool((2, 2)),
        nj.Flatten(),  # (B, 2 * 2 * 32)
    )
    return nj.serial(backbone=backbone, head=nj.Dense(classes))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    return x[perm], y[perm]


def _train(model, params, state, x, y, steps, lr, trainable=None, seed=0):
    """``steps`` Adam steps on random mini-batches of 64, in one call."""
    tr = trainer(
        model, softmax_cross_entropy, optax.adam(lr), trainable=trainable, steps_per_call=steps
    )
    idx = np.random.default_rng(seed).integers(0, len(y), (steps, 64))
    ts, _ = tr.step(tr.init(params, state), (x[idx], y[idx]))
    return tr, ts


@pytest.mark.optimized  # 320 convolutional training steps: 10x faster compiled with optimizations
def test_pretrained_backbone_transfers_to_new_digits():
    """Pretrain a CNN on 0-4; fit a new 5-class head on 5-9 with the backbone frozen,
    and compare with training the whole CNN from scratch for the same steps."""
    x, y = _digits()
    old = y < 5
    x_a, y_a = x[old], y[old]
    x_b, y_b = x[~old], y[~old] - 5
    n_train = len(y_b) // 2
    model = _cnn(5)
    params, state = model.init(jax.random.key(0), x_a[:1])
    tr, pre = _train(model, params, state, x_a, y_a, 200, 3e-3)
    assert float(accuracy(tr.predict(pre, x_a), y_a)) >= 0.95

    new_head = ft.replace_head(pre.params, jax.random.key(1), nj.Dense(5), jnp.zeros((1, 128)))
    steps = 60
    tr_t, ts_t = _train(
        model, new_head, state, x_b[:n_train], y_b[:n_train], steps, 3e-2, ft.head_only(new_head), 1
    )
    scratch, _ = model.init(jax.random.key(2), x_a[:1])
    tr_s, ts_s = _train(model, scratch, state, x_b[:n_train], y_b[:n_train], steps, 3e-2, None, 1)

    def acc(tr, ts):
        return float(accuracy(tr.predict(ts, x_b[n_train:]), y_b[n_train:]))

    transfer, from_scratch = acc(tr_t, ts_t), acc(tr_s, ts_s)
    print(
        f"\ndigits 5-9, {steps} steps: frozen-backbone transfer {transfer:.3f}, from scratch {from_scratch:.3f}"
    )
    assert transfer >= 0.85
    backbone_old = nj.paths.flatten(pre.params["backbone"])
    for path, v in nj.paths.flatten(ts_t.params["backbone"]).items():
        assert np.asarray(v).tobytes() == np.asarray(backbone_old[path]).tobytes(), path


def _mlp():
    return nj.serial(
        backbone=nj.serial(nj.Dense(256), jax.nn.relu, nj.Dense(256), jax.nn.relu),
        head=nj.Dense(10),
    )


def _costs(trainable_fn):
    model = _mlp()
    x = np.zeros((64, 128), np.float32)
    y = np.zeros((64,), np.int32)
    params, state = model.init(jax.random.key(0), x)
    m = None if trainable_fn is None else trainable_fn(params)
    tr = trainer(model, softmax_cross_entropy, optax.adam(1e-3), trainable=m)
    return ft.step_cost(tr.step, tr.init(params, state), (x, y), trainable=m), params, m


def test_frozen_backbone_step_forms_no_weight_gradients_and_costs_less():
    full, params, _ = _costs(None)
    head, _, m = _costs(ft.head_only)
    # forward: 3 matmuls. Full backward: 3 weight gradients + 2 input gradients.
    # Head only: the head's weight gradient, nothing flows into the backbone.
    assert full.dot_generals == 3 + 3 + 2
    assert head.dot_generals == 3 + 1
    assert head.temp_bytes < full.temp_bytes
    assert head.flops < full.flops
    assert (
        full.gradient_bytes
        == nj.paths.param_bytes(params)
        == 4 * (128 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    )
    assert head.gradient_bytes == ft.trainable_bytes(params, m) == 4 * (256 * 10 + 10)
    # Adam: two moments per trainable scalar, plus its int32 step count
    assert full.opt_state_bytes == 2 * full.gradient_bytes + 4
    assert head.opt_state_bytes == 2 * head.gradient_bytes + 4
    text = str(head)
    assert "gradients (trainable)" in text and "10.0 KiB" in text


def test_count_primitives_sees_into_scan_bodies():
    def f(w, x):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=4)[0]

    jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 3)), jnp.ones((2, 3)))
    assert ft.count_primitives(jaxpr) == 1
    assert (
        ft.count_primitives(
            jax.make_jaxpr(jax.grad(lambda w, x: f(w, x).sum()))(jnp.ones((3, 3)), jnp.ones((2, 3)))
        )
        >= 2
    )
