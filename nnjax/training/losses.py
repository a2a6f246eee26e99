"""Losses: ``loss(outputs, targets) -> scalar``, each the mean over examples.

Thin wrappers over ``optax.losses`` that reduce to the mean, check shapes at
trace time (a ``(B, 1)`` prediction against ``(B,)`` targets is an error, not a
silent ``(B, B)`` broadcast) and add what a training loop needs: integer labels
with ``ignore_index`` and label smoothing, as ``torch.nn.functional.cross_entropy``.

Example:
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(nj.losses.softmax_cross_entropy(logits, jnp.array([0]))), 5)
    0.24131
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnjax.core.checks import labels_in_range, shape_str
from nnjax.core.errors import ShapeError
from nnjax.training.chunked import (
    LazyLogits,
    chunked_token_nll,
    reshape_logits,
    take_positions,
    token_log_probs,
)

__all__ = [
    "LazyLogits",
    "token_log_probs",
    "reshape_logits",
    "take_positions",
    "softmax_cross_entropy",
    "softmax_cross_entropy_onehot",
    "sigmoid_binary_cross_entropy",
    "mse",
    "mae",
    "huber",
]


def _check_same_shape(predictions: Any, targets: Any, what: str = "predictions") -> None:
    if np.shape(predictions) != np.shape(targets):
        raise ShapeError(
            f"expected targets.shape == {what}.shape == {shape_str(np.shape(predictions))}, "
            f"got targets.shape == {shape_str(np.shape(targets))}"
        )


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over ``mask`` (all if None); 0 where the mask selects nothing."""
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    where: jax.Array | None = None,
) -> jax.Array:
    """Cross-entropy of softmax(logits) against integer labels, mean over counted positions.

    Args:
        logits: ``(..., C)`` unnormalised scores; ``(B, C)`` for classification,
            ``(B, T, V)`` for a language model, or :class:`LazyLogits` (what a
            :func:`~nnjax.models.CausalLM` returns in training above a size): then the loss
            and its gradient go over vocabulary chunks and never hold ``(B, T, V)``.
        labels: ``(...)`` integer class ids, ``logits.shape[:-1]``.
        label_smoothing: ``eps``: the target is ``(1 - eps) * onehot + eps / C``
            (``optax.smooth_labels``, as ``torch``'s ``label_smoothing``).
        ignore_index: positions whose label equals it do not count (padding).
        where: optional bool ``(...)``: only True positions count.

    Returns:
        The mean over counted positions, a float scalar (0 if none counts).

    Labels must lie in ``[0, C)`` at every counted position (not ``ignore_index``, not
    outside ``where``): eagerly a label outside is a ``ShapeError``; under ``jit``
    (a train step) the loss is NaN, which ``check_finite`` and ``fit`` refuse (as
    ``Embedding`` treats ids). ``optax`` alone would take label -1 as the last class.

    Raises:
        ShapeError: ``labels.shape != logits.shape[:-1]``, non-integer labels, or
            (eagerly) a counted label outside ``[0, C)``.
    """
    if np.ndim(logits) < 1 or np.shape(labels) != np.shape(logits)[:-1]:
        raise ShapeError(
            f"expected labels.shape == logits.shape[:-1] == {shape_str(np.shape(logits)[:-1])}, "
            f"got labels.shape == {shape_str(np.shape(labels))}"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ShapeError(
            f"expected integer labels (use softmax_cross_entropy_onehot for one-hot), "
            f"got labels.dtype == {jnp.result_type(labels)}"
        )
    mask = None if where is None else jnp.asarray(where, bool)
    if ignore_index is not None:
        keep = labels != ignore_index
        mask = keep if mask is None else mask & keep
    in_range = labels_in_range(labels, np.shape(logits)[-1], mask)
    if ignore_index is not None:
        labels = jnp.where(keep, labels, 0)
    if isinstance(logits, LazyLogits):
        per_position = chunked_token_nll(logits, labels, label_smoothing=label_smoothing)
    elif label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        per_position = optax.losses.softmax_cross_entropy(logits, targets)
    else:
        per_position = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    if in_range is not None:  # traced: a label outside [0, C) makes the loss NaN
        per_position = jnp.where(in_range, per_position, jnp.nan)
    return _masked_mean(per_position, mask)


def softmax_cross_entropy_onehot(
    logits: jax.Array, onehot: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy of softmax(logits) against target distributions, mean over positions.

    Args:
        logits: ``(..., C)``.
        onehot: ``(..., C)`` one-hot (or any probability) targets.
        label_smoothing: as in :func:`softmax_cross_entropy`.
    """
    _check_same_shape(logits, onehot, "logits")
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return jnp.mean(optax.losses.softmax_cross_entropy(logits, onehot))


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of sigmoid(logits) against labels in [0, 1], mean over elements.

    Args:
        logits: ``(...)``.
        labels: ``(...)``, same shape; 0/1 or soft targets.
    """
    _check_same_shape(logits, labels, "logits")
    return jnp.mean(
        optax.losses.sigmoid_binary_cross_entropy(logits, jnp.asarray(labels, logits.dtype))
    )


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error ``mean((predictions - targets) ** 2)``; same shapes ``(...)``."""
    _check_same_shape(predictions, targets)
    return jnp.mean(optax.losses.squared_error(predictions, targets))


def mae(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean absolute error ``mean(|predictions - targets|)``; same shapes ``(...)``.

    (optax has no absolute-error loss; this is ``jnp.abs`` and ``jnp.mean``.)
    """
    _check_same_shape(predictions, targets)
    return jnp.mean(jnp.abs(predictions - targets))


def huber(predictions: jax.Array, targets: jax.Array, *, delta: float = 1.0) -> jax.Array:
    """Mean Huber loss: ``0.5 e^2`` for ``|e| <= delta``, else ``delta (|e| - 0.5 delta)``.

    Same shapes ``(...)``; as ``torch.nn.functional.huber_loss``. For another
    ``delta`` in a trainer: ``functools.partial(nj.losses.huber, delta=0.5)``.
    """
    _check_same_shape(predictions, targets)
    return jnp.mean(optax.losses.huber_loss(predictions, targets, delta=delta))
