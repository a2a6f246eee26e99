"""Parameter-efficient adapters beside Dense-style kernels: LoRA, IA3, DoRA; merge, save, load.

Adapters are leaves beside the kernel they adapt (``.../query/kernel`` gets
``.../query/lora_a``); a Dense (or an attention projection) that finds them uses
them (``nnjax.layers.dense.ADAPTER_KEYS``):

- LoRA: ``lora_a (in, r)``, ``lora_b (r, out)``, ``y = x @ kernel + (x @ lora_a) @ lora_b``;
  the scale ``alpha / r`` is folded into ``lora_a`` at creation, ``lora_b`` starts at 0.
- IA3: ``ia3_scale (out,)``, ``y = (x @ kernel) * ia3_scale``; starts at 1.
- DoRA: ``dora_magnitude (out,)`` with LoRA's ``a, b``: ``W' = kernel + a @ b``, each column
  normalised and scaled by the magnitude; starts at the kernel's column norms.

So at creation the model's outputs are unchanged. Each ``add_*`` returns the new
params and the mask that trains only the new adapters.

Targets are globs over logical paths that must select kernels ``(in, out)``.
A kernel inside ``repeat`` is stacked, ``(n, in, out)``; its adapters are stacked the
same way (``lora_a (n, in, r)``, ``lora_b (n, r, out)``). If the globs select only some
copies (``blocks/1[01]/attn/query/kernel``), the adapters still cover the whole
stack (a stacked leaf has one shape), but the returned mask is a ``(n,)`` bool
array that trains only the selected copies; the others keep ``lora_b == 0`` (and
``ia3_scale == 1``), so they change nothing and merge back bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.checkpoint.state import load_params, save_params
from nnjax.core.errors import CheckpointError
from nnjax.core.paths import STACKED, flatten, match, unflatten
from nnjax.finetune.masks import map_copies
from nnjax.layers.dense import ADAPTER_KEYS

__all__ = [
    "add_lora",
    "add_ia3",
    "add_dora",
    "merge_lora",
    "merge_ia3",
    "merge_dora",
    "merge_adapters",
    "adapter_params",
    "adapter_mask",
    "remove_adapters",
    "save_adapters",
    "load_adapters",
]

Initializer = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _sibling(path: str, name: str) -> str:
    parent = path.rpartition("/")[0]
    return f"{parent}/{name}" if parent else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _targets(params: Any, targets: str | Iterable[str], what: str) -> dict[str, Any]:
    """``{physical kernel path: True | (n,) bool array of selected copies}``."""
    chosen = set(match(params, targets, what=f"{what} target"))
    sel = flatten(map_copies(chosen.__contains__, params, dtype=bool))
    flat = flatten(params)
    out = {}
    for path, m in sel.items():
        if m is False:
            continue
        shape = np.shape(flat[path])
        depth = path.split("/").count(STACKED)
        if path.rpartition("/")[2] != "kernel" or len(shape) - depth != 2:
            raise ValueError(
                f"{what}: targets must select Dense-style kernels (in, out) (stacked: (n, in, out)); "
                f"{path!r} has shape {tuple(shape)}"
            )
        out[path] = m
    return out


def _check_free(flat: dict[str, Any], path: str, names: Iterable[str], what: str) -> None:
    taken = [n for n in names if _sibling(path, n) in flat]
    if taken:
        raise ValueError(f"{what}: {_parent(path) or 'the root'} already has {taken}")


def _with(params: Any, new: dict[str, tuple[Any, Any]]) -> tuple[Any, Any]:
    """Params with the leaves ``{path: (value, mask)}`` added, and the mask training only them."""
    flat = flatten(params)
    m = dict.fromkeys(flat, False)
    for path, (value, mk) in new.items():
        flat[path] = value
        m[path] = mk
    return unflatten(flat), unflatten(m)


def _lora_leaves(path, kernel, key, rank, alpha, a_init):
    *stack, n_in, n_out = kernel.shape
    stack = tuple(stack)
    a = a_init(key, (*stack, n_in, rank), kernel.dtype) * jnp.asarray(alpha / rank, kernel.dtype)
    b = jnp.zeros((*stack, rank, n_out), kernel.dtype)
    return {_sibling(path, "lora_a"): a, _sibling(path, "lora_b"): b}


def _default_a_init(depth: int) -> Initializer:
    # PyTorch/peft's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), per stacked copy.
    return jax.nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=tuple(range(depth))
    )


def add_lora(
    params: Any,
    key: jax.Array,
    targets: str | Iterable[str] = ("**/query/kernel", "**/value/kernel"),
    rank: int = 8,
    alpha: float = 16.0,
    a_init: Initializer | None = None,
) -> tuple[Any, Any]:
    """Add LoRA adapters beside each targeted kernel.

    Args:
        params: the params tree.
        key: PRNG key for ``lora_a``.
        targets: globs over logical paths selecting kernels (attention query/value
            by default; ``"**/kernel"`` for every Dense).
        rank: ``r``.
        alpha: LoRA alpha; ``alpha / r`` is folded into ``lora_a``.
        a_init: initialiser of ``lora_a`` before scaling; default PyTorch/peft's
            ``U(-1/sqrt(in), 1/sqrt(in))``.

    Returns:
        ``(params, mask)``: params with ``lora_a (..., in, r)`` and ``lora_b (..., r, out)``
        (zeros) beside each target, and the mask that trains only them.

    Raises:
        GlobError: a target glob matches nothing.
        ValueError: a target is not an ``(in, out)`` kernel or already has a LoRA.

    Example:
        >>> params, m = nj.finetune.add_lora(params, key, ["**/attn/*/kernel"], rank=4)
        >>> jax.tree.map(jnp.shape, params["blocks"]["stacked"]["attn"]["query"])
        {'bias': (6, 32), 'kernel': (6, 32, 32), 'lora_a': (6, 32, 4), 'lora_b': (6, 4, 32)}
    """
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    sel = _targets(params, targets, "add_lora")
    flat = flatten(params)
    new = {}
    for path, k in zip(sorted(sel), jax.random.split(key, len(sel)), strict=True):
        _check_free(flat, path, ("lora_a", "lora_b"), "add_lora")
        init = a_init or _default_a_init(path.split("/").count(STACKED))
        for p, v in _lora_leaves(path, flat[path], k, rank, alpha, init).items():
            new[p] = (v, sel[path])
    return _with(params, new)


def add_ia3(
    params: Any, targets: str | Iterable[str] = ("**/key/kernel", "**/value/kernel")
) -> tuple[Any, Any]:
    """Add IA3 scaling vectors ``ia3_scale (..., out)`` (ones) beside each targeted kernel.

    The layer multiplies its matmul output (before the bias) by the vector. IA3
    proper targets keys, values and the MLP's inner layer
    (``"**/mlp/fc/kernel"``).

    Returns:
        ``(params, mask)``, the mask training only the new vectors.
    """
    sel = _targets(params, targets, "add_ia3")
    flat = flatten(params)
    new = {}
    for path, mk in sel.items():
        _check_free(flat, path, ("ia3_scale",), "add_ia3")
        kernel = flat[path]
        new[_sibling(path, "ia3_scale")] = (
            jnp.ones((*kernel.shape[:-2], kernel.shape[-1]), kernel.dtype),
            mk,
        )
    return _with(params, new)


def _col_norm(w: jax.Array) -> jax.Array:
    """Column norms ``(..., out)`` of ``w (..., in, out)``, in float32 as the layer computes them."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


def add_dora(
    params: Any,
    key: jax.Array,
    targets: str | Iterable[str] = ("**/query/kernel", "**/value/kernel"),
    rank: int = 8,
    alpha: float = 16.0,
    a_init: Initializer | None = None,
) -> tuple[Any, Any]:
    """Add DoRA adapters: ``dora_magnitude (..., out)`` and LoRA's ``lora_a``, ``lora_b``.

    The magnitude starts at the kernel's column norms, so ``W' = m * W / ||W||``
    equals the kernel and outputs are unchanged (within rounding).

    Returns:
        ``(params, mask)``, the mask training the magnitude and the LoRA pair.
    """
    if rank < 1:
        raise ValueError(f"add_dora: rank must be >= 1, got {rank}")
    sel = _targets(params, targets, "add_dora")
    flat = flatten(params)
    new = {}
    for path, k in zip(sorted(sel), jax.random.split(key, len(sel)), strict=True):
        _check_free(flat, path, ("lora_a", "lora_b", "dora_magnitude"), "add_dora")
        kernel = flat[path]
        init = a_init or _default_a_init(path.split("/").count(STACKED))
        leaves = _lora_leaves(path, kernel, k, rank, alpha, init)
        leaves[_sibling(path, "dora_magnitude")] = _col_norm(kernel).astype(kernel.dtype)
        for p, v in leaves.items():
            new[p] = (v, sel[path])
    return _with(params, new)


def _groups(flat: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{parent: {leaf name: path}}`` of every kernel's parent."""
    out: dict[str, dict[str, str]] = {}
    for path in flat:
        out.setdefault(_parent(path), {})[path.rpartition("/")[2]] = path
    return {p: names for p, names in out.items() if "kernel" in names}


def _fold_lora(flat: dict[str, Any], names: dict[str, str]) -> jax.Array:
    """``kernel + lora_a @ lora_b`` (in float32, cast to the kernel's dtype)."""
    kernel = flat[names["kernel"]]
    a = flat[names["lora_a"]].astype(jnp.float32)
    b = flat[names["lora_b"]].astype(jnp.float32)
    return (kernel.astype(jnp.float32) + jnp.matmul(a, b, precision=_HIGHEST)).astype(kernel.dtype)


def merge_lora(params: Any) -> Any:
    """Fold every ``lora_a @ lora_b`` into its kernel and remove the pair (stacked too).

    A DoRA magnitude beside it stays and keeps its meaning (DoRA normalises
    ``kernel + a @ b``, which is now the kernel).
    """
    flat = flatten(params)
    for names in _groups(flat).values():
        if "lora_a" in names:
            flat[names["kernel"]] = _fold_lora(flat, names)
            del flat[names["lora_a"]], flat[names["lora_b"]]
    return unflatten(flat)


def merge_ia3(params: Any) -> Any:
    """Fold every ``ia3_scale`` into its layer and remove it.

    ``(x @ W) * s == x @ (W * s)``: the kernel's columns (and a LoRA's ``lora_b``)
    are scaled; with DoRA beside it, the magnitude is scaled instead.
    """
    flat = flatten(params)
    for names in _groups(flat).values():
        if "ia3_scale" not in names:
            continue
        s = flat.pop(names["ia3_scale"])
        into = ["dora_magnitude"] if "dora_magnitude" in names else ["kernel", "lora_b"]
        for name in into:
            if name in names:
                w = flat[names[name]]
                col = s if name == "dora_magnitude" else s[..., None, :]
                flat[names[name]] = (w.astype(jnp.float32) * col.astype(jnp.float32)).astype(
                    w.dtype
                )
    return unflatten(flat)


def merge_dora(params: Any) -> Any:
    """Replace each DoRA-adapted kernel by ``m * W' / ||W'||`` (``W' = kernel + a @ b``) and
    remove ``dora_magnitude``, ``lora_a`` and ``lora_b`` there."""
    flat = flatten(params)
    for names in _groups(flat).values():
        if "dora_magnitude" not in names:
            continue
        kernel = flat[names["kernel"]]
        w = _fold_lora(flat, names) if "lora_a" in names else kernel
        m = flat.pop(names["dora_magnitude"]).astype(jnp.float32)
        w32 = w.astype(jnp.float32)
        flat[names["kernel"]] = (w32 * (m / _col_norm(w32))[..., None, :]).astype(kernel.dtype)
        for name in ("lora_a", "lora_b"):
            flat.pop(names.get(name, ""), None)
    return unflatten(flat)


def merge_adapters(params: Any) -> Any:
    """Fold every adapter (DoRA, LoRA, IA3) into its kernel: plain params, same outputs."""
    return merge_ia3(merge_lora(merge_dora(params)))


def _is_adapter(path: str) -> bool:
    return path.rpartition("/")[2] in ADAPTER_KEYS


def adapter_params(params: Any) -> Any:
    """Only the adapter leaves (``lora_a``, ``lora_b``, ``ia3_scale``, ``dora_magnitude``)."""
    return unflatten({p: v for p, v in flatten(params).items() if _is_adapter(p)})


def remove_adapters(params: Any) -> Any:
    """The params without any adapter leaf (the base model), nothing merged."""
    return unflatten({p: v for p, v in flatten(params).items() if not _is_adapter(p)})


def adapter_mask(params: Any) -> Any:
    """The mask that trains every adapter leaf and nothing else (e.g. after :func:`load_adapters`)."""
    return unflatten({p: _is_adapter(p) for p in flatten(params)})


def save_adapters(path: str | os.PathLike, params: Any, trainable: Any = None) -> int:
    """Write only the adapter leaves (or the leaves ``trainable`` trains) to a safetensors file.

    Args:
        path: the file to write.
        params: the params tree.
        trainable: a mask; if given, the file holds every leaf it trains (any
            copy), adapters or not (e.g. LoRA plus a new head). Default: every adapter leaf.

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: nothing to save.
    """
    flat = flatten(params)
    if trainable is None:
        keep = {p: v for p, v in flat.items() if _is_adapter(p)}
    else:
        m = flatten(trainable)
        keep = {p: v for p, v in flat.items() if bool(np.any(m[p]))}
    if not keep:
        raise ValueError("save_adapters: no adapter (or trainable) leaves in params")
    save_params(path, unflatten(keep))
    return os.path.getsize(path)


def _expected_shape(flat: dict[str, Any], path: str, value: Any) -> tuple[int, ...] | None:
    """The shape ``value`` must have at ``path`` in ``flat`` (None: cannot go there)."""
    if path in flat:
        return tuple(np.shape(flat[path]))
    name = path.rpartition("/")[2]
    kernel = flat.get(_sibling(path, "kernel"))
    if name not in ADAPTER_KEYS or kernel is None or np.ndim(kernel) < 2:
        return None
    *stack, n_in, n_out = np.shape(kernel)
    r = np.shape(value)[-1] if name == "lora_a" else np.shape(value)[-2] if name == "lora_b" else 0
    return {
        "lora_a": (*stack, n_in, r),
        "lora_b": (*stack, r, n_out),
        "ia3_scale": (*stack, n_out),
        "dora_magnitude": (*stack, n_out),
    }[name]


def load_adapters(path: str | os.PathLike, params: Any) -> Any:
    """``params`` with the leaves of an adapter file (:func:`save_adapters`) put in.

    Adapter leaves go beside their kernel (added, or replacing ones there); other
    leaves (a saved head) replace the leaf of the same path and shape.

    Raises:
        CheckpointError: a saved leaf has no kernel / param to go to, or the wrong shape.
    """
    saved = flatten(load_params(path))
    flat = flatten(params)
    bad = []
    for p, v in saved.items():
        want = _expected_shape(flat, p, v)
        if want != tuple(v.shape):
            bad.append(f"{p} {tuple(v.shape)} (expected {want})" if want else f"{p} (no place)")
    if bad:
        raise CheckpointError(f"adapter file {os.fspath(path)!r} does not fit the params: {bad}")
    for p, v in saved.items():
        dtype = flat[p].dtype if p in flat else flat[_sibling(p, "kernel")].dtype
        flat[p] = v.astype(dtype)
    return unflatten(flat)
