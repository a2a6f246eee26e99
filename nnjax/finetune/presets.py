"""Common fine-tuning recipes, each nothing but a mask (True = trainable).

Combine them with :func:`nnjax.finetune.union` (``union(bias_only(p), head_only(p))``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nnjax.core.errors import ArgumentError, GlobError
from nnjax.core.paths import glob_match, leaf_paths, match, near_paths
from nnjax.finetune.masks import mask, union

__all__ = [
    "NORM_GLOBS",
    "head_only",
    "bias_only",
    "norms_only",
    "block_names",
    "last_k_blocks",
    "progressive_unfreezing",
]

NORM_GLOBS = tuple(
    f"**/{parent}/{leaf}"
    for parent in ("*norm*", "*Norm*", "ln*", "bn*", "gn*")
    for leaf in ("scale", "bias")
)
"""Which leaves :func:`norms_only` trains: ``scale`` and ``bias`` of a layer whose name
contains ``norm`` (``layernorm_0``, ``batchnorm_1``, ``rmsnorm``, ``final_norm``,
``GroupNorm_0``) or starts with ``ln``, ``bn`` or ``gn`` (``ln_1``, ``ln_f``, ``bn_0``,
``gn1``): the default names of nnjax's norm layers and the usual GPT/ResNet names."""


def head_only(params: Any, head: str = "head") -> Any:
    """Train only the sub-tree ``head`` (``head/**``); everything else frozen.

    Raises:
        GlobError: no leaf under ``head``.
    """
    return mask(params, include=f"{head}/**")


def bias_only(params: Any) -> Any:
    """BitFit: train every ``bias`` leaf (``**/bias``), freeze the rest."""
    return mask(params, include="**/bias")


def norms_only(params: Any) -> Any:
    """Train the normalisation layers' ``scale`` and ``bias`` only (see :data:`NORM_GLOBS`).

    Raises:
        GlobError: no leaf follows the naming rule of :data:`NORM_GLOBS`.
    """
    paths = leaf_paths(params)
    found = [g for g in NORM_GLOBS if any(glob_match(g, p) for p in paths)]
    if not found:
        raise GlobError(
            "norms_only: no norm parameters (scale/bias under a layer named *norm*, ln*, bn* "
            f"or gn*); near paths: {near_paths('**/layernorm_0/scale', paths)}"
        )
    return mask(params, include=found)


def _index(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return None if m is None else int(m.group(1))


def block_names(params: Any, blocks: str = "blocks") -> list[str]:
    """The children of ``blocks`` in depth order: ``["0", "1", ...]`` for a ``repeat``,
    ``["block_0", "block_1", ...]`` for a ``serial`` (ordered by their trailing number)."""
    prefix = blocks.strip("/") + "/"
    names: dict[str, None] = {}
    for p in match(params, f"{prefix}**", what="blocks glob"):
        names[p[len(prefix) :].split("/")[0]] = None
    order = list(names)
    numbered = {n: i for n in order if (i := _index(n)) is not None}
    if len(numbered) == len(order):
        order.sort(key=numbered.__getitem__)
    return order


def last_k_blocks(
    params: Any, k: int, blocks: str = "blocks", also: str | Iterable[str] = ()
) -> Any:
    """Train the last ``k`` blocks under ``blocks`` (and the leaves globs ``also`` select).

    ``blocks`` may hold a ``repeat`` (stacked copies: the mask leaves there become
    ``(n,)`` bool arrays selecting the last ``k``) or named children ordered by
    their trailing number (``block_0`` ... ``block_11``).

    Args:
        params: the params tree.
        k: how many blocks to train, ``1 <= k <= n``.
        blocks: the path of the blocks' parent.
        also: more globs to train, e.g. ``("ln_f/**", "head/**")``.

    Example:
        >>> model = nj.serial(nj.Dense(16), blocks=nj.repeat(nj.Dense(16), 4), head=nj.Dense(2))
        >>> params, _ = model.init(key, jnp.zeros((1, 8)))
        >>> m = nj.finetune.last_k_blocks(params, 2, also="head/**")
        >>> m["blocks"]["stacked"]["kernel"]  # 4 stacked blocks
        array([False, False,  True,  True])
        >>> m["head"]["kernel"], m["dense_0"]["kernel"]
        (True, False)
    """
    names = block_names(params, blocks)
    if not 1 <= k <= len(names):
        raise ArgumentError(
            f"last_k_blocks: expected 1 <= k <= {len(names)} (blocks under {blocks!r}), got k == {k}"
        )
    globs = [f"{blocks.strip('/')}/{n}/**" for n in names[-k:]]
    globs += [also] if isinstance(also, str) else list(also)
    return mask(params, include=globs)


def progressive_unfreezing(
    params: Any, stages: Sequence[str | Iterable[str]], every: int = 1
) -> Callable[[int], Any]:
    """A schedule of masks: stage ``s`` trains the globs of ``stages[0..s]``.

    Epoch ``e`` is in stage ``min(e // every, len(stages) - 1)``: first the head, then
    ever more blocks from the top (ULMFiT's gradual unfreezing). Every mask is built
    and checked up front. A trainer is compiled for one mask; build one per stage
    (``trainer(..., trainable=schedule(epoch))``) when the stage changes.

    Args:
        params: the params tree.
        stages: per stage, a glob or globs that stage adds,
            e.g. ``["head/**", "blocks/11/**", "blocks/10/**"]``.
        every: epochs per stage, ``>= 1``.

    Returns:
        ``schedule(epoch) -> mask``.

    Raises:
        GlobError: a glob of a stage matches no leaf.
    """
    if every < 1:
        raise ArgumentError(f"progressive_unfreezing: every must be >= 1, got {every}")
    if not stages:
        raise ArgumentError("progressive_unfreezing: expected at least one stage")
    masks = []
    for stage in stages:
        m = mask(params, include=stage)
        masks.append(m if not masks else union(masks[-1], m))

    def schedule(epoch: int) -> Any:
        if epoch < 0:
            raise ArgumentError(f"expected epoch >= 0, got {epoch}")
        return masks[min(epoch // every, len(masks) - 1)]

    return schedule
