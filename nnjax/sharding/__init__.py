"""Scale out with ``jax.sharding`` and ``jax.distributed``: meshes, path rules, sharded states.

``import nnjax as nj``; ``nj.sharding.mesh(...)``. Nothing here replaces JAX: a
mesh is a ``jax.sharding.Mesh``, rules give ``NamedSharding``s, and the trainer's
jitted step runs unchanged on sharded inputs; XLA's SPMD partitioner inserts the
collectives. (The fan-out combinator is ``nj.fan_out``.)

Example (8 devices, FSDP; tensor parallel is ``mesh({"data": 2, "model": 4})``
with ``tensor_parallel_rules()``)::

    mesh = nj.sharding.mesh({"data": -1})
    ts = nj.sharding.shard_train_state(tr.init(params, state), mesh, nj.sharding.fsdp_rules())
    for x, y in batches:
        ts, metrics = tr.step(ts, nj.sharding.shard_batch((x, y), mesh), key)

The same code runs over many processes after ``jax.distributed.initialize``;
each process passes its own part of the global batch to :func:`shard_batch`
(see ``examples/distributed_train.py``).
"""

from nnjax.sharding.mesh import *
from nnjax.sharding.presets import *
from nnjax.sharding.rules import *
from nnjax.sharding.saving import *
