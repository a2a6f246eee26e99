"""The 8-device half of ``tests/test_parallel.py``, run in a subprocess.

``python -m tests.parallel_worker OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported
(the pytest process keeps its one device). Every case trains 5 steps on a mesh and
the same 5 steps on one device (the reference, in this same process), and records
the largest parameter difference, whether every output leaf kept the sharding the
rules give, and the specs of a few leaves; the test asserts on the JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
import nnjax.sharding as sh
from nnjax import finetune
from nnjax.core.paths import flatten
from nnjax.training.losses import softmax_cross_entropy
from nnjax.training.trainer import trainer

STEPS = 5
# Adam's eps is raised from 1e-8: a gradient that is zero in exact arithmetic (an
# attention key bias, which softmax cancels) is ~1e-9 noise in float32, with a
# different noise per reduction order, and Adam with a tiny eps turns any noise
# into a full learning-rate step. Momentum state still mirrors the params.
OPTIMIZER = optax.adam(1e-2, eps=1e-3)


def block_mlp() -> nj.Layer:
    """``(B, 16) -> (B, 8)``: two stacked residual MLP blocks (``blocks/stacked/mlp/{fc,proj}``)."""
    mlp = nj.serial(fc=nj.Dense(64), proj=nj.Dense(16))
    block = nj.residual(nj.LayerNorm(), jax.nn.gelu, mlp=mlp)
    return nj.serial(blocks=nj.repeat(block, 2), head=nj.Dense(8))


def gpt() -> nj.Layer:
    """``(B, 8) int -> (B, 8, 32)``: a 2-block GPT, 4 heads, width 32."""
    return nj.serial(
        embed=nj.Embedding(32, 32),
        pos=nj.LearnedPositionalEmbedding(8),
        blocks=nj.repeat(nj.TransformerBlock(4), 2),
        ln_f=nj.LayerNorm(),
        head=nj.Dense(32),
    )


def mlp_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((16, 16)).astype(np.float32), rng.integers(0, 8, 16).astype(np.int32))
        for _ in range(STEPS)
    ]


def gpt_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    tokens = np.random.default_rng(0).integers(0, 32, (STEPS, 8, 9)).astype(np.int32)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def init(model: nj.Layer, x: np.ndarray) -> tuple[Any, Any]:
    return jax.jit(model.init)(jax.random.key(0), jnp.asarray(x))


def train(tr, ts, batches, mesh=None):
    for b in batches:
        ts, _ = tr.step(ts, b if mesh is None else sh.shard_batch(b, mesh), None)
    return ts


def max_diff(a: Any, b: Any) -> float:
    """On the host: eager device ops would compile one program per leaf and sharding."""
    a, b = jax.device_get((a, b))
    return max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def spec_str(x: jax.Array) -> str:
    """The spec as a string, trailing ``None``s dropped (``P("a", None)`` == ``P("a")``)."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return str(tuple(spec))


def kept_shardings(ts: Any, want: Any) -> int:
    """How many leaves of ``ts`` do *not* sit on the sharding ``want`` gives them."""
    bad = [
        a
        for a, w in zip(jax.tree.leaves(ts), jax.tree.leaves(want), strict=True)
        if not a.sharding.is_equivalent_to(w, a.ndim)
    ]
    return len(bad)


def frozen_exact(params0: Any, params: Any, mask: Any) -> bool:
    """Frozen leaves (and frozen stacked copies) came out bit for bit."""
    p0, p1, m = flatten(params0), flatten(params), flatten(mask)
    for path, keep in m.items():
        a, b = np.asarray(p0[path]), np.asarray(p1[path])
        if keep is False and not np.array_equal(a, b):
            return False
        if isinstance(keep, np.ndarray) and not np.array_equal(a[~keep], b[~keep]):
            return False
    return True


MODES = {
    "dp": ({"data": -1}, sh.data_parallel_rules()),
    "fsdp": ({"data": -1}, sh.fsdp_rules(min_size=64)),
    "tp": (
        {"data": 2, "model": 4},
        sh.tensor_parallel_rules(column=("mlp/fc",), row=("mlp/proj",)),
    ),
}


def mlp_cases(out: dict[str, Any]) -> Any:
    """Full training, and a LoRA fine-tuning with a mask, in each mode; FSDP's state for the checkpoint."""
    model = block_mlp()
    batches = mlp_batches()
    params, state = init(model, batches[0][0])
    lora_params, lora_mask = finetune.add_lora(
        params, jax.random.key(1), ["**/mlp/fc/kernel", "**/mlp/proj/kernel"], rank=4
    )
    # LoRA of the second stacked block only (a (2,) bool mask on stacked leaves) and
    # the head; the kernels and the first block's adapters stay frozen.
    block_1 = finetune.mask(lora_params, "blocks/1/**")
    head = finetune.mask(lora_params, "head/**")
    lora_mask = finetune.union(finetune.intersect(lora_mask, block_1), head)
    variants = {"full": (params, None), "lora": (lora_params, lora_mask)}
    for variant, (p0, mask) in variants.items():
        tr = trainer(model, softmax_cross_entropy, OPTIMIZER, trainable=mask)
        ref = train(tr, tr.init(p0, state), batches)
        for mode, (axes, rules) in MODES.items():
            mesh = sh.mesh(axes)
            ts0 = tr.init(p0, state)
            want = sh.train_state_shardings(ts0, mesh, rules)
            ts = train(tr, sh.shard_train_state(ts0, mesh, rules), batches, mesh)
            fp, mu = flatten(ts.params), flatten(ts.opt_state[0].mu)
            out[f"mlp/{variant}/{mode}"] = {
                "diff": max_diff(ts.params, ref.params),
                "moved": kept_shardings(ts, want),
                "specs": {p: spec_str(v) for p, v in fp.items()},
                "mu_specs": {p: spec_str(v) for p, v in mu.items()},
                "frozen_exact": mask is None or frozen_exact(p0, ts.params, mask),
            }
            if variant == "full" and mode == "fsdp":
                fsdp = ts, tr
    return (*fsdp, params, state)


def checkpoint_case(out: dict[str, Any], ts: Any, tr: Any, params: Any, state: Any) -> None:
    """Save the FSDP state (8 x data), restore onto a 2 x 4 tensor-parallel mesh and onto 1 device."""
    expected = jax.device_get(ts)
    with tempfile.TemporaryDirectory() as d:
        sh.save_sharded(d, ts)
        abstract = jax.eval_shape(tr.init, params, state)
        res = {}
        for name, axes, rules in (
            ("tp", {"data": 2, "model": 4}, MODES["tp"][1]),
            ("one", {"data": 1}, sh.fsdp_rules()),
        ):
            devices = jax.devices()[: int(np.prod([v for v in axes.values() if v > 0]))]
            mesh = sh.mesh(axes, devices=devices)
            shardings = sh.train_state_shardings(abstract, mesh, rules)
            got, _ = sh.restore_sharded(d, abstract, shardings)
            equal = all(
                np.array_equal(np.asarray(a), b)
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
            )
            k = got.params["blocks"]["stacked"]["mlp"]["proj"]["kernel"]
            res[name] = {
                "equal": equal,
                "moved": kept_shardings(got, shardings),
                "spec": spec_str(k),
                "devices": len(k.sharding.device_set),
            }
            # The restored state trains on: one more step on the new mesh.
            got, m = tr.step(got, sh.shard_batch(mlp_batches()[0], mesh), None)
            res[name]["loss_finite"] = bool(jnp.isfinite(m["loss"]))
        out["checkpoint"] = res


def gpt_case(out: dict[str, Any]) -> None:
    model = gpt()
    batches = gpt_batches()
    params, state = init(model, batches[0][0])
    tr = trainer(model, softmax_cross_entropy, OPTIMIZER)
    ref = train(tr, tr.init(params, state), batches)
    mesh = sh.mesh({"data": 2, "model": 4})
    rules = sh.tensor_parallel_rules()
    ts0 = tr.init(params, state)
    want = sh.train_state_shardings(ts0, mesh, rules)
    ts = train(tr, sh.shard_train_state(ts0, mesh, rules), batches, mesh)
    fp = flatten(ts.params)
    out["gpt/tp"] = {
        "diff": max_diff(ts.params, ref.params),
        "moved": kept_shardings(ts, want),
        "specs": {p: spec_str(v) for p, v in fp.items()},
    }


def error_case(out: dict[str, Any]) -> None:
    mesh = sh.mesh()
    try:
        sh.shard_batch((np.zeros((12, 16)), np.zeros(12)), mesh)
        message = None
    except sh.ShardingError as e:
        message = str(e)
    rows = sh.local_batch_slice(mesh, 16)
    x, _ = sh.shard_batch(mlp_batches()[0], mesh)
    stacked, _ = sh.shard_batch(jax.tree.map(lambda *b: np.stack(b), *mlp_batches()), mesh, dim=1)
    out["errors"] = {
        "batch": message,
        "slice": [rows.start, rows.stop],
        "batch_spec": spec_str(x),
        "steps_spec": spec_str(stacked),
    }


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_default_matmul_precision", "highest")
    out: dict[str, Any] = {}
    error_case(out)
    ts, tr, params, state = mlp_cases(out)
    checkpoint_case(out, ts, tr, params, state)
    gpt_case(out)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
