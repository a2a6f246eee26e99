"""LeNet-5 (LeCun et al. 1998) with ReLU and average pooling."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from nnjax.core.checks import check_rank, shape_str
from nnjax.core.combinators import Layer, serial
from nnjax.core.errors import LayerError
from nnjax.layers import AvgPool, Conv, Dense, Flatten

__all__ = ["LeNet5Config", "LeNet5"]


@dataclass(frozen=True)
class LeNet5Config:
    """Configuration of :func:`LeNet5`.

    Attributes:
        num_classes: width of the head.
        second_padding: padding of the second convolution: ``"VALID"`` as in the
            paper (28x28 input); ``"SAME"`` fits inputs smaller than 28x28 (8x8 digits).
    """

    num_classes: int = 10
    second_padding: str = "VALID"


def LeNet5(config: LeNet5Config = LeNet5Config()) -> Layer:
    """LeNet-5: ``(B, H, W, C) -> (B, num_classes)`` logits.

    conv 6@5x5 SAME, ReLU, avg-pool 2, conv 16@5x5 (``second_padding``), ReLU,
    avg-pool 2, flatten, Dense 120, ReLU, Dense 84, ReLU (the backbone), then a
    Dense head. On ``(B, 28, 28, C)`` the flattened features are ``5 * 5 * 16 = 400``;
    on ``(B, 8, 8, C)`` with ``second_padding="SAME"`` they are ``2 * 2 * 16 = 64``.

    Raises:
        LayerError: input not ``(B, H, W, C)``, or smaller than 10x10 with
            ``second_padding="VALID"`` (the second convolution would have no output).

    Params:
        backbone/conv_0: kernel ``(5, 5, C, 6)``, bias ``(6,)``.
        backbone/conv_1: kernel ``(5, 5, 6, 16)``, bias ``(16,)``.
        backbone/dense_0: kernel ``(F, 120)``; backbone/dense_1: kernel ``(120, 84)``.
        head: kernel ``(84, num_classes)``, bias ``(num_classes,)``.

    Example:
        >>> params, _ = nj.models.LeNet5().init(key, jnp.zeros((1, 28, 28, 1)))
        >>> jax.tree.map(jnp.shape, params)["backbone"]["dense_0"]
        {'bias': (120,), 'kernel': (400, 120)}
    """
    relu = jax.nn.relu
    backbone = serial(
        Conv(6, (5, 5), padding="SAME"),
        relu,
        AvgPool((2, 2)),
        Conv(16, (5, 5), padding=config.second_padding),
        relu,
        AvgPool((2, 2)),
        Flatten(),
        Dense(120),
        relu,
        Dense(84),
        relu,
    )
    model = serial(backbone=backbone, head=Dense(config.num_classes))

    def check(x):
        check_rank(x, 4, "(B, H, W, C)")
        if config.second_padding == "VALID" and min(np.shape(x)[-3:-1]) < 10:
            raise LayerError(
                'expected H, W >= 10 with second_padding="VALID" (use "SAME" for smaller '
                f"images), got x.shape == {shape_str(np.shape(x))}"
            )

    def init(key, x):
        check(x)
        return model.init(key, x)

    def apply(params, state, x, *, rng=None, train=False):
        check(x)
        return model.apply(params, state, x, rng=rng, train=train)

    return Layer(init, apply, "lenet5")
