"""Checkpoints of sharded train states: save from any mesh, restore onto any other.

The files are ordinary :mod:`nnjax.checkpoint` checkpoints (safetensors, one
full array per path), so they carry no mesh: a state saved from FSDP over 8
devices restores onto tensor parallelism over 4, or onto one device.

Every array is gathered to host memory whole before it is written (one process
writes), and read whole before it is placed: fine while the train state fits in
one host's memory. Several processes must see the same directory (a shared file
system) to restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from nnjax.checkpoint import state as checkpoint
from nnjax.sharding.mesh import put

__all__ = ["save_sharded", "restore_sharded"]


def _leaf_to_host(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # spans processes: gather
        return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


def _to_host(tree: Any) -> Any:
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(_leaf_to_host, tree)  # the same order on every process


def save_sharded(directory: str | os.PathLike, ts: Any, **kwargs: Any) -> str:
    """Save a (sharded) train state with :func:`nnjax.checkpoint.save`; call it on every process.

    The shards are gathered into full host arrays (``process_allgather`` across
    processes), process 0 writes, and every process waits until the checkpoint
    is complete.

    Args:
        directory: the run's checkpoint folder.
        ts: a ``TrainState`` (or any pytree) of arrays, sharded or not.
        **kwargs: ``step``, ``extra``, ``keep`` as :func:`nnjax.checkpoint.save`.

    Returns:
        The checkpoint's path (the same on every process).
    """
    host = _to_host(ts)
    step = kwargs.pop("step", None)
    if step is None:
        step = int(np.asarray(host.step))
    path = os.path.join(os.fspath(directory), f"step_{int(step):06d}")
    if jax.process_index() == 0:
        path = checkpoint.save(directory, host, step=step, **kwargs)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"nnjax.save_sharded:{path}")
    return path


def _host_like(x: Any) -> np.ndarray:
    """A zero-byte NumPy stand-in with ``x``'s shape and dtype: restore returns NumPy."""
    return np.broadcast_to(np.zeros((), x.dtype), np.shape(x))


def restore_sharded(
    path: str | os.PathLike, target: Any, shardings: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint and place each array on ``shardings``, on any mesh.

    Args:
        path: a checkpoint folder or a run folder (its newest checkpoint).
        target: the expected structure: a ``TrainState`` of arrays or
            ``ShapeDtypeStruct``s (``jax.eval_shape(tr.init, params, state)``).
        shardings: a tree like ``target`` of ``Sharding``s, e.g.
            ``train_state_shardings(target, new_mesh, rules)``; default: each
            ``target`` leaf's own ``.sharding``.

    Returns:
        ``(ts, extra)`` as :func:`nnjax.checkpoint.restore`, the arrays placed on
        ``shardings`` (bit-exact).

    Raises:
        CheckpointError: as :func:`nnjax.checkpoint.restore` (missing, corrupt, or
            another structure).
        ValueError: no ``shardings`` and a ``target`` leaf without a sharding.

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(16), head=nj.Dense(2))
        >>> params, state = model.init(key, jnp.zeros((1, 8)))
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-3))
        >>> rules = nj.sharding.fsdp_rules()
        >>> path = nj.sharding.save_sharded("run", tr.init(params, state))
        >>> new_mesh = nj.sharding.mesh({"data": -1, "model": 1})  # {"data": 2, "model": 2} ...
        >>> abstract = jax.eval_shape(tr.init, params, state)
        >>> sh = nj.sharding.train_state_shardings(abstract, new_mesh, rules)
        >>> ts, extra = nj.sharding.restore_sharded("run", abstract, sh)
        >>> ts.params["head"]["kernel"].sharding.mesh.axis_names
        ('data', 'model')
    """
    if shardings is None:

        def own(x):
            s = getattr(x, "sharding", None)
            if s is None:
                raise ValueError("restore_sharded: pass shardings= or a target with .sharding")
            return s

        shardings = jax.tree.map(own, target)
    host, extra = checkpoint.restore(path, jax.tree.map(_host_like, target))
    return put(host, shardings), extra
