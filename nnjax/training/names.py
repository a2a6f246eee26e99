"""Names a Keras user types for an optimizer, a loss or a metric, resolved once at build time.

``nj.trainer(model, "sparse_categorical_crossentropy", "adam", metrics=["accuracy"])``
is ``nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-3),
metrics={"accuracy": nj.metrics.accuracy})``. An unknown name is an ``ArgumentError``
listing the accepted ones, raised before anything is traced.

The tables are data: an optimizer name maps to an optax factory and the learning rate
Keras defaults to (every other hyperparameter is optax's default); loss and metric
names map to nnjax's functions. The losses take what nnjax models output, logits
(Keras' ``from_logits=True``): end a model with ``Dense(classes)``, not a softmax.

Example:
    >>> from nnjax.training import names
    >>> names.resolve_loss("mse") is nj.losses.mse
    True
    >>> names.resolve_metrics(["accuracy"]) == {"accuracy": nj.metrics.accuracy}
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import optax

from nnjax.core.errors import ArgumentError
from nnjax.training import losses, metrics

__all__ = [
    "OPTIMIZERS",
    "LOSSES",
    "METRICS",
    "OptimizerName",
    "resolve_optimizer",
    "resolve_loss",
    "resolve_metrics",
]


class OptimizerName(NamedTuple):
    """An optax factory and the learning rate a bare name gets (Keras' default)."""

    factory: Callable[..., optax.GradientTransformation]
    learning_rate: float


OPTIMIZERS: Mapping[str, OptimizerName] = MappingProxyType(
    {
        "adam": OptimizerName(optax.adam, 1e-3),
        "adamw": OptimizerName(optax.adamw, 1e-3),
        "sgd": OptimizerName(optax.sgd, 1e-2),
        "rmsprop": OptimizerName(optax.rmsprop, 1e-3),
        "adagrad": OptimizerName(optax.adagrad, 1e-3),
        "adamax": OptimizerName(optax.adamax, 1e-3),
        "nadam": OptimizerName(optax.nadam, 1e-3),
        "lion": OptimizerName(optax.lion, 1e-3),
        "adafactor": OptimizerName(optax.adafactor, 1e-3),
    }
)
"""Optimizer names: ``name -> (optax factory, learning rate)``."""

LOSSES: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "sparse_categorical_crossentropy": losses.softmax_cross_entropy,
        "softmax_cross_entropy": losses.softmax_cross_entropy,
        "categorical_crossentropy": losses.softmax_cross_entropy_onehot,
        "softmax_cross_entropy_onehot": losses.softmax_cross_entropy_onehot,
        "binary_crossentropy": losses.sigmoid_binary_cross_entropy,
        "sigmoid_binary_cross_entropy": losses.sigmoid_binary_cross_entropy,
        "mse": losses.mse,
        "mean_squared_error": losses.mse,
        "mae": losses.mae,
        "mean_absolute_error": losses.mae,
        "huber": losses.huber,
    }
)
"""Loss names (Keras' and nnjax's own): ``name -> loss(outputs, targets)`` on logits."""

METRICS: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "accuracy": metrics.accuracy,
        "acc": metrics.accuracy,
        "sparse_categorical_accuracy": metrics.accuracy,
        "categorical_accuracy": metrics.accuracy,
        "top5_accuracy": metrics.top_k(5),
        "sparse_top_k_categorical_accuracy": metrics.top_k(5),
        "mse": losses.mse,
        "mae": losses.mae,
    }
)
"""Metric names: ``name -> metric(outputs, targets)``; the name is the metric's key."""


def _unknown(what: str, got: Any, table: Mapping[str, Any], also: str) -> ArgumentError:
    names = ", ".join(repr(n) for n in table)
    return ArgumentError(f"{what}: expected {also} or one of the names {names}; got {got!r}")


def resolve_optimizer(optimizer: Any) -> optax.GradientTransformation:
    """An optax transformation as it is, or the one a name stands for (see :data:`OPTIMIZERS`).

    Raises:
        ArgumentError: an unknown name, or neither a name nor an optax transformation.
    """
    if isinstance(optimizer, str):
        entry = OPTIMIZERS.get(optimizer.lower())
        if entry is None:
            raise _unknown("optimizer", optimizer, OPTIMIZERS, "an optax GradientTransformation")
        return entry.factory(entry.learning_rate)
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise _unknown("optimizer", optimizer, OPTIMIZERS, "an optax GradientTransformation")
    return optimizer


def resolve_loss(loss_fn: Any) -> Callable[..., Any]:
    """A loss function as it is, or the one a name stands for (see :data:`LOSSES`).

    Raises:
        ArgumentError: an unknown name, or neither a name nor a callable.
    """
    if isinstance(loss_fn, str):
        fn = LOSSES.get(loss_fn.lower())
        if fn is None:
            raise _unknown("loss", loss_fn, LOSSES, "a function loss(outputs, targets)")
        return fn
    if not callable(loss_fn):
        raise _unknown("loss", loss_fn, LOSSES, "a function loss(outputs, targets)")
    return loss_fn


def resolve_metrics(
    given: Sequence[Any] | Mapping[str, Any],
) -> dict[str, Callable[..., Any]]:
    """``{key: metric}`` from a dict, or a list of functions (keyed by ``__name__``) and names.

    Raises:
        ArgumentError: an unknown name, a function without a usable ``__name__``, or two
            metrics under one key.
    """
    if isinstance(given, str):
        given = [given]
    if isinstance(given, Mapping):
        return {k: _metric(v, f"metrics[{k!r}]") for k, v in given.items()}
    fns: dict[str, Callable[..., Any]] = {}
    for i, item in enumerate(given):
        fn = _metric(item, f"metrics[{i}]")
        name = item if isinstance(item, str) else getattr(fn, "__name__", "")
        if not name or name.startswith("<") or name in fns:
            raise ArgumentError(
                f"metrics[{i}]: {item!r} needs a unique __name__; pass metrics as a dict "
                "{name: fn}"
            )
        fns[name] = fn
    return fns


def _metric(item: Any, where: str) -> Callable[..., Any]:
    if isinstance(item, str):
        fn = METRICS.get(item.lower())
        if fn is None:
            raise _unknown(where, item, METRICS, "a function metric(outputs, targets)")
        return fn
    if not callable(item):
        raise _unknown(where, item, METRICS, "a function metric(outputs, targets)")
    return item
