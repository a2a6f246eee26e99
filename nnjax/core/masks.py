"""Trainable masks, read: a bool tree resolved against params, split and merged.

Below both users of a mask: the trainer (which differentiates only the trainable
leaves) and ``nnjax.finetune`` (which builds masks from globs and reports them).
A mask leaf is ``True`` (trainable), ``False`` (frozen), or a NumPy bool array
over the stacked axes of a ``repeat``-stacked leaf (``(n,)`` selects copies); a
bool may also stand for a whole subtree (``{"backbone": False, "head": True}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import shape_str
from nnjax.core.errors import MaskError
from nnjax.core.paths import flatten, stack_depth, unflatten

__all__ = [
    "collapse",
    "resolve",
    "check_copies",
    "require_trainable",
    "split",
    "merge",
    "select_copies",
    "require_frozen_quantized",
]

Resolved = dict[str, "bool | np.ndarray"]


def collapse(values: Any, dtype: Any) -> Any:
    """A per-copy array as one Python scalar when all copies agree, else a NumPy array."""
    values = np.asarray(values, dtype=dtype)
    flat = values.reshape(-1)
    if flat.size and bool(np.all(flat == flat[0])):
        first = flat[0]
        return first.item() if isinstance(first, np.generic) else first
    return values


def _leaf(path: str, value: Any) -> bool | np.ndarray:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    arr = np.asarray(value)
    if arr.dtype != np.bool_ or arr.ndim == 0:
        raise MaskError(
            f"trainable[{path!r}]: expected a bool or a NumPy bool array, got {value!r}"
        )
    return collapse(arr, bool)


def check_copies(path: str, m: np.ndarray, shape: tuple[int, ...]) -> None:
    """A bool array ``m`` must lie over the stacked axes of the leaf ``path`` of ``shape``."""
    n_stacked = stack_depth(path)
    if m.ndim > n_stacked or tuple(shape[: m.ndim]) != m.shape:
        raise MaskError(
            f"trainable[{path!r}]: expected a bool array over the {n_stacked} stacked axes "
            f"of {path!r} (shape {shape_str(shape)}), got shape {shape_str(m.shape)}"
        )


def resolve(trainable: Any, params: Mapping[str, Any]) -> Resolved:
    """``{param path: True | False | bool array}`` for every leaf of ``params``.

    Args:
        trainable: ``None`` (all trainable), a bool, or a bool tree over ``params``
            whose bools may cover whole subtrees.
        params: the params tree (arrays or ShapeDtypeStructs).

    Raises:
        MaskError: a param without a mask entry, a mask path that is no param, a
            leaf that is not a bool, or a bool array that does not fit the stacked axes.
    """
    param_flat = flatten(params)
    if trainable is None or isinstance(trainable, bool):
        return dict.fromkeys(param_flat, trainable is None or trainable)
    mask_flat = {p: _leaf(p, v) for p, v in flatten(trainable).items()}
    resolved, used = {}, set()
    for path, leaf in param_flat.items():
        parts = path.split("/")
        prefixes = ("/".join(parts[:i]) for i in range(len(parts), 0, -1))
        hit = next((p for p in prefixes if p in mask_flat), None)
        if hit is None:
            raise MaskError(f"trainable mask has no entry for param {path!r}")
        used.add(hit)
        value = mask_flat[hit]
        if isinstance(value, np.ndarray):
            check_copies(path, value, np.shape(leaf))
        resolved[path] = value
    unknown = sorted(set(mask_flat) - used)
    if unknown:
        raise MaskError(f"trainable mask has paths that are not params: {unknown}")
    return resolved


def require_trainable(resolved: Resolved) -> None:
    """Refuse a mask that freezes every param: training with it would change nothing."""
    if resolved and not any(v is not False for v in resolved.values()):
        raise MaskError(
            f"the trainable mask selects no parameter (all {len(resolved)} leaves frozen), so "
            "training would change nothing; check the mask's globs (nj.finetune.report shows it)"
        )


def split(params: Mapping[str, Any], resolved: Resolved) -> tuple[dict, dict[str, Any]]:
    """``(trainable tree, {path: frozen leaf})``; the trainable tree is a nested dict."""
    flat = flatten(params)
    trainable = unflatten({p: v for p, v in flat.items() if resolved[p] is not False})
    return trainable, {p: v for p, v in flat.items() if resolved[p] is False}


def merge(template: Mapping[str, Any], trainable: Any, frozen: Mapping[str, Any]) -> dict:
    """``template``'s structure (empty subtrees included) with leaves from ``trainable`` and ``frozen``."""
    flat = {**frozen, **flatten(trainable)}

    def rebuild(node, prefix):
        return {
            k: rebuild(v, f"{prefix}{k}/") if isinstance(v, Mapping) else flat[f"{prefix}{k}"]
            for k, v in node.items()
        }

    return rebuild(template, "")


def select_copies(resolved: Resolved, new: Any, old: Any | None) -> dict:
    """``new``, except on the unselected copies of partially masked stacked leaves.

    There it takes ``old``'s values (zeros where ``old`` is None): the trainer zeroes
    the unselected copies' gradients and keeps their values this way.
    """
    old_flat = {} if old is None else flatten(old)
    out = {}
    for path, n in flatten(new).items():
        m = resolved[path]
        if isinstance(m, np.ndarray):
            o = old_flat[path] if old is not None else jnp.zeros_like(n)
            n = jnp.where(m.reshape(m.shape + (1,) * (n.ndim - m.ndim)), n, o)
        out[path] = n
    return merge(new, {}, out)


def require_frozen_quantized(resolved: Resolved, params: Mapping[str, Any]) -> None:
    """Refuse a mask that trains a quantized leaf: an integer ``kernel`` or its ``kernel_scale``.

    A quantized kernel (``nj.finetune.quantize``) has no gradient; train adapters on
    top of it, or ``nj.finetune.dequantize`` it first.
    """
    flat = flatten(params)
    is_int = lambda p: p in flat and jnp.issubdtype(jnp.result_type(flat[p]), jnp.integer)
    bad = [
        p
        for p, v in resolved.items()
        if v is not False and (is_int(p) or (p.endswith("_scale") and is_int(p[: -len("_scale")])))
    ]
    if bad:
        raise MaskError(
            f"the trainable mask trains quantized (frozen) leaves {bad}; a quantized kernel and "
            "its scale are frozen: train adapters on top of it (nj.finetune.add_lora) or "
            "nj.finetune.dequantize the params first"
        )
