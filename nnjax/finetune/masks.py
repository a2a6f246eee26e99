"""Trainability masks: which parameter leaves a fine-tuning updates.

A mask is a pytree with the structure of ``params`` whose leaves are Python
bools, True = trainable (``DESIGN.md`` §4). It is built from ``/``-path globs
over *logical* paths (:func:`nnjax.core.paths.leaf_paths`), so a glob can pick single
copies of a ``repeat``-stacked layer: ``blocks/10/**`` selects copy 10 of the leaves
under ``blocks/stacked/...``. Where a glob selects only some copies of a stacked
leaf, that leaf's mask is a NumPy bool array over the stacked axes (``(n,)`` for
one ``repeat``, ``(n1, n2)`` for a repeat inside a repeat); a leaf whose copies are
all selected (or none) is plain ``True`` (``False``).

Example:
    >>> model = nj.serial(nj.Dense(16), blocks=nj.repeat(nj.Dense(16), 4), head=nj.Dense(2))
    >>> params, _ = model.init(key, jnp.zeros((1, 8)))
    >>> m = nj.finetune.mask(params, include="**", exclude="blocks/0/**")
    >>> m["blocks"]["stacked"]["kernel"]
    array([False,  True,  True,  True])
    >>> print(nj.finetune.report(params, m))
    group    trainable  frozen  trainable bytes  frozen bytes  trainable %
    -------  ---------  ------  ---------------  ------------  -----------
    dense_0        144       0            576 B           0 B       100.00
    blocks         816     272          3.2 KiB       1.1 KiB        75.00
    head            34       0            136 B           0 B       100.00
    -------  ---------  ------  ---------------  ------------  -----------
    total          994     272          3.9 KiB       1.1 KiB        78.52
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from nnjax.core.errors import MaskError
from nnjax.core.masks import collapse, resolve
from nnjax.core.paths import flatten, keypath_str, logical_copies, match
from nnjax.core.report import human_bytes, leaf_bytes, table
from nnjax.layers import quantized

__all__ = [
    "mask",
    "report",
    "MaskReport",
    "GroupCount",
    "trainable_count",
    "trainable_bytes",
    "union",
    "intersect",
    "invert",
    "map_copies",
    "keypath_str",
    "logical_copies",
]

Globs = str | Iterable[str]


def map_copies(fn: Callable[[str], Any], params: Any, dtype: Any = object) -> Any:
    """A tree like ``params`` with each leaf ``fn(logical_path)`` per stacked copy.

    The result's leaf is a Python scalar where every copy of the leaf gets the same
    value (always, outside ``repeat``), else a NumPy array (``dtype``) over the
    stacked axes. Works on any pytree of arrays or ShapeDtypeStructs, nested dicts
    or flat ``{"a/b": x}`` dicts alike, so it adapts to the subtree a trainer
    hands an optimizer.
    """

    def leaf(keypath, x):
        copies = logical_copies(keypath_str(keypath), np.shape(x))
        return collapse(np.vectorize(fn, otypes=[dtype])(copies), dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _globs(globs: Globs) -> list[str]:
    return [globs] if isinstance(globs, str) else list(globs)


def mask(params: Any, include: Globs = "**", exclude: Globs = ()) -> Any:
    """A trainability mask: leaves matched by ``include`` and not by ``exclude`` are True.

    Args:
        params: a params tree (arrays or ShapeDtypeStructs).
        include: glob or globs over logical paths (``head/**``, ``**/bias``,
            ``blocks/*/attn/**``, ``blocks/10/**``); default all.
        exclude: globs taken out of ``include``.

    Returns:
        A tree like ``params``: ``True``/``False`` per leaf, or a NumPy bool array
        ``(n,)`` over the copies of a ``repeat``-stacked leaf of which only some
        are selected.

    Raises:
        GlobError: a glob in ``include`` or ``exclude`` matches no leaf (the message
            lists near paths).

    Example:
        >>> model = nj.serial(backbone=nj.serial(nj.Dense(16)), head=nj.Dense(2))
        >>> params, _ = model.init(key, jnp.zeros((1, 8)))
        >>> m = nj.finetune.mask(params, "**", exclude="backbone/**")
        >>> m["backbone"]["dense_0"]["kernel"], m["head"]["kernel"]
        (False, True)
    """
    chosen = set(match(params, _globs(include), what="include glob"))
    excluded = _globs(exclude)
    if excluded:
        chosen -= set(match(params, excluded, what="exclude glob"))
    return map_copies(chosen.__contains__, params, dtype=bool)


def _bool_op(op: Callable[..., np.ndarray], *masks: Any) -> Any:
    if not masks:
        raise MaskError("expected at least one mask")
    return jax.tree.map(lambda *ms: collapse(op(*(np.asarray(m) for m in ms)), bool), *masks)


def union(*masks: Any) -> Any:
    """Leaves trainable in any of ``masks`` (same structure; stacked arrays combine per copy)."""
    return _bool_op(lambda *ms: np.logical_or.reduce(np.broadcast_arrays(*ms)), *masks)


def intersect(*masks: Any) -> Any:
    """Leaves trainable in every one of ``masks``."""
    return _bool_op(lambda *ms: np.logical_and.reduce(np.broadcast_arrays(*ms)), *masks)


def invert(m: Any) -> Any:
    """Trainable <-> frozen."""
    return _bool_op(np.logical_not, m)


def _counts(params: Any, m: Any) -> list[tuple[str, int, int, int, int]]:
    """``(path, trainable count, total count, trainable bytes, total bytes)`` per leaf.

    ``m`` is read as the trainer reads it (:func:`nnjax.core.masks.resolve`), so a bool
    may stand for a subtree and a report counts exactly what a train step updates.
    Counts are logical parameters: a quantized kernel counts the float kernel's values
    (a packed NF4 byte holds two), its ``kernel_scale`` none (an int8 token table's
    ``embedding_scale`` none either); bytes are what is stored.
    """
    resolved = resolve(m, params)
    flat = flatten(params)
    rows = []
    for path, x in flat.items():
        parent, _, leaf = path.rpartition("/")
        prefix = f"{parent}/" if parent else ""
        size, mk, stored = int(np.prod(np.shape(x))), resolved[path], leaf_bytes(x)
        if leaf in (quantized.SCALE, quantized.ROW_SCALE) and path[: -len("_scale")] in flat:
            rows.append((path, 0, 0, 0, stored))
            continue
        if leaf == "kernel" and quantized.is_quantized(x):
            scale = flat.get(f"{prefix}{quantized.SCALE}")
            size = math.prod(quantized.logical_shape(x, scale))
        share = float(np.mean(mk)) if isinstance(mk, np.ndarray) else float(mk)
        itemsize = stored // max(int(np.prod(np.shape(x))), 1)
        trained = round(size * share)
        rows.append((path, trained, size, trained * itemsize, stored))
    return rows


def trainable_count(params: Any, m: Any) -> int:
    """Number of trainable scalars (a stacked leaf counts only its selected copies)."""
    return sum(r[1] for r in _counts(params, m))


def trainable_bytes(params: Any, m: Any) -> int:
    """Bytes of the trainable scalars: what a gradient, or one Adam moment, takes."""
    return sum(r[3] for r in _counts(params, m))


class GroupCount(NamedTuple):
    """Trainable and frozen scalars and bytes of one top-level group (or the total)."""

    group: str
    trainable: int
    frozen: int
    trainable_bytes: int
    frozen_bytes: int


class MaskReport(NamedTuple):
    """What a mask trains, by top-level group; ``str(report)`` is a table."""

    groups: tuple[GroupCount, ...]
    total: GroupCount

    def __str__(self) -> str:
        header = ("group", "trainable", "frozen", "trainable bytes", "frozen bytes", "trainable %")
        rows = [
            (
                g.group,
                f"{g.trainable:,}",
                f"{g.frozen:,}",
                human_bytes(g.trainable_bytes),
                human_bytes(g.frozen_bytes),
                f"{100 * g.trainable / max(g.trainable + g.frozen, 1):.2f}",
            )
            for g in (*self.groups, self.total)
        ]
        return table(header, rows[:-1], align="lrrrrr", footer=rows[-1:])


def report(params: Any, m: Any) -> MaskReport:
    """Trainable and frozen parameter counts and bytes per top-level group, with totals.

    Counts are logical parameters (a quantized kernel counts the float kernel's values,
    its scales none); bytes are what the leaves store.

    Args:
        params: the params tree (arrays or ShapeDtypeStructs).
        m: a mask for it (see :func:`mask`).

    Returns:
        A :class:`MaskReport`; ``print(report)`` shows the table.
    """
    sums: dict[str, list[int]] = {}
    for path, t, n, t_bytes, n_bytes in _counts(params, m):
        s = sums.setdefault(path.split("/")[0], [0, 0, 0, 0])
        s[0] += t
        s[1] += n - t
        s[2] += t_bytes
        s[3] += n_bytes - t_bytes
    groups = tuple(GroupCount(g, *s) for g, s in sums.items())
    total = GroupCount("total", *(sum(s[i] for s in sums.values()) for i in range(4)))
    return MaskReport(groups, total)
