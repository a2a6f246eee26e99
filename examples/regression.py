"""Regression with MSE and SGD: the classic first example.

Data made by code: ``y = x @ w_true + b_true + noise``. A single ``nj.Dense(1)`` is
linear regression; SGD on the mean squared error recovers ``w_true`` and
``b_true``, and the script prints them side by side::

    python examples/regression.py                      # linear, 8 features
    python examples/regression.py --model mlp          # an MLP on y = sin(3 x) + noise

Everything is the library's plain path: a model (a ``Layer``), ``nj.trainer`` with
``nj.losses.mse`` and ``optax.sgd``, ``nj.data.batches`` and ``nj.fit``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import optax

import nnjax as nj
from nnjax.models import MLP, MLPConfig


def make_data(model: str, n: int, features: int, noise: float, seed: int):
    """``(x (n, F), y (n, 1), w_true (F, 1) or None, b_true or None)``."""
    rng = np.random.default_rng(seed)
    if model == "linear":
        x = rng.normal(size=(n, features)).astype(np.float32)
        w = rng.uniform(-2, 2, size=(features, 1)).astype(np.float32)
        b = np.float32(rng.uniform(-1, 1))
        y = x @ w + b + noise * rng.normal(size=(n, 1)).astype(np.float32)
        return x, y.astype(np.float32), w, b
    x = rng.uniform(-1, 1, size=(n, 1)).astype(np.float32)
    y = np.sin(3 * x) + noise * rng.normal(size=(n, 1)).astype(np.float32)
    return x, y.astype(np.float32), None, None


def build(model: str, hidden: int) -> nj.Layer:
    if model == "linear":
        return nj.Dense(1)  # params: kernel (F, 1), bias (1,)
    return MLP(MLPConfig(hidden=(hidden, hidden), num_outputs=1, activation=jax.nn.tanh))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--n", type=int, default=2000, help="training examples")
    parser.add_argument("--features", type=int, default=8, help="input features (linear)")
    parser.add_argument("--hidden", type=int, default=64, help="MLP width (mlp)")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the target noise")
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 linear, 200 mlp")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="peak SGD step; default 0.05 / 0.02")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data (CI)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20 if args.model == "linear" else 200
    if args.lr is None:
        args.lr = 0.05 if args.model == "linear" else 0.02
    if args.smoke:
        args.n, args.epochs, args.hidden = 128, 2, 8

    x, y, w_true, b_true = make_data(args.model, args.n, args.features, args.noise, args.seed)
    x_test, y_test, _, _ = make_data(args.model, 1000, args.features, args.noise, args.seed)
    if w_true is not None:  # same weights, fresh inputs
        rng = np.random.default_rng(args.seed + 1)
        x_test = rng.normal(size=x_test.shape).astype(np.float32)
        y_test = x_test @ w_true + b_true + args.noise * rng.normal(size=y_test.shape)
        y_test = y_test.astype(np.float32)

    model = build(args.model, args.hidden)
    params, state = model.init(jax.random.key(args.seed), x[:1])
    steps = args.epochs * (args.n // args.batch_size)
    schedule = optax.cosine_decay_schedule(args.lr, steps)  # anneal to 0: no SGD jitter at the end
    optimizer = optax.sgd(schedule, momentum=args.momentum or None)
    tr = nj.trainer(model, nj.losses.mse, optimizer)
    data = nj.data.batches((x, y), args.batch_size, seed=args.seed, epochs=args.epochs)
    ts, history = nj.fit(tr, tr.init(params, state), data, progress=not args.smoke)

    test_mse = float(tr.evaluate(ts, (x_test, y_test))["loss"])
    last_epoch = np.mean(history["loss"][-data.steps_per_epoch :])
    print(f"steps: {len(history['loss'])}, train loss over the last epoch {last_epoch:.4f}")
    print(f"test MSE: {test_mse:.4f} (noise floor {args.noise**2:.4f})")
    if args.model == "linear":
        w = np.asarray(ts.params["kernel"])[:, 0]
        b = float(ts.params["bias"][0])
        print("       true    learned")
        for i, (t, v) in enumerate(zip(w_true[:, 0], w, strict=True)):
            print(f"w[{i}] {t:8.4f} {v:8.4f}")
        print(f"b    {b_true:8.4f} {b:8.4f}")
        err = float(np.max(np.abs(np.append(w - w_true[:, 0], b - b_true))))
        print(f"max |learned - true|: {err:.4f}")
        return {"test_mse": test_mse, "max_error": err}
    return {"test_mse": test_mse}


if __name__ == "__main__":
    main()
