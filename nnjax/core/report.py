"""Reports for people: the one table formatter and the one byte counter.

Every text table nnjax prints (``summary``, mask reports, ``StepCost``, load
reports) is laid out by :func:`table`, and every byte count (params, gradients,
optimizer state) is :func:`param_bytes` of a pytree, printed by :func:`human_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from nnjax.core.errors import ArgumentError

__all__ = ["table", "human_bytes", "param_bytes", "leaf_bytes", "shorten"]


def leaf_bytes(x: Any) -> int:
    """Bytes one array leaf takes (an array, NumPy scalar or ``ShapeDtypeStruct``); 0 for a non-array."""
    if not hasattr(x, "dtype"):
        return 0
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def param_bytes(tree: Any) -> int:
    """Bytes a pytree's array leaves take: params, state, optimizer state, a whole ``TrainState``.

    Works on ``ShapeDtypeStruct`` leaves, so a model too big to allocate can be sized;
    leaves that are not arrays (Python numbers, ``None``) count 0.

    Example:
        >>> nj.param_bytes({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4, jnp.bfloat16)})
        56
    """
    return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


def human_bytes(n: float) -> str:
    """``1,024 B`` -> ``1.0 KiB``: bytes in binary units, as reports print them.

    Example:
        >>> nj.core.report.human_bytes(512), nj.core.report.human_bytes(3 * 2**20)
        ('512 B', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n):,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(
    header: Sequence[str] | None,
    rows: Iterable[Sequence[str]],
    *,
    align: str = "",
    footer: Iterable[Sequence[str]] = (),
) -> str:
    """Rows of strings as a plain-text table, columns two spaces apart.

    Args:
        header: column titles, underlined with dashes; None for a table without
            one (key/value listings).
        rows: the body, one sequence of cells per row, as many cells as columns.
        align: one letter per column, ``l`` (left, the default for columns not
            given) or ``r`` (right, for numbers).
        footer: rows (totals) set off from the body by a dashed rule.

    Returns:
        The table, lines joined by newlines, without trailing spaces.

    Example:
        >>> print(nj.core.report.table(("name", "count"), [("a", "1"), ("bb", "20")], align="lr"))
        name  count
        ----  -----
        a         1
        bb       20
    """
    rows, footer = [tuple(r) for r in rows], [tuple(r) for r in footer]
    every = ([tuple(header)] if header is not None else []) + rows + footer
    ncol = max((len(r) for r in every), default=0)
    if any(len(r) != ncol for r in every):
        raise ArgumentError(
            f"table: expected {ncol} cells in every row, got {[len(r) for r in every]}"
        )
    widths = [max(len(r[i]) for r in every) for i in range(ncol)]
    align = align.ljust(ncol, "l")

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = line(tuple("-" * w for w in widths))
    lines = [line(header), rule] if header is not None else []
    lines += [line(r) for r in rows]
    if footer:
        lines += [rule, *(line(r) for r in footer)]
    return "\n".join(lines)


def shorten(items: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` items joined by commas, then ``... (n more)``.

    Example:
        >>> nj.core.report.shorten([str(i) for i in range(12)], limit=3)
        '0, 1, 2, ... (9 more)'
    """
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
