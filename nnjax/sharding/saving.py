"""Checkpoints of sharded train states: save from any mesh, restore onto any other.

The files are ordinary :mod:`nnjax.checkpoint` checkpoints (safetensors, one
block per shard) and carry no mesh: a state saved from FSDP over 8 devices
restores onto tensor parallelism over 4, or onto one device. Nothing is
gathered: in a multi-process run each process writes the shards it holds and
reads back only the blocks its devices need, so no host ever holds the whole
state. The processes must see the same directory (a shared file system).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from nnjax.checkpoint import state as checkpoint
from nnjax.core.errors import ArgumentError

__all__ = ["save_sharded", "restore_sharded"]


def save_sharded(directory: str | os.PathLike, ts: Any, **kwargs: Any) -> str:
    """Save a (sharded) train state with :func:`nnjax.checkpoint.save`; call it on every process.

    Each process writes the shards it holds (``replica_id == 0``, so each block
    once) to its own array file; process 0 completes the checkpoint, and with
    ``blocking=True`` (the default) every process returns once it is complete.

    Args:
        directory: the run's checkpoint folder.
        ts: a ``TrainState`` (or any pytree) of arrays, sharded or not.
        **kwargs: ``step``, ``extra``, ``keep``, ``blocking`` as :func:`nnjax.checkpoint.save`.

    Returns:
        The checkpoint's path (the same on every process).
    """
    return checkpoint.save(directory, ts, **kwargs)


def restore_sharded(
    path: str | os.PathLike, target: Any, shardings: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint and place each array on ``shardings``, on any mesh.

    Each process reads only the blocks its devices hold (``jax.make_array_from_callback``).

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
        ArgumentError: no ``shardings`` and a ``target`` leaf without a sharding.

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

        def own(x: Any) -> Any:
            s = getattr(x, "sharding", None)
            if s is None:
                raise ArgumentError("restore_sharded: pass shardings= or a target with .sharding")
            return s

        shardings = jax.tree.map(own, target)
    return checkpoint.restore(path, target, shardings)
