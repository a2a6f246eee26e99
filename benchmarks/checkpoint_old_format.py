"""The checkpoint format before streaming (nnjax at commit c563c31), vendored for the checkpoint study.

Verbatim apart from this docstring and two imports (``nnjax.core.errors``,
``nnjax.core.paths`` since the floors layout): save copies the whole state to
host, serializes it into one bytes object, hashes and writes it; restore reads
the whole file into memory. Not used by the library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from nnjax.core.errors import CheckpointError
from nnjax.core.paths import unflatten

__all__ = ["save", "latest", "all_steps", "restore", "save_params", "load_params"]

FORMAT = "nnjax.checkpoint"
VERSION = 1
ARRAYS = "arrays.safetensors"
METADATA = "metadata.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# safetensors dtype codes <-> NumPy dtypes (ml_dtypes gives bfloat16 and float8).
_CODES = {
    "BOOL": np.dtype(bool),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "C64": np.dtype(np.complex64),
}
_NAMES = {dtype.name: code for code, dtype in _CODES.items()}


# ---------------------------------------------------------------- flattening


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    """``({path: leaf}, treedef)``; paths join the pytree keys with ``/``."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for key_path, leaf in with_path:
        path = jax.tree_util.keystr(key_path, simple=True, separator="/")
        if path in flat:
            raise CheckpointError(f"two leaves share the path {path!r} (a key contains '/'?)")
        flat[path] = leaf
    return flat, treedef


def _describe(leaf: Any) -> dict[str, Any]:
    """``{"shape", "dtype"[, "key"]}`` of a leaf (array or ShapeDtypeStruct); keys by their data."""
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return {
            "shape": list(data.shape),
            "dtype": np.dtype(data.dtype).name,
            "key": str(leaf.dtype),
        }
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}


def _fmt(info: Mapping[str, Any]) -> str:
    key = f" ({info['key']} key data)" if info.get("key") else ""
    return f"{info.get('dtype')} {tuple(info.get('shape') or ())}{key}"


def _record(leaf: Any) -> dict[str, Any]:
    """:func:`_describe` plus, for a typed key, the impl name ``wrap_key_data`` needs."""
    info = _describe(leaf)
    if "key" in info:
        info["key_impl"] = str(jax.random.key_impl(leaf))
    return info


def _host_arrays(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each leaf as a C-contiguous host array (typed keys as their key data)."""
    leaves = {p: jax.random.key_data(v) if _is_key(v) else v for p, v in flat.items()}
    leaves = jax.device_get(leaves)
    out = {}
    for path, value in leaves.items():
        arr = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if arr.dtype.name not in _NAMES:
            raise CheckpointError(f"{path}: dtype {arr.dtype} cannot be stored in safetensors")
        out[path] = arr
    return out


# ---------------------------------------------------------------- the array file


def _serialize(arrays: Mapping[str, np.ndarray]) -> bytes:
    specs = {
        p: safetensors.TensorSpec(
            dtype=a.dtype.name, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes
        )
        for p, a in arrays.items()
    }
    return bytes(safetensors.serialize(specs, metadata=None))


def _deserialize(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of a safetensors byte string; a CheckpointError for anything malformed."""
    try:
        views = safetensors.deserialize(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust parser may raise a PanicException (a BaseException)
        raise CheckpointError(f"{where}: not a valid safetensors file ({e})") from None
    out = {}
    for path, view in views:
        code = view["dtype"]
        if code not in _CODES:
            raise CheckpointError(f"{where}: {path} has unsupported dtype {code}")
        dtype, shape = _CODES[code], tuple(view["shape"])
        if len(view["data"]) != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{where}: {path} has {len(view['data'])} bytes for {shape}")
        out[path] = np.frombuffer(view["data"], dtype).reshape(shape)
    return out


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_arrays(folder: str, data: bytes) -> None:
    _write_file(os.path.join(folder, ARRAYS), data)


def _write_metadata(folder: str, meta: Mapping[str, Any]) -> None:
    _write_file(os.path.join(folder, METADATA), json.dumps(meta, indent=1).encode())


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- save / latest


def all_steps(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the complete checkpoints in ``directory``, oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        path = os.path.join(directory, name)
        if m and os.path.isfile(os.path.join(path, METADATA)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(directory: str | os.PathLike) -> str | None:
    """The path of the newest complete checkpoint in ``directory``, or None."""
    steps = all_steps(directory)
    return steps[-1][1] if steps else None


def save(
    directory: str | os.PathLike,
    ts: Any,
    *,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = 3,
) -> str:
    """Save a train state (any pytree of arrays) as ``directory/step_{step:06d}/``, atomically.

    Args:
        directory: the run's checkpoint folder (created if missing).
        ts: a ``TrainState`` or any pytree of arrays; typed PRNG keys are allowed.
        step: the number in the folder name; default ``int(ts.step)``.
        extra: JSON-able metadata saved beside the arrays (data position, rng, history).
        keep: keep the newest ``keep`` checkpoints and delete older ones once the
            new one is complete; ``None`` keeps all.

    Returns:
        The path of the new checkpoint.

    Raises:
        CheckpointError: a checkpoint for ``step`` exists already (never overwritten),
            or a leaf cannot be stored.

    Example:
        >>> path = nj.checkpoint.save("runs/a", ts, extra={"epoch": 3})
        >>> ts, extra = nj.checkpoint.restore(nj.checkpoint.latest("runs/a"), ts)
    """
    if keep is not None and keep < 1:
        raise ValueError(f"expected keep >= 1 or None, got keep == {keep}")
    if step is None:
        if not hasattr(ts, "step"):
            raise ValueError("save: pass step= for a pytree without a .step")
        step = int(jax.device_get(ts.step))
    directory = os.fspath(directory)
    target = os.path.join(directory, f"step_{int(step):06d}")
    if os.path.exists(target):
        raise CheckpointError(f"checkpoint {target} exists already; it is never overwritten")
    flat, _ = _flat(ts)
    arrays = _host_arrays(flat)
    data = _serialize(arrays)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "arrays": ARRAYS,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "leaves": {p: _record(v) for p, v in flat.items()},
        "extra": dict(extra or {}),
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save: extra must be JSON-able ({e})") from None
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{int(step):06d}-", dir=directory)
    try:
        _write_arrays(tmp, data)
        _write_metadata(tmp, meta)
        _fsync_dir(tmp)
        if os.path.exists(target):
            raise CheckpointError(f"checkpoint {target} exists already; it is never overwritten")
        os.rename(tmp, target)
    except BaseException:
        _remove_tree(tmp)
        raise
    _fsync_dir(directory)
    if keep is not None:
        for _, old in all_steps(directory)[:-keep]:
            _remove_tree(old)
    return target


# ---------------------------------------------------------------- restore


def _checkpoint_dir(path: str) -> str:
    if os.path.isfile(os.path.join(path, METADATA)) or _STEP_DIR.match(os.path.basename(path)):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path!r} (expected step_*/{METADATA})")
    return found


def _read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metadata, arrays)``, verified: sha256, size, and each path's shape and dtype."""
    meta_path = os.path.join(path, METADATA)
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {METADATA}; not a complete checkpoint") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: expected format {FORMAT!r}, got {meta!r:.80}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format version {meta.get('version')}")
    try:
        leaves, size, digest = dict(meta["leaves"]), int(meta["size"]), str(meta["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: corrupt metadata (missing {e})") from None
    array_path = os.path.join(path, ARRAYS)
    try:
        with open(array_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {ARRAYS}") from None
    if len(data) != size:
        raise CheckpointError(
            f"{array_path}: expected {size} bytes, got {len(data)} (truncated or corrupt)"
        )
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{array_path}: sha256 mismatch; the file is corrupt")
    arrays = _deserialize(data, array_path)
    if set(arrays) != set(leaves):
        raise CheckpointError(
            f"{path}: metadata and {ARRAYS} disagree on the paths: "
            f"{sorted(set(arrays) ^ set(leaves))}"
        )
    for p, info in leaves.items():
        a = arrays[p]
        if not isinstance(info, dict):
            raise CheckpointError(f"{meta_path}: corrupt metadata for {p}: {info!r}")
        if list(a.shape) != info.get("shape") or a.dtype.name != info.get("dtype"):
            raise CheckpointError(
                f"{path}: metadata says {p} is {info.get('dtype')} {info.get('shape')}, "
                f"but {ARRAYS} holds {a.dtype.name} {list(a.shape)}"
            )
    return meta, arrays


def _check_structure(where: str, stored: Mapping[str, Any], flat: Mapping[str, Any]) -> None:
    """A CheckpointError listing the missing, unexpected and differing paths, if any."""
    missing = [p for p in flat if p not in stored]
    unexpected = [p for p in stored if p not in flat]
    differ = []
    for p, leaf in flat.items():
        if p in stored:
            want, got = _describe(leaf), stored[p]
            if any(want.get(k) != got.get(k) for k in ("shape", "dtype", "key")):
                differ.append(f"{p} (expected {_fmt(want)}, got {_fmt(got)})")
    if missing or unexpected or differ:
        parts = [f"{where} does not fit the target structure:"]
        if missing:
            parts.append(f"missing paths: {missing}")
        if unexpected:
            parts.append(f"unexpected paths: {unexpected}")
        if differ:
            parts.append(f"differing shape/dtype: {differ}")
        raise CheckpointError("\n  ".join(parts))


def _place(array: np.ndarray, like: Any, info: Mapping[str, Any]) -> Any:
    """``array`` as ``like`` has it: on its sharding, a typed key, or a NumPy/Python value."""
    sharding = getattr(like, "sharding", None)
    if info.get("key"):
        data = jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)
        return jax.random.wrap_key_data(data, impl=info.get("key_impl"))
    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        return jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)
    if isinstance(like, np.ndarray | np.generic):
        return np.array(array)
    if isinstance(like, bool | int | float | complex):
        return type(like)(array.item())
    return jnp.asarray(array)


def restore(path: str | os.PathLike, target: Any) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint into the structure of ``target``.

    Args:
        path: a checkpoint folder (``.../step_000123``) or a run folder (its newest
            checkpoint is taken).
        target: a pytree (``TrainState``) of arrays or ``jax.ShapeDtypeStruct`` with
            the expected structure; leaves with a ``sharding`` are placed on it.

    Returns:
        ``(ts, extra)``: the pytree with the stored values (bit-exact), and the
        ``extra`` dict given to :func:`save`.

    Raises:
        CheckpointError: no checkpoint, missing or corrupt metadata, an array file
            that is truncated or does not match its sha256 or metadata, or a
            structure that differs from ``target`` (the message lists the missing,
            unexpected and differing paths).
    """
    path = _checkpoint_dir(os.fspath(path))
    meta, arrays = _read_checkpoint(path)
    flat, treedef = _flat(target)
    _check_structure(path, meta["leaves"], flat)
    leaves = [_place(arrays[p], leaf, meta["leaves"][p]) for p, leaf in flat.items()]
    return jax.tree_util.tree_unflatten(treedef, leaves), dict(meta.get("extra") or {})


# ---------------------------------------------------------------- params only


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Save params (or any pytree of arrays) as one ``.safetensors`` file with ``/`` keys.

    The file loads in any safetensors reader (``safetensors.torch.load_file``);
    bfloat16 stays ``BF16``. Written to a temporary file and renamed into place.
    """
    path = os.fspath(path)
    flat, _ = _flat(params)
    if any(_is_key(v) for v in flat.values()):
        raise CheckpointError("save_params: typed PRNG keys are not params; use save()")
    data = _serialize(_host_arrays(flat))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def load_params(path: str | os.PathLike, target: Any = None) -> Any:
    """Load a ``.safetensors`` file written by :func:`save_params` (or any with ``/`` keys).

    Args:
        path: the file.
        target: optional pytree of arrays or ``ShapeDtypeStruct`` to check against
            (missing, unexpected, differing paths are a CheckpointError) and to place on.

    Returns:
        Nested dicts of ``jax.Array`` (or ``target``'s structure).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no params file {path!r}") from None
    arrays = _deserialize(data, path)
    if target is None:
        parents = {p.rsplit("/", i)[0] for p in arrays for i in range(1, p.count("/") + 1)}
        if parents & set(arrays):
            raise CheckpointError(f"{path}: keys {sorted(parents & set(arrays))} also hold arrays")
        return unflatten({p: jnp.asarray(a) for p, a in arrays.items()})
    flat, treedef = _flat(target)
    stored = {p: _describe(a) for p, a in arrays.items()}
    _check_structure(path, stored, flat)
    leaves = [_place(arrays[p], leaf, stored[p]) for p, leaf in flat.items()]
    return jax.tree_util.tree_unflatten(treedef, leaves)
