"""Any PyTorch model's weights by a name map: ``state_dict`` <-> nnjax params.

``nn.Linear``/``nn.Conv*d`` weights are transposed to nnjax's ``(..., in, out)``
kernels; every tensor's shape is checked, and an error names the tensor, the
expected and the found shape. (Hugging Face model folders have their own
table-driven converter: :mod:`nnjax.models.hf.pretrained`.)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import ArgumentError, CheckpointError
from nnjax.core.paths import flatten, logical_path, stack_depth, unflatten

__all__ = ["load_torch_state_dict", "to_torch_state_dict", "to_numpy"]

_TRANSFORMS = ("auto", "none", "transpose")


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device), jax or NumPy array as a NumPy array."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError:  # bfloat16 has no NumPy dtype in torch
            return value.float().numpy()
    return np.asarray(value)


def _assemble(
    template: Mapping[str, Any],
    values: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    *,
    strict: bool,
) -> dict[str, Any]:
    """Params shaped as ``template`` from ``values`` keyed by logical path.

    A stacked leaf is filled copy by copy. Each value's shape is checked (the error
    names its source tensor). A leaf with no value is an error if ``strict``; else it
    keeps ``template``'s value.
    """
    out, missing, used = {}, [], set()
    for path, leaf in flatten(template).items():
        shape = tuple(np.shape(leaf))
        n = stack_depth(path)
        dtype = np.dtype(leaf.dtype)
        arr = None
        for index in itertools.product(*(range(s) for s in shape[:n])):
            logical = logical_path(path, index)
            if logical not in values:
                missing.append(logical)
                continue
            value = values[logical]
            if tuple(value.shape) != shape[n:]:
                raise CheckpointError(
                    f"tensor {sources[logical]!r} -> {logical}: expected shape "
                    f"{shape[n:]}, got {tuple(value.shape)}"
                )
            if arr is None:
                arr = np.array(leaf, dtype=dtype) if not strict else np.zeros(shape, dtype)
            arr[index] = value.astype(dtype)
            used.add(logical)
        if arr is not None:
            out[path] = jnp.asarray(arr)
        elif not strict:
            out[path] = leaf
    if strict and missing:
        raise CheckpointError(
            f"no tensor for param(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    unused = sorted(set(values) - used)
    if unused:
        raise CheckpointError(
            f"tensor(s) {[sources[u] for u in unused]} map to path(s) {unused} that are not params"
        )
    return unflatten(out)


def _read_logical(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{logical path: NumPy array}`` (stacked copies split)."""
    out = {}
    for path, leaf in flatten(params).items():
        arr = np.asarray(jax.device_get(leaf))
        n = stack_depth(path)
        for index in itertools.product(*(range(s) for s in arr.shape[:n])):
            out[logical_path(path, index)] = arr[index]
    return out


def _entry(name: str, value: Any) -> tuple[str, str]:
    path, transform = (value, "auto") if isinstance(value, str) else tuple(value)
    if transform not in _TRANSFORMS:
        raise ArgumentError(
            f"name_map[{name!r}]: transform must be one of {_TRANSFORMS}, got {transform!r}"
        )
    return path, transform


def _layout(arr: np.ndarray, path: str, transform: str, *, to_jax: bool) -> np.ndarray:
    """torch ``Linear (out, in)`` / ``Conv (out, in, *window)`` <-> ``(in, out)`` / ``(*window, in, out)``."""
    if transform == "none" or (transform == "auto" and not path.endswith("kernel")) or arr.ndim < 2:
        return arr
    if transform == "transpose":
        return arr.T
    nd = arr.ndim
    return np.transpose(arr, (*range(2, nd), 1, 0) if to_jax else (nd - 1, nd - 2, *range(nd - 2)))


def load_torch_state_dict(
    params: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    name_map: Mapping[str, Any],
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """``params`` with leaves taken from a PyTorch ``state_dict`` by a name map.

    Args:
        params: the nnjax params to fill (their shapes and dtypes are the target).
        state_dict: ``{torch name: tensor}`` (``module.state_dict()``; arrays work too).
        name_map: ``{torch name: nnjax logical path}`` (``"blocks/3/attn/query/kernel"``
            addresses one copy of a stacked leaf), or ``{torch name: (path, transform)}``
            with ``transform`` ``"auto"`` (default: a ``.../kernel`` target is moved from
            torch's ``(out, in, *window)`` to ``(*window, in, out)``, so ``nn.Linear`` and
            ``nn.Conv*d`` weights land right; other leaves as they are), ``"none"``
            (GPT-2's ``Conv1D``) or ``"transpose"``.
        strict: every param must get a tensor and every tensor in ``state_dict`` must be
            mapped; with ``strict=False`` unmapped params keep their values and unmapped
            tensors are ignored.

    Returns:
        New params (same structure, dtypes of ``params``).

    Raises:
        CheckpointError: a mapped tensor missing from ``state_dict``, a shape that does
            not fit (``tensor '0.weight' -> dense_0/kernel: expected shape (4, 8), got
            (8, 5)``), a path that is not a param, or (``strict``) anything unmapped.

    Example:
        >>> import torch
        >>> params, _ = nj.serial(nj.Dense(8), jax.nn.relu, nj.Dense(2)).init(key, jnp.zeros((1, 4)))
        >>> torch_net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = nj.models.hf.load_torch_state_dict(params, torch_net.state_dict(), {
        ...     "0.weight": "dense_0/kernel", "0.bias": "dense_0/bias",
        ...     "2.weight": "dense_1/kernel", "2.bias": "dense_1/bias"})
        >>> np.allclose(params["dense_1"]["kernel"], torch_net[2].weight.detach().numpy().T)
        True
    """
    absent = [n for n in name_map if n not in state_dict]
    if absent:
        raise CheckpointError(f"name_map names tensor(s) {absent} that are not in the state dict")
    if strict:
        unmapped = [n for n in state_dict if n not in name_map]
        if unmapped:
            raise CheckpointError(
                f"state dict tensor(s) {unmapped} have no entry in name_map (or pass strict=False)"
            )
    values, sources = {}, {}
    for name, value in name_map.items():
        path, transform = _entry(name, value)
        if path in values:
            raise ArgumentError(f"name_map maps both {sources[path]!r} and {name!r} to {path!r}")
        values[path] = _layout(to_numpy(state_dict[name]), path, transform, to_jax=True)
        sources[path] = name
    return _assemble(params, values, sources, strict=strict)


def to_torch_state_dict(
    params: Mapping[str, Any], name_map: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_torch_state_dict`: ``{torch name: NumPy array}`` in torch layouts.

    Raises:
        CheckpointError: a mapped path that is not a param.
    """
    logical = _read_logical(params)
    out = {}
    for name, value in name_map.items():
        path, transform = _entry(name, value)
        if path not in logical:
            raise CheckpointError(f"name_map[{name!r}] = {path!r} is not a param path")
        out[name] = np.ascontiguousarray(_layout(logical[path], path, transform, to_jax=False))
    return out
