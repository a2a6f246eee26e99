"""A padded batch: ``{"inputs": x, "lengths": lengths}``, the one form sequences of unequal length take.

``x`` is right-padded along its time axis (token ids ``(B, T)``, or vectors
``(B, T, C)``); sequence ``b`` is ``x[b, :lengths[b]]``. ``Embedding`` maps the
``inputs`` and hands the lengths on; the recurrent layers read them (and an optional
``initial_carry``). A layer that takes an array and gets a padded batch says so
(:func:`nnjax.core.checks.check_rank`).

Example:
    >>> from nnjax.core import padded
    >>> x = {"inputs": jnp.zeros((2, 5), jnp.int32), "lengths": jnp.array([5, 2])}
    >>> ids, rest = padded.split(x)
    >>> ids.shape, sorted(rest)
    ((2, 5), ['lengths'])
    >>> sorted(padded.join(jnp.zeros((2, 5, 8)), rest))
    ['inputs', 'lengths']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from nnjax.core.checks import check_keys, shape_str
from nnjax.core.errors import LayerError
from nnjax.core.layer import Layer

__all__ = ["KEYS", "split", "join", "keep_lengths"]

KEYS = ("inputs", "lengths", "initial_carry")
"""The keys of a padded batch: ``inputs`` required, the others optional."""


def split(x: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(inputs, the other keys)`` of a padded batch; ``(x, None)`` for a plain array.

    Raises:
        LayerError: a dict without ``inputs`` or with a key not in :data:`KEYS`.
    """
    if not isinstance(x, Mapping):
        return x, None
    if "inputs" not in x:
        raise LayerError(
            f'expected an array or a padded batch {{"inputs": x, "lengths": lengths}}, got a '
            f"dict with keys {sorted(x)}"
        )
    check_keys(x, KEYS[:1], KEYS[1:], kind="input key")
    return x["inputs"], {k: v for k, v in x.items() if k != "inputs"}


def join(y: Any, rest: dict[str, Any] | None) -> Any:
    """``y`` as the ``inputs`` of a padded batch with ``rest``'s keys; ``y`` alone if None."""
    return y if rest is None else {"inputs": y, **rest}


def keep_lengths(layer: Layer) -> Layer:
    """``layer`` (a recurrent layer returning sequences) with the padded batch handed on.

    A recurrent layer reads a padded batch and returns its outputs ``(B, T, H)``, zeros
    past each length; the next recurrent layer would read those zeros as input. Wrapped,
    it returns ``{"inputs": outputs, "lengths": lengths}``, so layers stack over a padded
    batch: ``serial(Embedding(V, E), keep_lengths(LSTM(H)), LSTM(H,
    return_sequences=False))``. Params, state and name are ``layer``'s own (paths do
    not change). A plain array passes through as ``layer`` takes it.

    Raises:
        LayerError: ``layer``'s output is not a sequence ``inputs.shape[:-1] + (H,)``
            (``return_sequences=False`` or ``return_state=True``).

    Example:
        >>> model = nj.serial(nj.Embedding(10, 4), nj.keep_lengths(nj.GRU(8)),
        ...                   nj.GRU(8, return_sequences=False))
        >>> x = {"inputs": jnp.ones((2, 5), jnp.int32), "lengths": jnp.array([5, 2])}
        >>> params, state = model.init(key, x)
        >>> model.apply(params, state, x)[0].shape
        (2, 8)
    """

    def init(key, x):
        return layer.init(key, x)

    def apply(params, state, x, *, rng=None, train=False):
        y, state = layer.apply(params, state, x, rng=rng, train=train)
        inputs, rest = split(x)
        if rest is None:
            return y, state
        if not hasattr(y, "shape") or tuple(np.shape(y))[:-1] != tuple(np.shape(inputs))[:-1]:
            got = shape_str(np.shape(y)) if hasattr(y, "shape") else f"a {type(y).__name__}"
            raise LayerError(
                f"keep_lengths: expected the layer to return a sequence of shape "
                f"{shape_str(np.shape(inputs)[:-1])} + (features,) (return_sequences=True, "
                f"return_state=False), got {got}"
            )
        return join(y, {"lengths": rest["lengths"]} if "lengths" in rest else {}), state

    return Layer(init, apply, layer.name)
