"""Dropout: zero a random fraction of the input in train mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError, LayerError

__all__ = ["Dropout"]


def Dropout(rate: float, *, broadcast_dims: tuple[int, ...] = (), name: str = "dropout") -> Layer:
    """Zero each element with probability ``rate`` in train mode, scaling the rest by ``1/(1-rate)``.

    ``rate`` is the probability of *dropping* (unlike stax's keep rate). In eval
    mode (``train=False``) it is the identity. ``broadcast_dims`` shares one mask
    along those axes (e.g. ``(-2,)`` drops whole time steps' features alike).

    Raises:
        LayerError: ``train=True`` without an ``rng``.
    """
    if not 0.0 <= rate < 1.0:
        raise ArgumentError(f"Dropout: rate must be in [0, 1), got {rate}")

    def init(key, x):
        del key, x
        return {}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del params
        if not train or rate == 0.0:
            return x, state
        if rng is None:
            raise LayerError(
                f"Dropout(rate={rate}) in train mode needs an rng: "
                "apply(..., train=True, rng=jax.random.key(...))"
            )
        shape = list(jnp.shape(x))
        for d in broadcast_dims:
            shape[d] = 1
        keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype), state

    return Layer(init, apply, name)
