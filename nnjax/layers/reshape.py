"""Flatten and Reshape: parameter-free layers that change the trailing axes."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_rank, shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import LayerError

__all__ = ["Flatten", "Reshape"]


def _no_params(key, x):
    del key, x
    return {}, {}


def Flatten(*, batch_dims: int = 1, name: str = "flatten") -> Layer:
    """Merge every axis after the first ``batch_dims`` into one: ``(B, H, W, C) -> (B, H*W*C)``."""

    def apply(params, state, x, *, rng=None, train=False):
        del params, rng, train
        check_rank(x, batch_dims, f"(first {batch_dims} kept)")
        return jnp.reshape(x, (*np.shape(x)[:batch_dims], -1)), state

    return Layer(_no_params, apply, name)


def Reshape(shape: tuple[int, ...], *, batch_dims: int = 1, name: str = "reshape") -> Layer:
    """Reshape the axes after the first ``batch_dims`` to ``shape`` (one entry may be -1)."""
    shape = tuple(int(d) for d in shape)

    def apply(params, state, x, *, rng=None, train=False):
        del params, rng, train
        check_rank(x, batch_dims, f"(first {batch_dims} kept)")
        lead, trail = np.shape(x)[:batch_dims], np.shape(x)[batch_dims:]
        size, known = math.prod(trail), math.prod(d for d in shape if d != -1)
        if (-1 in shape and (known == 0 or size % known)) or (-1 not in shape and known != size):
            raise LayerError(
                f"cannot reshape trailing axes {shape_str(trail)} of x.shape == "
                f"{shape_str(np.shape(x))} to {shape}"
            )
        return jnp.reshape(x, (*lead, *shape)), state

    return Layer(_no_params, apply, name)
