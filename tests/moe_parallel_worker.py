"""The 4-device half of the expert-parallel test in ``tests/test_moe.py``, run in a subprocess.

``python -m tests.moe_parallel_worker OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: a 2-layer MoE model trains 3
steps on a ``{"data": 2, "expert": 2}`` mesh under ``expert_parallel_rules`` (each
dispatch), and the same 3 steps on one device; the JSON records the largest parameter
difference, the expert kernels' specs and whether every leaf kept its sharding.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
import nnjax.sharding as sh
from nnjax.core.paths import flatten


def main(path: str) -> None:
    assert jax.device_count() == 4, jax.devices()
    jax.config.update("jax_default_matmul_precision", "highest")
    rng = np.random.default_rng(0)
    batches = [
        (rng.standard_normal((4, 6, 8)).astype(np.float32), rng.integers(0, 3, (4, 6)))
        for _ in range(3)
    ]
    out = {}
    for dispatch in ("capacity", "sorted"):
        moe = nj.layers.MoE(4, 2, 12, dispatch=dispatch, capacity_factor=2.0, aux_loss_weight=0.1)
        model = nj.serial(blocks=nj.repeat(nj.residual(moe), 2), head=nj.Dense(3))
        params, state = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batches[0][0]))
        tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-2))
        ref = tr.init(params, state)
        for b in batches:
            ref, _ = tr.step(ref, b)
        mesh = sh.mesh({"data": 2, "expert": 2})
        rules = sh.expert_parallel_rules()
        ts0 = tr.init(params, state)
        want = sh.train_state_shardings(ts0, mesh, rules)
        ts = sh.shard_train_state(ts0, mesh, rules)
        for b in batches:
            ts, m = tr.step(ts, sh.shard_batch(b, mesh))
        moved = sum(
            not a.sharding.is_equivalent_to(w, a.ndim)
            for a, w in zip(jax.tree.leaves(ts), jax.tree.leaves(want), strict=True)
        )
        kernel = flatten(ts.params)["blocks/stacked/moe_0/experts/stacked/gate/kernel"]
        out[dispatch] = {
            "diff": max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(
                    jax.tree.leaves(ts.params), jax.tree.leaves(ref.params), strict=True
                )
            ),
            "moved": int(moved),
            "spec": str(tuple(kernel.sharding.spec)),
            "shard_shape": list(kernel.addressable_shards[0].data.shape),
            "aux": float(m["aux/load_balance"]),
        }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
