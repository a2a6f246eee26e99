"""Look at a model without running it: parameter tables, counts and paths."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from nnjax.core.combinators import Layer, record_outputs
from nnjax.core.paths import count_params, flatten, leaf_paths
from nnjax.core.report import param_bytes, table

__all__ = ["summary", "Summary", "count_params", "param_bytes", "leaf_paths", "param_shapes"]


class Summary(str):
    """The table :func:`summary` returns: a ``str`` that a REPL or notebook shows as the table."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def param_shapes(model: Layer, x: Any, key: jax.Array | None = None) -> tuple[dict, dict]:
    """``(params, state)`` of ``model.init`` as ShapeDtypeStruct trees, from ``jax.eval_shape``."""
    key = jax.random.key(0) if key is None else key
    return jax.eval_shape(model.init, key, x)


def _fmt_shape(s: Any) -> str:
    if isinstance(s, jax.ShapeDtypeStruct):
        return f"{tuple(s.shape)} {s.dtype}"
    return str(jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), s))


def summary(model: Layer, x: Any, *, key: jax.Array | None = None, print_fn: Any = None) -> Summary:
    """A table of every param and state leaf (path, shape, dtype, count) and each child's output.

    Everything comes from ``jax.eval_shape``, so it works for a model too big to
    allocate. It returns the table and prints nothing: ``print(nj.summary(model, x))``
    prints it once; a REPL or notebook shows the returned table as it is.

    Args:
        model: a Layer.
        x: an example input (an array, a ``jax.ShapeDtypeStruct`` or a pytree of them).
        key: the init key (shapes do not depend on it).
        print_fn: also hand the table to this function (``print``, ``logger.info``).

    Returns:
        A :class:`Summary`, a ``str``.

    Example:
        >>> text = nj.summary(nj.serial(nj.Dense(4), head=nj.Dense(2)), jnp.zeros((1, 3)))
        >>> print(text.splitlines()[-2])
        head      (1, 2) float32
    """
    params, state = param_shapes(model, x, key)
    lines = []
    for title, tree in (("params", params), ("state", state)):
        flat = flatten(tree)
        if not flat:
            continue
        rows = [
            (path, str(tuple(v.shape)), str(v.dtype), f"{int(np.prod(v.shape)):,}")
            for path, v in flat.items()
        ]
        rows.append(
            (f"total {title}", "", "", f"{count_params(tree):,} ({param_bytes(tree):,} bytes)")
        )
        lines += [table((title, "shape", "dtype", "count"), rows), ""]
    outputs = record_outputs(model, params, state, x)
    lines.append(table(("layer", "output"), [(path, _fmt_shape(s)) for path, s in outputs]))
    text = Summary("\n".join(lines))
    if print_fn is not None:
        print_fn(text)
    return text
