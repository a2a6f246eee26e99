"""Known results: an MLP and a small CNN on scikit-learn's digits (held-out 20%, fixed seeds).

The 1,797 8x8 digits are split once with ``nj.data.train_test_split(test_fraction=0.2,
seed=0)`` (1,438 train, 359 test). For scale: scikit-learn's own SVC example gets
about 97% on a half split.
"""

import time

import jax
import optax
import pytest

import nnjax as nj
from nnjax.models import MLP, MLPConfig

pytest.importorskip("sklearn", reason="nj.data.load_digits needs scikit-learn")


def _digits():
    x, y = nj.data.load_digits()  # (1797, 8, 8, 1) float32 in [0, 1], (1797,) int32
    return nj.data.train_test_split((x, y), test_fraction=0.2, seed=0)


def _train_and_test(model, epochs, lr, batch_size=32, seed=0):
    (x_train, y_train), (x_test, y_test) = _digits()
    start = time.perf_counter()
    params, state = model.init(jax.random.key(seed), x_train[:1])
    tr = nj.trainer(
        model, nj.losses.softmax_cross_entropy, optax.adam(lr), metrics=[nj.metrics.accuracy]
    )
    data = nj.data.batches((x_train, y_train), batch_size, seed=seed, epochs=epochs)
    ts, history = nj.fit(tr, tr.init(params, state), data, progress=False)
    test = tr.evaluate(ts, (x_test, y_test))
    acc = float(test["accuracy"])
    print(
        f"{len(history['loss'])} steps in {time.perf_counter() - start:.1f} s: "
        f"test accuracy {acc:.4f} ({round((1 - acc) * len(y_test))} of {len(y_test)} wrong)"
    )
    return acc


def test_mlp_reaches_97_percent_on_digits():
    model = MLP(MLPConfig(hidden=(256, 128), num_outputs=10))
    assert _train_and_test(model, epochs=30, lr=1e-3) >= 0.97


def test_small_cnn_reaches_98_percent_on_digits():
    relu = jax.nn.relu
    model = nj.serial(
        nj.Conv(32, (3, 3)),
        relu,
        nj.Conv(32, (3, 3)),
        relu,
        nj.MaxPool((2, 2)),  # (B, 4, 4, 32)
        nj.Flatten(),
        nj.Dense(128),
        relu,
        head=nj.Dense(10),
    )
    assert _train_and_test(model, epochs=20, lr=1e-3) >= 0.98
