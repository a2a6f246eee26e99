"""Parameter-efficient adapters beside kernels: LoRA, IA3, DoRA; add, merge, save, load.

Adapters are leaves beside the kernel they adapt (``.../query/kernel`` gets
``.../query/lora_a``); every layer with a ``kernel`` uses them. What each kind adds,
its shapes and how it is applied and merged is one table,
:data:`nnjax.layers.adapters.ADAPTERS`; the kernel is seen per copy as a matrix
``(in, out)`` (a Conv kernel ``(3, 3, 16, 32)`` as ``(144, 32)``):

- LoRA: ``lora_a (in, r)``, ``lora_b (r, out)``, ``y = x @ kernel + (x @ lora_a) @ lora_b``;
  the scale ``alpha / r`` is folded into ``lora_a`` at creation, ``lora_b`` starts at 0.
- IA3: ``ia3_scale (out,)``, ``y = (x @ kernel) * ia3_scale``; starts at 1.
- DoRA: ``dora_magnitude (out,)`` with LoRA's ``a, b``: ``W' = kernel + a @ b``, each column
  normalised and scaled by the magnitude; starts at the kernel's column norms.

So at creation the model's outputs are unchanged. Each ``add_*`` returns the new
params and the mask that trains only the new adapters. A quantized kernel
(:func:`nnjax.finetune.quantize`) takes adapters too; merging one gives a float kernel.

Targets are globs over logical paths that must select kernels. A kernel inside
``repeat`` is stacked, ``(n, in, out)``; its adapters are stacked the same way
(``lora_a (n, in, r)``, ``lora_b (n, r, out)``). If the globs select only some
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
from nnjax.core.errors import ArgumentError, CheckpointError, LayerError
from nnjax.core.layer import Initializer
from nnjax.core.paths import flatten, match, stack_depth, unflatten
from nnjax.finetune.masks import map_copies
from nnjax.layers import quantized
from nnjax.layers.adapters import ADAPTER_KEYS, ADAPTERS, check_adapters, leaf_shape

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


def _sibling(path: str, name: str) -> str:
    parent = path.rpartition("/")[0]
    return f"{parent}/{name}" if parent else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _depth(path: str) -> int:
    return stack_depth(path)


def _kernel_shape(flat: dict[str, Any], path: str) -> tuple[int, ...]:
    """The float shape of the kernel at ``path`` (stacked axes included)."""
    return quantized.logical_shape(flat[path], flat.get(_sibling(path, quantized.SCALE)))


def _matrix_dims(shape: tuple[int, ...], depth: int) -> tuple[int, int]:
    """``(in, out)`` of a kernel's per-copy matrix view."""
    return int(np.prod(shape[depth:-1])), int(shape[-1])


def _targets(params: Any, targets: str | Iterable[str], what: str) -> dict[str, Any]:
    """``{physical kernel path: True | (n,) bool array of selected copies}``."""
    chosen = set(match(params, targets, what=f"{what} target"))
    sel = flatten(map_copies(chosen.__contains__, params, dtype=bool))
    flat = flatten(params)
    out = {}
    for path, m in sel.items():
        if m is False:
            continue
        if path.rpartition("/")[2] != "kernel" or len(_kernel_shape(flat, path)) - _depth(path) < 2:
            raise ArgumentError(
                f"{what}: targets must select layer kernels (Dense, Conv, ...: at least 2 axes "
                f"per copy); {path!r} has shape {tuple(np.shape(flat[path]))}"
            )
        out[path] = m
    return out


def _matrix(kernel: Any, scale: Any, depth: int) -> jax.Array:
    """A kernel as a float32 matrix ``(*stack, in, out)``, dequantized if ``scale`` is given."""
    w = kernel if scale is None else quantized.dequantize(kernel, scale)
    return jnp.reshape(jnp.asarray(w, jnp.float32), (*w.shape[:depth], -1, w.shape[-1]))


def _float_dtype(flat: dict[str, Any], path: str) -> Any:
    """The dtype adapters beside the kernel at ``path`` take (float32 beside a quantized one)."""
    kernel = flat[path]
    return jnp.float32 if quantized.is_quantized(kernel) else kernel.dtype


def _default_a_init(depth: int) -> Initializer:
    # PyTorch/peft's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), per stacked copy.
    return jax.nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=tuple(range(depth))
    )


def _add(params, key, targets, kind, what, rank=0, alpha=1.0, a_init=None):
    """Params with the adapter ``kind`` created beside each target, and the mask training it."""
    sel = _targets(params, targets, what)
    flat = flatten(params)
    mask = dict.fromkeys(flat, False)
    for path, k in zip(sorted(sel), jax.random.split(key, len(sel)), strict=True):
        depth = _depth(path)
        n_in, n_out = _matrix_dims(_kernel_shape(flat, path), depth)
        if rank > min(n_in, n_out):  # rank 0: a kind without one (IA3)
            raise ArgumentError(
                f"{what}: rank {rank} is larger than the kernel {path!r} allows: its matrix "
                f"(in, out) is {(n_in, n_out)}, so rank <= {min(n_in, n_out)}"
            )
        init = a_init or _default_a_init(depth)
        dtype = _float_dtype(flat, path)
        kernel, scale = flat[path], flat.get(_sibling(path, quantized.SCALE))

        def create(kernel, scale, k=k, depth=depth, init=init, dtype=dtype):
            w = _matrix(kernel, scale, depth)
            return {n: v.astype(dtype) for n, v in kind.create(k, w, rank, alpha, init).items()}

        # Shape-only params (jax.eval_shape(model.init, ...)) get shape-only adapters.
        shape_only = isinstance(kernel, jax.ShapeDtypeStruct)
        leaves = jax.eval_shape(create, kernel, scale) if shape_only else create(kernel, scale)
        taken = [n for n in leaves if _sibling(path, n) in flat]
        if taken:
            raise ArgumentError(f"{what}: {_parent(path) or 'the root'} already has {taken}")
        for name, value in leaves.items():
            flat[_sibling(path, name)] = value
            mask[_sibling(path, name)] = sel[path]
    return unflatten(flat), unflatten(mask)


def _check_rank(rank: int, what: str) -> None:
    if not isinstance(rank, int | np.integer) or isinstance(rank, bool) or rank < 1:
        raise ArgumentError(f"{what}: rank must be an int >= 1, got {rank!r}")


def add_lora(
    params: Any,
    key: jax.Array,
    targets: str | Iterable[str] = ("**/query/kernel", "**/value/kernel"),
    rank: int = 8,
    alpha: float = 16.0,
    a_init: Initializer | None = None,
) -> tuple[Any, Any]:
    """Add LoRA adapters beside each targeted kernel (Dense, attention, Conv, recurrent).

    Args:
        params: the params tree.
        key: PRNG key for ``lora_a``.
        targets: globs over logical paths selecting kernels (attention query/value
            by default; ``"**/kernel"`` for every layer with a kernel).
        rank: ``r``, at most ``min(in, out)`` of each kernel's matrix view.
        alpha: LoRA alpha; ``alpha / r`` is folded into ``lora_a``.
        a_init: initialiser of ``lora_a`` before scaling; default PyTorch/peft's
            ``U(-1/sqrt(in), 1/sqrt(in))``.

    Returns:
        ``(params, mask)``: params with ``lora_a (..., in, r)`` and ``lora_b (..., r, out)``
        (zeros) beside each target, and the mask that trains only them.

    Raises:
        GlobError: a target glob matches nothing.
        ArgumentError: a target is not a kernel, already has a LoRA, or is smaller than ``rank``.

    Example:
        >>> model = nj.serial(nj.Dense(16), blocks=nj.repeat(nj.Dense(16), 4), head=nj.Dense(2))
        >>> params, _ = model.init(key, jnp.zeros((1, 8)))
        >>> params, m = nj.finetune.add_lora(params, key, ["blocks/*/kernel"], rank=4)
        >>> jax.tree.map(jnp.shape, params["blocks"]["stacked"])
        {'bias': (4, 16), 'kernel': (4, 16, 16), 'lora_a': (4, 16, 4), 'lora_b': (4, 4, 16)}
    """
    _check_rank(rank, "add_lora")
    return _add(params, key, targets, ADAPTERS["lora"], "add_lora", rank, alpha, a_init)


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
    return _add(params, jax.random.key(0), targets, ADAPTERS["ia3"], "add_ia3")


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
    _check_rank(rank, "add_dora")
    return _add(params, key, targets, ADAPTERS["dora"], "add_dora", rank, alpha, a_init)


def _groups(flat: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{parent: {leaf name: path}}`` of every kernel's parent."""
    out: dict[str, dict[str, str]] = {}
    for path in flat:
        out.setdefault(_parent(path), {})[path.rpartition("/")[2]] = path
    return {p: names for p, names in out.items() if "kernel" in names}


def _check_group(flat: dict[str, Any], names: dict[str, str], parent: str) -> None:
    """The adapters of one kernel are whole and fit it (LayerError naming ``parent``)."""
    kernel = names["kernel"]
    depth = _depth(kernel)
    per_copy = {
        n: jax.ShapeDtypeStruct(np.shape(flat[p])[depth:], flat[p].dtype)
        for n, p in names.items()
        if n in ADAPTER_KEYS
    }
    try:
        check_adapters(per_copy, *_matrix_dims(_kernel_shape(flat, kernel), depth))
    except LayerError as err:
        raise LayerError(err.detail, tuple(parent.split("/")) if parent else ()) from None


def check_adapter_shapes(params: Any) -> None:
    """Every adapter group is whole and fits its kernel (shapes only, nothing computed).

    Raises:
        LayerError: the first group that does not, named by the kernel's parent path.
    """
    flat = flatten(params)
    for parent, names in _groups(flat).items():
        if any(n in ADAPTER_KEYS for n in names):
            _check_group(flat, names, parent)


def _merge(params: Any, kinds: Iterable[str]) -> Any:
    """Fold the adapter ``kinds`` (in the table's order) into their kernels."""
    kinds = [k for k in ADAPTERS if k in kinds]
    flat = flatten(params)
    for parent, names in _groups(flat).items():
        todo = [k for k in kinds if any(n in names for n in ADAPTERS[k].leaves)]
        if not todo:
            continue
        _check_group(flat, names, parent)
        kernel_path = names["kernel"]
        shape, dtype = _kernel_shape(flat, kernel_path), _float_dtype(flat, kernel_path)
        group = {n: flat[p].astype(jnp.float32) for n, p in names.items() if n in ADAPTER_KEYS}
        scale = flat.get(_sibling(kernel_path, quantized.SCALE))
        group["kernel"] = _matrix(flat[kernel_path], scale, _depth(kernel_path))
        dtypes = {n: flat[names[n]].dtype for n in group if n != "kernel"}
        for kind in todo:
            group = ADAPTERS[kind].merge(group)
        for n, p in names.items():
            if n in ADAPTER_KEYS or n == quantized.SCALE:
                del flat[p]
        flat[kernel_path] = jnp.reshape(group.pop("kernel"), shape).astype(dtype)
        for n, v in group.items():
            flat[_sibling(kernel_path, n)] = v.astype(dtypes[n])
    return unflatten(flat)


def merge_lora(params: Any) -> Any:
    """Fold every ``lora_a @ lora_b`` into its kernel and remove the pair (stacked too).

    A DoRA magnitude beside it stays and keeps its meaning (DoRA normalises
    ``kernel + a @ b``, which is now the kernel). A quantized kernel becomes float.

    Raises:
        LayerError: an adapter without its sibling or of the wrong shape (named by path).
    """
    return _merge(params, ["lora"])


def merge_ia3(params: Any) -> Any:
    """Fold every ``ia3_scale`` into its layer and remove it.

    ``(x @ W) * s == x @ (W * s)``: the kernel's columns (and a LoRA's ``lora_b``)
    are scaled; with DoRA beside it, the magnitude is scaled instead.
    """
    return _merge(params, ["ia3"])


def merge_dora(params: Any) -> Any:
    """Replace each DoRA-adapted kernel by ``m * W' / ||W'||`` (``W' = kernel + a @ b``) and
    remove ``dora_magnitude``, ``lora_a`` and ``lora_b`` there."""
    return _merge(params, ["dora"])


def merge_adapters(params: Any) -> Any:
    """Fold every adapter (the whole table: LoRA, DoRA, IA3) into its kernel: plain params,
    same outputs. A quantized kernel with adapters becomes float (one without stays quantized)."""
    return _merge(params, ADAPTERS)


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
        ArgumentError: nothing to save.
    """
    flat = flatten(params)
    if trainable is None:
        keep = {p: v for p, v in flat.items() if _is_adapter(p)}
    else:
        m = flatten(trainable)
        keep = {p: v for p, v in flat.items() if bool(np.any(m[p]))}
    if not keep:
        raise ArgumentError("save_adapters: no adapter (or trainable) leaves in params")
    save_params(path, unflatten(keep))
    return os.path.getsize(path)


def _expected_shape(flat: dict[str, Any], path: str, value: Any) -> tuple[int, ...] | None:
    """The shape ``value`` must have at ``path`` in ``flat`` (None: cannot go there)."""
    if path in flat:
        return tuple(np.shape(flat[path]))
    name = path.rpartition("/")[2]
    kernel = _sibling(path, "kernel")
    depth = _depth(path)
    if name not in ADAPTER_KEYS or kernel not in flat or np.ndim(flat[kernel]) - depth < 2:
        return None
    shape = _kernel_shape(flat, kernel)
    r = {"lora_a": -1, "lora_b": -2}.get(name)
    r = np.shape(value)[r] if r is not None and np.ndim(value) >= 2 else 0
    return (*shape[:depth], *leaf_shape(name, *_matrix_dims(shape, depth), int(r)))


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
        dtype = flat[p].dtype if p in flat else _float_dtype(flat, _sibling(p, "kernel"))
        flat[p] = v.astype(dtype)
    return unflatten(flat)
