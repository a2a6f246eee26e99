"""MLP: a stack of Dense layers with a classification (or regression) head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax

from nnjax.core.combinators import Layer, serial
from nnjax.layers import Dense, Dropout, Flatten

__all__ = ["MLPConfig", "MLP"]


@dataclass(frozen=True)
class MLPConfig:
    """Configuration of :func:`MLP`.

    Attributes:
        hidden: widths of the hidden Dense layers, in order (``()``: a linear model).
        num_outputs: width of the head (classes, or regression targets).
        activation: applied after each hidden Dense (a ``jax.nn`` function).
        dropout_rate: dropout after each hidden activation (0: none).
    """

    hidden: tuple[int, ...] = (128, 128)
    num_outputs: int = 10
    activation: Callable = jax.nn.relu
    dropout_rate: float = 0.0


def MLP(config: MLPConfig = MLPConfig()) -> Layer:
    """A multi-layer perceptron: flatten, ``len(hidden)`` Dense + activation, a Dense head.

    Input ``(B, ...)`` (flattened to ``(B, D)``), output ``(B, num_outputs)``
    (logits, or regression outputs).

    Params:
        backbone/dense_{i}/kernel: ``(D_i, hidden[i])``, ``backbone/dense_{i}/bias``: ``(hidden[i],)``.
        head/kernel: ``(hidden[-1], num_outputs)``, head/bias: ``(num_outputs,)``.

    Example:
        >>> model = nj.models.MLP(nj.models.MLPConfig(hidden=(32,), num_outputs=10))
        >>> params, _ = model.init(key, jnp.zeros((8, 8, 8, 1)))
        >>> jax.tree.map(jnp.shape, params)
        {'backbone': {'dense_0': {'bias': (32,), 'kernel': (64, 32)}}, 'head': {'bias': (10,), 'kernel': (32, 10)}}
    """
    body = [Flatten()]
    for width in config.hidden:
        body += [Dense(width), config.activation]
        if config.dropout_rate:
            body.append(Dropout(config.dropout_rate))
    return serial(backbone=serial(*body), head=Dense(config.num_outputs))
