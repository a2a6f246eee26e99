"""A pytree as ``{path: leaf}`` for checkpoints: describing leaves, and checking a target's structure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.checkpoint.arrayfile import NAMES
from nnjax.core.errors import CheckpointError


def is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def flat(tree: Any) -> tuple[dict[str, Any], Any]:
    """``({path: leaf}, treedef)``; paths join the pytree keys with ``/``."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for key_path, leaf in with_path:
        path = jax.tree_util.keystr(key_path, simple=True, separator="/")
        if path in out:
            raise CheckpointError(f"two leaves share the path {path!r} (a key contains '/'?)")
        out[path] = leaf
    return out, treedef


def describe(leaf: Any) -> dict[str, Any]:
    """``{"shape", "dtype"[, "key"]}`` of a leaf (array or ShapeDtypeStruct); keys by their data."""
    if is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return {
            "shape": list(data.shape),
            "dtype": np.dtype(data.dtype).name,
            "key": str(leaf.dtype),
        }
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}


def record(path: str, leaf: Any) -> dict[str, Any]:
    """:func:`describe` plus, for a typed key, the impl name ``wrap_key_data`` needs.

    Raises:
        CheckpointError: the dtype has no safetensors code (checked before any writing).
    """
    info = describe(leaf)
    if info["dtype"] not in NAMES:
        raise CheckpointError(f"{path}: dtype {info['dtype']} cannot be stored in safetensors")
    if "key" in info:
        info["key_impl"] = str(jax.random.key_impl(leaf))
    return info


def fmt(info: Mapping[str, Any]) -> str:
    key = f" ({info['key']} key data)" if info.get("key") else ""
    return f"{info.get('dtype')} {tuple(info.get('shape') or ())}{key}"


def data(leaf: Any) -> Any:
    """The leaf to store: a typed key's raw data, anything else as it is."""
    return jax.random.key_data(leaf) if is_key(leaf) else leaf


def to_host(leaf: Any) -> np.ndarray:
    """A leaf (or a shard's data) as a C-contiguous NumPy array."""
    return np.asarray(jax.device_get(leaf), order="C")  # ascontiguousarray would make 0-d 1-d


def check_structure(where: str, stored: Mapping[str, Any], flat: Mapping[str, Any]) -> None:
    """A CheckpointError listing the missing, unexpected and differing paths, if any."""
    missing = [p for p in flat if p not in stored]
    unexpected = [p for p in stored if p not in flat]
    differ = []
    for p, leaf in flat.items():
        if p in stored:
            want, got = describe(leaf), stored[p]
            if any(want.get(k) != got.get(k) for k in ("shape", "dtype", "key")):
                differ.append(f"{p} (expected {fmt(want)}, got {fmt(got)})")
    if missing or unexpected or differ:
        parts = [f"{where} does not fit the target structure:"]
        if missing:
            parts.append(f"missing paths: {missing}")
        if unexpected:
            parts.append(f"unexpected paths: {unexpected}")
        if differ:
            parts.append(f"differing shape/dtype: {differ}")
        raise CheckpointError("\n  ".join(parts))
