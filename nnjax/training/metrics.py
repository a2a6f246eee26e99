"""Metrics ``metric(outputs, targets) -> scalar`` and a running average over batches.

A trainer keys each metric by its ``__name__`` (``accuracy``, ``top5_accuracy``).
:class:`MetricsAverage` averages per-batch metrics weighted by example count, with
pure functions (:func:`update`, :func:`compute`) that also run under ``jit``.

Example:
    >>> avg = nj.metrics.MetricsAverage()
    >>> avg = nj.metrics.update(avg, {"accuracy": 0.5}, 4)
    >>> avg = nj.metrics.update(avg, {"accuracy": 1.0}, 2)
    >>> nj.metrics.compute(avg)
    {'accuracy': Array(0.6666667, dtype=float32)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_int, labels_in_range, shape_str
from nnjax.core.errors import ArgumentError, ShapeError

__all__ = [
    "accuracy",
    "top_k_accuracy",
    "top_k",
    "perplexity",
    "MetricsAverage",
    "update",
    "compute",
]


def _class_ids(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Integer labels ``logits.shape[:-1]``; one-hot (or probability) labels are argmaxed."""
    if np.shape(labels) == np.shape(logits):
        return jnp.argmax(labels, axis=-1)
    if np.ndim(logits) < 1 or np.shape(labels) != np.shape(logits)[:-1]:
        raise ShapeError(
            f"expected labels.shape == logits.shape[:-1] == {shape_str(np.shape(logits)[:-1])} "
            f"(or one-hot, logits.shape), got labels.shape == {shape_str(np.shape(labels))}"
        )
    return labels


def _mean(hits: jax.Array, where: jax.Array | None, in_range: Any = None) -> jax.Array:
    hits = hits.astype(jnp.float32)
    if in_range is not None:  # traced labels outside [0, C): NaN, as the losses give
        hits = jnp.where(in_range, hits, jnp.nan)
    if where is None:
        return jnp.mean(hits)
    w = jnp.asarray(where, jnp.float32)
    return jnp.sum(hits * w) / jnp.maximum(jnp.sum(w), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Fraction of positions whose argmax equals the label.

    Args:
        logits: ``(..., C)``.
        labels: ``(...)`` integer ids, or ``(..., C)`` one-hot.
        where: optional bool ``(...)``: only True positions count.

    Returns:
        A float32 scalar in [0, 1].
    """
    labels = _class_ids(logits, labels)
    in_range = labels_in_range(labels, np.shape(logits)[-1], where)
    return _mean(jnp.argmax(logits, axis=-1) == labels, where, in_range)


def top_k_accuracy(
    logits: jax.Array, labels: jax.Array, k: int = 5, *, where: jax.Array | None = None
) -> jax.Array:
    """Fraction of positions whose label is among the ``k`` highest logits.

    A label counts as a hit when fewer than ``k`` classes score strictly higher
    (so ties are counted in the label's favour).

    Args:
        logits: ``(..., C)``.
        labels: ``(...)`` integer ids, or ``(..., C)`` one-hot.
        k: how many top classes count.
        where: optional bool ``(...)``: only True positions count.
    """
    labels = _class_ids(logits, labels)
    in_range = labels_in_range(labels, np.shape(logits)[-1], where)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    return _mean(rank < k, where, in_range)


def top_k(k: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A metric ``fn(logits, labels)`` = :func:`top_k_accuracy` with ``k``, named ``top{k}_accuracy``.

    Example:
        >>> logits = jnp.array([[0.1, 0.5, 0.4], [0.8, 0.1, 0.2]])
        >>> top2 = nj.metrics.top_k(2)  # nj.trainer(..., metrics=[nj.metrics.accuracy, top2])
        >>> top2.__name__, float(top2(logits, jnp.array([2, 1])))
        ('top2_accuracy', 0.5)
    """
    k = check_int(k, "k")

    def metric(logits, labels):
        return top_k_accuracy(logits, labels, k)

    metric.__name__ = metric.__qualname__ = f"top{k}_accuracy"
    return metric


def perplexity(mean_loss: jax.Array) -> jax.Array:
    """``exp(mean cross-entropy)`` (in nats). Average the loss over a dataset first, then call this."""
    return jnp.exp(mean_loss)


class MetricsAverage(NamedTuple):
    """A running, example-weighted average: ``sums[k] = sum_i n_i * metrics_i[k]``, ``count = sum_i n_i``.

    ``MetricsAverage()`` is empty; it is a pytree, so it can be carried through ``jit``.
    """

    sums: Mapping[str, Any] = {}  # never mutated: update returns a new dict
    count: Any = 0.0


def update(avg: MetricsAverage, metrics: Mapping[str, Any], n: Any) -> MetricsAverage:
    """``avg`` with one more batch of ``n`` examples whose (mean) metrics are ``metrics``.

    Args:
        avg: the average so far (``MetricsAverage()`` to start).
        metrics: ``{name: scalar (or array)}``, each a mean over the batch's examples.
        n: the number of examples in the batch (the weight).

    Raises:
        ArgumentError: ``metrics`` has other keys than the batches before it.
    """
    if avg.sums and set(avg.sums) != set(metrics):
        raise ArgumentError(
            f"expected metrics with keys {sorted(avg.sums)}, got keys {sorted(metrics)}"
        )
    n = jnp.asarray(n, jnp.float32)
    sums = {k: jnp.asarray(v, jnp.float32) * n for k, v in metrics.items()}
    if avg.sums:
        sums = {k: avg.sums[k] + v for k, v in sums.items()}
    return MetricsAverage(sums, avg.count + n)


def compute(avg: MetricsAverage) -> dict[str, jax.Array]:
    """``{name: sums[name] / count}``: the example-weighted mean of each metric."""
    return {k: s / avg.count for k, s in avg.sums.items()}
