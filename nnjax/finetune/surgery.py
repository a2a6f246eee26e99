"""Model surgery: new heads, and pretrained params loaded into a changed model by path.

Typical transfer (10 classes -> 5)::

    new_params, _ = new_model.init(key, x)          # same backbone, head Dense(5)
    params, rep = nj.finetune.load_pretrained(new_params, pretrained, strict=False)
    print(rep)   # head/kernel (64, 5) vs (64, 10), head/bias: mismatched, kept new

or keep the old tree and give it a fresh head:
``params = nj.finetune.replace_head(pretrained, key, nj.Dense(5), features)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import ArgumentError, CheckpointError, GlobError
from nnjax.core.layer import Layer, as_layer, call_child, checked_init
from nnjax.core.paths import flatten, stack_depth, unflatten
from nnjax.core.report import shorten
from nnjax.finetune.masks import logical_copies

__all__ = ["LoadReport", "load_pretrained", "replace_head"]


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did, by logical path (stacked copies separately).

    Attributes:
        loaded: paths copied from the pretrained params.
        missing: paths of the new params the pretrained ones lack (kept as initialised).
        unexpected: pretrained paths the new params lack (ignored).
        mismatched: ``(path, new shape, pretrained shape)`` (kept as initialised).
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def ok(self) -> bool:
        """Every path loaded: nothing missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} path(s)"]
        if self.missing:
            lines.append(
                f"missing ({len(self.missing)}, kept as initialised): {shorten(self.missing)}"
            )
        if self.unexpected:
            lines.append(
                f"unexpected ({len(self.unexpected)}, ignored): {shorten(self.unexpected)}"
            )
        if self.mismatched:
            mism = [f"{p} new {n} vs pretrained {o}" for p, n, o in self.mismatched]
            lines.append(f"mismatched shape ({len(mism)}, kept as initialised): {shorten(mism)}")
        return "\n".join(lines)


def _copies(flat: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{logical path: (physical path, index over the stacked axes)}``."""
    out = {}
    for path, leaf in flat.items():
        logical = logical_copies(path, np.shape(leaf))
        for idx in np.ndindex(*logical.shape):
            out[logical[idx]] = (path, idx)
    return out


def load_pretrained(
    new_params: Any, pretrained: Any, *, strict: bool = True
) -> tuple[Any, LoadReport]:
    """Copy ``pretrained`` into ``new_params`` wherever the logical paths and shapes agree.

    Matching is by logical path, so a stack of 4 pretrained blocks fills the first
    4 copies of a new stack of 6 (the last 2 are reported missing). Values are cast
    to the new params' dtypes. As PyTorch's ``load_state_dict``: ``strict=True``
    requires the two trees to correspond exactly.

    Args:
        new_params: the freshly initialised params of the (changed) model.
        pretrained: the params to copy from.
        strict: raise unless every path is loaded.

    Returns:
        ``(params, report)``: ``new_params`` with the matching values replaced, and a
        :class:`LoadReport` (``print(report)`` reads it).

    Raises:
        CheckpointError: with ``strict``, any missing, unexpected or mismatched path
            (the message lists them).
    """
    new_flat, old_flat = flatten(new_params), flatten(pretrained)
    old_copies = _copies(old_flat)
    used: set[str] = set()
    loaded, missing, mismatched = [], [], []
    out = {}
    for path, leaf in new_flat.items():
        depth = stack_depth(path)
        shape = tuple(np.shape(leaf))
        value = leaf
        logical = logical_copies(path, shape)
        for idx, name in np.ndenumerate(logical):
            if name not in old_copies:
                missing.append(name)
                continue
            used.add(name)
            old_path, old_idx = old_copies[name]
            old_leaf = old_flat[old_path]
            old_shape = tuple(np.shape(old_leaf))[len(old_idx) :]
            if old_shape != shape[depth:]:
                mismatched.append((name, shape[depth:], old_shape))
                continue
            loaded.append(name)
            piece = jnp.asarray(old_leaf[old_idx], leaf.dtype)
            value = piece if not idx else jnp.asarray(value).at[idx].set(piece)
        out[path] = value
    unexpected = [p for p in old_copies if p not in used]
    report = LoadReport(loaded, missing, unexpected, mismatched)
    if strict and not report.ok:
        raise CheckpointError(
            f"pretrained params do not fit the model (strict=True; pass strict=False to load "
            f"what fits):\n{report}"
        )
    return unflatten(out), report


def replace_head(params: Any, key: jax.Array, layer: Layer, x: Any, *, path: str = "head") -> Any:
    """``params`` with the sub-tree at ``path`` replaced by ``layer.init(key, x)``'s params.

    Args:
        params: the model's params.
        key: PRNG key for the new head.
        layer: the new head (``nj.Dense(5)``); it must have no state.
        x: an example of the head's input (array or ``jax.ShapeDtypeStruct``,
            ``(B, features)``).
        path: where the head sits (``head``, ``backbone/classifier``).

    Returns:
        New params (the old tree is not modified); build the model with the same
        new head to apply them.

    Raises:
        GlobError: ``path`` is not a sub-tree of ``params``.
    """
    head_params, head_state = call_child(path, checked_init, as_layer(layer), key, x)
    if jax.tree.leaves(head_state):
        raise ArgumentError(
            "replace_head: the new head has state; init the new model and use load_pretrained"
        )
    *parents, last = path.strip("/").split("/")
    root = dict(params)
    node = root
    for i, k in enumerate(parents):
        if not isinstance(node.get(k), Mapping):
            raise GlobError(
                f"replace_head: no sub-tree {'/'.join(parents[: i + 1])!r} in params; keys: {sorted(node)}"
            )
        node[k] = dict(node[k])
        node = node[k]
    if last not in node:
        raise GlobError(f"replace_head: no sub-tree {path!r} in params; keys there: {sorted(node)}")
    node[last] = head_params
    return root
