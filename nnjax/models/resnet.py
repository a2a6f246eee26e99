"""A small ResNet (He et al. 2016) of basic blocks, for 28x28 to 32x32 images."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from nnjax.core.combinators import Layer, residual, serial
from nnjax.core.errors import ArgumentError
from nnjax.layers import BatchNorm, Conv, Dense, GlobalAvgPool

__all__ = ["ResNetConfig", "ResNet", "BasicBlock"]


@dataclass(frozen=True)
class ResNetConfig:
    """Configuration of :func:`ResNet` (the CIFAR ResNet of He et al. 2016, section 4.2).

    Attributes:
        widths: channels of each stage; stages after the first halve H and W.
        blocks_per_stage: basic blocks in each stage (3 with widths ``(16, 32, 64)``
            is ResNet-20).
        num_classes: width of the head.
        momentum: BatchNorm momentum (the weight of the old running value).
    """

    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 2
    num_classes: int = 10
    momentum: float = 0.9


def BasicBlock(
    features: int, strides: int = 1, *, project: bool = False, momentum: float = 0.9
) -> Layer:
    """``relu(shortcut(x) + bn(conv(relu(bn(conv(x))))))``, two 3x3 convolutions.

    Input ``(B, H, W, C)``, output ``(B, H / strides, W / strides, features)``.
    The shortcut is the identity, or with ``project`` a strided 1x1 conv and a
    BatchNorm (needed when ``strides > 1`` or ``C != features``).

    Params:
        conv_0: kernel ``(3, 3, C, features)``; conv_1: kernel ``(3, 3, features, features)``.
        batchnorm_0, batchnorm_1: scale, bias ``(features,)``.
        shortcut/conv_0: kernel ``(1, 1, C, features)``, shortcut/batchnorm_0 (with ``project``).

    State:
        batchnorm_{0,1}/{mean,var} and shortcut/batchnorm_0/{mean,var}: ``(features,)``.
    """
    shortcut = None
    if project:
        shortcut = serial(
            Conv(features, (1, 1), strides=strides, use_bias=False), BatchNorm(momentum=momentum)
        )
    body = residual(
        Conv(features, (3, 3), strides=strides, use_bias=False),
        BatchNorm(momentum=momentum),
        jax.nn.relu,
        Conv(features, (3, 3), use_bias=False),
        BatchNorm(momentum=momentum),
        shortcut=shortcut,
    )

    def apply(params, state, x, *, rng=None, train=False):
        y, state = body.apply(params, state, x, rng=rng, train=train)
        return jax.nn.relu(y), state

    # The residual's params sit directly under the block: block_0/conv_0/kernel.
    return Layer(body.init, apply, "block")


def ResNet(config: ResNetConfig = ResNetConfig()) -> Layer:
    """A ResNet for small images: ``(B, H, W, C) -> (B, num_classes)`` logits.

    A 3x3 stem conv (``widths[0]`` channels) with BatchNorm and ReLU, then one
    stage of ``blocks_per_stage`` :func:`BasicBlock` per width (the first block
    of every stage after the first has stride 2 and a projection shortcut),
    global average pooling to ``(B, widths[-1])`` and a Dense head. On 32x32 input
    with three stages the feature maps are 32, 16 and 8 pixels wide; on 28x28, 28,
    14 and 7. Call with ``train=True`` (``nj.trainer`` does) to use batch
    statistics and update the running ones in ``state``.

    Params:
        backbone/stem/conv_0: kernel ``(3, 3, C, widths[0])``; backbone/stem/batchnorm_0.
        backbone/stage_{i}/block_{j}/...: see :func:`BasicBlock`.
        head: kernel ``(widths[-1], num_classes)``, bias ``(num_classes,)``.

    State: BatchNorm ``mean``, ``var`` at the same paths as their ``scale``, ``bias``.

    Example:
        >>> model = nj.models.ResNet(nj.models.ResNetConfig(widths=(8, 16), blocks_per_stage=1))
        >>> params, state = model.init(key, jnp.zeros((2, 32, 32, 3)))
        >>> jax.tree.map(jnp.shape, params)["backbone"]["stage_1"]["block_0"]["shortcut"]
        {'batchnorm_0': {'bias': (16,), 'scale': (16,)}, 'conv_0': {'kernel': (1, 1, 8, 16)}}
    """
    if not config.widths or config.blocks_per_stage < 1:
        raise ArgumentError(
            f"ResNet: expected widths and blocks_per_stage >= 1, got {config.widths}, "
            f"{config.blocks_per_stage}"
        )
    m = config.momentum
    stages = {}
    in_width = config.widths[0]
    for i, width in enumerate(config.widths):
        blocks = {}
        for j in range(config.blocks_per_stage):
            strides = 2 if (i > 0 and j == 0) else 1
            project = j == 0 and (strides != 1 or width != in_width)
            blocks[f"block_{j}"] = BasicBlock(width, strides, project=project, momentum=m)
        stages[f"stage_{i}"] = serial(**blocks)
        in_width = width
    stem = serial(
        Conv(config.widths[0], (3, 3), use_bias=False), BatchNorm(momentum=m), jax.nn.relu
    )
    backbone = serial(stem=stem, **stages, pool=GlobalAvgPool())
    return serial(backbone=backbone, head=Dense(config.num_classes))
