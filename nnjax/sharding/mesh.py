"""Device meshes, placing pytrees on them, and splitting batches along the data axis."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from nnjax.core.errors import ShardingError

__all__ = [
    "ShardingError",
    "mesh",
    "axis_size",
    "replicated",
    "put",
    "batch_sharding",
    "shard_batch",
    "local_batch_slice",
]

Axis = str | tuple[str, ...]


def mesh(axes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh with named axes over ``devices`` (default: ``jax.devices()``, all processes).

    One axis may be ``-1``: it takes the devices the others leave. Axes are
    ``AxisType.Auto``: XLA's SPMD partitioner propagates shardings from the
    inputs, so model code carries no sharding annotations (``jax.make_mesh``
    alone would make ``Explicit`` axes in this jax).

    Args:
        axes: ``{name: size}`` in mesh order, e.g. ``{"data": -1}`` (the default)
            or ``{"data": 2, "model": 4}``.
        devices: the devices to lay out; their number must be the product of the sizes.

    Returns:
        A ``jax.sharding.Mesh``.

    Raises:
        ShardingError: more than one ``-1``, sizes < 1, or sizes whose product is
            not the number of devices.

    Example:
        ``{"data": 2, "model": -1}`` on 8 devices is a 2 x 4 mesh; on one CPU device:

        >>> m = nj.sharding.mesh({"data": -1, "model": 1})
        >>> m.axis_names, dict(m.shape) == {"data": len(jax.devices()), "model": 1}
        (('data', 'model'), True)
    """
    axes = {"data": -1} if axes is None else dict(axes)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not axes:
        raise ShardingError("expected at least one mesh axis, got axes == {}")
    rest = [a for a, s in axes.items() if s == -1]
    bad = {a: s for a, s in axes.items() if s != -1 and (not isinstance(s, int) or s < 1)}
    if len(rest) > 1 or bad:
        raise ShardingError(f"expected positive axis sizes and at most one -1, got axes == {axes}")
    known = math.prod(s for s in axes.values() if s != -1)
    if rest:
        if n % known:
            raise ShardingError(
                f"expected the fixed axis sizes to divide the {n} devices, got axes == {axes}"
            )
        axes[rest[0]] = n // known
    if math.prod(axes.values()) != n:
        raise ShardingError(
            f"expected axis sizes whose product is the {n} devices, got axes == {axes} "
            f"({math.prod(axes.values())}); pass devices=jax.devices()[:k] to use fewer"
        )
    names = tuple(axes)
    return jax.make_mesh(
        tuple(axes.values()), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def _names(axis: Axis | None) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def axis_size(mesh: Mesh, axis: Axis | None) -> int:
    """Devices along ``axis`` (a name, a tuple of names, or None for 1).

    Raises:
        ShardingError: a name the mesh does not have.
    """
    for a in _names(axis):
        if a not in mesh.shape:
            raise ShardingError(f"mesh has axes {tuple(mesh.axis_names)}, got axis {a!r}")
    return math.prod(mesh.shape[a] for a in _names(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def _put_one(x: Any, sharding: Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array: reshard on device
    host = np.asarray(x)  # every process holds the full value (same seed, same file)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: Any, shardings: Any) -> Any:
    """``tree`` placed on ``shardings`` (one ``Sharding`` or a tree of them like ``tree``).

    One process: ``jax.device_put`` (device to device, no host round trip). Several
    processes (``jax.distributed``): every process passes the *full* value (the
    same params from the same seed or checkpoint) and keeps only its devices'
    shards, via ``jax.make_array_from_callback``; arrays that are already global
    are resharded by ``jax.device_put``.

    The result may share buffers with ``tree`` where a leaf is already placed so.
    """
    if isinstance(shardings, Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(_put_one, tree, shardings)


def batch_sharding(mesh: Mesh, axis: Axis = "data", *, dim: int = 0) -> NamedSharding:
    """``NamedSharding`` that splits array dimension ``dim`` (the batch) along ``axis``."""
    axis_size(mesh, axis)
    return NamedSharding(mesh, P(*(None,) * dim, axis))


def _held_blocks(mesh: Mesh, axis: Axis) -> list[int]:
    """The (row-major) indices of the ``axis`` blocks of a batch this process's devices hold."""
    names = _names(axis)
    axis_size(mesh, axis)
    dims = [mesh.axis_names.index(a) for a in names]
    sizes = tuple(mesh.shape[a] for a in names)
    me = jax.process_index()
    held = {
        int(np.ravel_multi_index(tuple(idx[d] for d in dims), sizes)) if names else 0
        for idx, dev in np.ndenumerate(mesh.devices)
        if dev.process_index == me
    }
    return sorted(held)


def _local_blocks(mesh: Mesh, axis: Axis) -> int:
    return max(len(_held_blocks(mesh, axis)), 1)


def local_batch_slice(mesh: Mesh, batch_size: int, axis: Axis = "data") -> slice:
    """The rows of a global batch of ``batch_size`` that this process feeds to :func:`shard_batch`.

    Each process loads (or slices) ``global_batch[local_batch_slice(mesh, B)]``;
    with one process it is ``slice(0, B)``.

    Raises:
        ShardingError: ``batch_size`` not divisible by the ``axis`` size, or this
            process's blocks are not contiguous (a mesh not built in
            ``jax.devices()`` order).
    """
    size = axis_size(mesh, axis)
    if batch_size % size:
        raise ShardingError(
            f"expected a batch size divisible by mesh axis {axis!r} of size {size}, "
            f"got batch_size == {batch_size}"
        )
    held = _held_blocks(mesh, axis)
    if not held or held != list(range(held[0], held[-1] + 1)):
        raise ShardingError(
            f"process {jax.process_index()} holds blocks {held} of axis {axis!r}, not a "
            "contiguous run; build the mesh over jax.devices() in order"
        )
    per = batch_size // size
    return slice(held[0] * per, (held[-1] + 1) * per)


def shard_batch(batch: Any, mesh: Mesh, axis: Axis = "data", *, dim: int = 0) -> Any:
    """Each leaf of ``batch`` as a global array split along ``axis`` on its batch dimension.

    One process: ``batch`` is the global batch (``jax.device_put``). Several
    processes: ``batch`` is this process's part of the global batch (its rows
    :func:`local_batch_slice`), and the result is the global array made by
    ``jax.make_array_from_process_local_data``. Devices along the other mesh axes
    (``model``) get copies.

    Args:
        batch: a pytree of arrays ``(B, ...)`` (NumPy or jax).
        mesh: the mesh.
        axis: the mesh axis (or axes) that splits the batch.
        dim: the batch dimension: 0, or 1 for a trainer with ``steps_per_call``
            (batches ``(K, B, ...)``).

    Returns:
        The batch as global ``jax.Array``s with sharding ``P(axis)`` (``P(None, axis)``).

    Raises:
        ShardingError: a leaf without dimension ``dim``, or whose size there does not
            divide into the blocks of ``axis`` this process holds (checked before
            any transfer).
    """
    sharding = batch_sharding(mesh, axis, dim=dim)
    blocks = _local_blocks(mesh, axis)
    size = axis_size(mesh, axis)

    def check(kp, x):
        shape = tuple(np.shape(x))
        if len(shape) <= dim or shape[dim] % blocks:
            where = "" if blocks == size else f" (of {size}, on this process)"
            raise ShardingError(
                f"batch{jax.tree_util.keystr(kp)}: expected x.shape[{dim}] divisible by the "
                f"{blocks} blocks of mesh axis {axis!r}{where}, got x.shape == {shape}"
            )

    jax.tree_util.tree_map_with_path(check, batch)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )
