"""Write your own layers: one with params, one with state, one with an rng.

Each is a function returning ``nj.Layer(init, apply, name)``; the three plug into
``nj.serial`` and train with ``nj.trainer`` like the built-in layers. Run:

    python examples/custom_layer.py            # trains a tiny regression for 200 steps
    python examples/custom_layer.py --smoke    # 20 steps
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj


def Scale(features: int, *, name: str = "scale") -> nj.Layer:
    """``y = x * scale + bias`` per feature: a layer with params ``scale (d,)``, ``bias (d,)``."""

    def init(key, x):
        del key  # deterministic init: ones and zeros
        d = x.shape[-1]
        if d != features:
            raise nj.LayerError(f"expected x.shape[-1] == {features}, got x.shape == {x.shape}")
        return {"scale": jnp.ones((d,), x.dtype), "bias": jnp.zeros((d,), x.dtype)}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        # Broadcasts written out, as nnjax's own layers do: a (d,) vector against (..., d).
        scale, bias = (jax.lax.broadcast_to_rank(params[k], x.ndim) for k in ("scale", "bias"))
        return x * scale + bias, state

    return nj.Layer(init, apply, name)


def RunningMean(momentum: float = 0.9, *, name: str = "running_mean") -> nj.Layer:
    """Subtract a running mean of the input's features: a layer with state ``mean (d,)``.

    In train mode the batch mean updates the state; in eval mode the stored mean is
    used and the state comes back unchanged. State is not trained: the trainer carries
    it from step to step beside the params.
    """

    def init(key, x):
        del key
        return {}, {"mean": jnp.zeros((x.shape[-1],), jnp.float32)}

    def apply(params, state, x, *, rng=None, train=False):
        del params, rng
        if not train:
            return x - jax.lax.broadcast_to_rank(state["mean"], x.ndim), state
        batch_mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
        mean = momentum * state["mean"] + (1 - momentum) * batch_mean
        return x - jax.lax.broadcast_to_rank(batch_mean, x.ndim), {"mean": mean}

    return nj.Layer(init, apply, name)


def GaussianNoise(stddev: float, *, name: str = "noise") -> nj.Layer:
    """Add ``N(0, stddev^2)`` noise in train mode: a layer that needs an ``rng``."""

    def init(key, x):
        del key, x
        return {}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del params
        if not train:
            return x, state
        if rng is None:
            raise nj.LayerError("GaussianNoise in train mode needs an rng: apply(..., rng=key)")
        return x + stddev * jax.random.normal(rng, x.shape, x.dtype), state

    return nj.Layer(init, apply, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="20 steps")
    args = parser.parse_args(argv)
    steps = 20 if args.smoke else args.steps

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32) + 3.0
    y = x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32)

    model = nj.serial(RunningMean(), GaussianNoise(0.01), Scale(4), head=nj.Dense(1))
    params, state = model.init(jax.random.key(0), x[:1])
    print(nj.summary(model, x[:1]))

    tr = nj.trainer(model, nj.losses.mse, optax.adam(1e-2))
    ts = tr.init(params, state)
    for step in range(steps):
        batch = (x[step % 8 * 32 : step % 8 * 32 + 32], y[step % 8 * 32 : step % 8 * 32 + 32])
        ts, metrics = tr.step(ts, batch, jax.random.key(step))
    print(f"running mean: {np.round(np.asarray(ts.state['running_mean_0']['mean']), 2)}")
    print(f"final loss: {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
