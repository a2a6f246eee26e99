"""nnjax.layers.moe and the auxiliary-loss channel (nnjax.core.aux).

References: a NumPy top-k router; transformers' MixtralSparseMoeBlock,
Qwen2MoeSparseMoeBlock and Qwen3MoeSparseMoeBlock with the same weights; transformers'
``load_balancing_loss_func`` over several layers' router logits; finite differences
through a train step whose objective includes the load-balancing loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.core import aux
from nnjax.core.errors import ArgumentError, LayerError

D, E, F = 8, 4, 6


def _np_route(logits, k, normalize):
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    # stable descending sort: ties go to the lower index, as torch.topk and lax.top_k
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, idx, -1)
    if normalize:
        w = w / w.sum(-1, keepdims=True)
    return w, idx, probs


@pytest.mark.parametrize("normalize", [False, True])
def test_route_equals_numpy(normalize):
    logits = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    logits[3, 5] = logits[3, 2]  # a tie: the lower index wins
    w, idx, probs = nj.layers.route(jnp.asarray(logits), 3, normalize=normalize)
    w_ref, idx_ref, p_ref = _np_route(logits.astype(np.float64), 3, normalize)
    np.testing.assert_array_equal(np.asarray(idx), idx_ref)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(probs), p_ref, rtol=1e-6, atol=1e-7)


def _x(shape=(2, 7, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _np_moe(params, x, k, normalize):
    """Each token through its chosen experts, in NumPy (float64)."""
    x = np.asarray(x, np.float64).reshape(-1, D)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    w, idx, _ = _np_route(x @ p["router"]["kernel"], k, normalize)
    ex = p["experts"]["stacked"]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            e = idx[t, j]
            g = x[t] @ ex["gate"]["kernel"][e]
            h = (g / (1 + np.exp(-g))) * (x[t] @ ex["up"]["kernel"][e])
            out[t] += w[t, j] * (h @ ex["down"]["kernel"][e])
    return out


@pytest.mark.parametrize("dispatch", ["sorted", "capacity", "dense"])
def test_dispatches_equal_numpy(dispatch):
    # capacity_factor E / k: room for every token, nothing dropped
    moe = nj.layers.MoE(E, 2, F, normalize_top_k=True, dispatch=dispatch, capacity_factor=2.0)
    x = _x()
    params, state = moe.init(jax.random.key(0), x)
    y, _ = jax.jit(moe.apply)(params, state, x)
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, D), _np_moe(params, x, 2, True), rtol=1e-5, atol=1e-6
    )


def test_sorted_gradients_equal_dense():
    x = _x()
    grads = {}
    for dispatch in ("sorted", "dense"):
        moe = nj.layers.MoE(E, 2, F, dispatch=dispatch, block_size=4)
        params, _ = moe.init(jax.random.key(0), x)

        def loss(p, x, moe=moe):
            return jnp.sum(jnp.square(moe.apply(p, {}, x)[0]))

        grads[dispatch] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(grads["sorted"]), jax.tree.leaves(grads["dense"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_capacity_drops_overflow_like_numpy():
    # every token prefers expert 0: with capacity 2 only the first two tokens keep it
    moe = nj.layers.MoE(E, 1, F, dispatch="capacity", capacity_factor=0.5)
    x = _x((1, 16, D))
    params, _ = moe.init(jax.random.key(0), x)
    params["router"]["kernel"] = jnp.zeros((D, E)).at[:, 0].set(0.0).at[0, 0].set(0.0)
    params["router"]["kernel"] = params["router"]["kernel"].at[:, 0].add(1e-3)
    x = jnp.abs(x)  # positive features: expert 0 has the largest logit for every token
    y, _ = moe.apply(params, {}, x)
    ref = _np_moe(params, x, 1, False)
    cap = int(np.ceil(0.5 * 16 / E))
    np.testing.assert_allclose(np.asarray(y)[0, :cap], ref[:cap], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y)[0, cap:], 0.0)


def test_bad_arguments_are_named():
    with pytest.raises(ArgumentError, match="top_k must be in"):
        nj.layers.MoE(4, 5, 8)
    with pytest.raises(ArgumentError, match="dispatch must be one of"):
        nj.layers.MoE(4, 2, 8, dispatch="ragged")
    moe = nj.layers.MoE(4, 2, 8)
    params, _ = moe.init(jax.random.key(0), jnp.zeros((3, D)))
    with pytest.raises(LayerError, match=r"router: expected x\.shape"):
        moe.apply(params, {}, jnp.zeros((3, D + 1)))


# --- against transformers' blocks ------------------------------------------------------


def _hf_block(kind):
    import torch
    import transformers as tr

    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = tr.MixtralConfig(
            hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2
        )
    elif kind == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import (
            Qwen2MoeSparseMoeBlock as Block,
        )

        cfg = tr.Qwen2MoeConfig(
            hidden_size=D,
            moe_intermediate_size=F,
            shared_expert_intermediate_size=5,
            num_experts=E,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock as Block,
        )

        cfg = tr.Qwen3MoeConfig(
            hidden_size=D,
            moe_intermediate_size=F,
            num_experts=E,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        )
    torch.manual_seed(0)
    block = Block(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return block


def _t(a):
    return jnp.asarray(a.detach().numpy())


def _mlp_params(mlp):
    return {n: {"kernel": _t(getattr(mlp, f"{n}_proj").weight).T} for n in ("gate", "up", "down")}


def _copy(block):
    """nnjax MoE params from a transformers sparse-MoE block (the test's own mapping)."""
    gate_up = _t(block.experts.gate_up_proj)  # (E, 2F, D)
    f = gate_up.shape[1] // 2
    params = {
        "router": {"kernel": _t(block.gate.weight).T},
        "experts": {
            "stacked": {
                "gate": {"kernel": jnp.swapaxes(gate_up[:, :f], 1, 2)},
                "up": {"kernel": jnp.swapaxes(gate_up[:, f:], 1, 2)},
                "down": {"kernel": jnp.swapaxes(_t(block.experts.down_proj), 1, 2)},
            }
        },
    }
    if hasattr(block, "shared_expert"):
        params["shared_expert"] = _mlp_params(block.shared_expert)
        params["shared_expert_gate"] = {"kernel": _t(block.shared_expert_gate.weight).T}
    return params


@pytest.mark.parametrize(
    "kind, moe",
    [
        ("mixtral", lambda: nj.layers.MoE(E, 2, F, normalize_top_k=True)),
        ("qwen2_moe", lambda: nj.layers.MoE(E, 2, F, shared_features=5)),
        ("qwen3_moe", lambda: nj.layers.MoE(E, 3, F, normalize_top_k=True)),
    ],
)
def test_block_equals_transformers(kind, moe):
    import torch

    block = _hf_block(kind)
    x = np.random.default_rng(3).normal(size=(2, 9, D)).astype(np.float32)
    with torch.no_grad():
        out = block(torch.from_numpy(x))
    ref = (out[0] if isinstance(out, tuple) else out).numpy()
    y, _ = jax.jit(moe().apply)(_copy(block), {}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-6)


# --- the auxiliary-loss channel ---------------------------------------------------------


def _stacked_moe(layers=3, weight=0.01):
    block = nj.residual(nj.layers.MoE(E, 2, F, aux_loss_weight=weight, z_loss_weight=0.1))
    return nj.repeat(block, layers)


def test_load_balance_equals_transformers_over_layers():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _stacked_moe()
    x = _x((2, 6, D))
    params, _ = model.init(jax.random.key(0), x)
    _, state = model.apply(params, {}, x)
    total, metrics = aux.losses(state)
    # each layer's router logits, layer by layer (the residual stream as it goes)
    stacked = params["stacked"]
    h, gate_logits, z = x.reshape(-1, D), [], []
    for i in range(3):
        p = jax.tree.map(lambda a, i=i: a[i], stacked)
        logits = h @ p["moe_0"]["router"]["kernel"]
        gate_logits.append(torch.from_numpy(np.array(logits)))
        z.append(np.mean(np.square(np.log(np.exp(np.asarray(logits, np.float64)).sum(-1)))))
        h = h + nj.layers.MoE(E, 2, F).apply(p["moe_0"], {}, h)[0]
    ref = float(load_balancing_loss_func(tuple(gate_logits), E, 2))
    np.testing.assert_allclose(float(metrics["aux/load_balance"]), ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["aux/router_z"]), np.mean(z), rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.01 * ref + 0.1 * np.mean(z), rtol=1e-5)


def test_strip_and_channel_errors():
    state = {"blocks": {"stacked": {"moe": {"aux": {"x": {"value": jnp.ones(3)}}}}}, "p": 1}
    assert aux.strip(state) == {"p": 1}
    # a state that was empty to begin with keeps its place (a wrapper layer's {} child)
    assert aux.strip({"wrap": {"inner": {}}, "moe": {"aux": {}}}) == {"wrap": {"inner": {}}}
    with pytest.raises(LayerError, match="'x' lacks the leaf"):
        aux.losses(state)
    with pytest.raises(LayerError, match=r"goes at \.\.\./aux/"):
        aux.losses({"aux": {"value": jnp.ones(())}})


def test_train_step_differentiates_the_aux_loss():
    """The step's gradient is that of task loss + weight * load balance (finite differences)."""
    model = nj.serial(nj.layers.MoE(E, 2, F, aux_loss_weight=0.5), head=nj.Dense(3))
    x = _x((4, 5, D))
    y = jax.random.randint(jax.random.key(2), (4, 5), 0, 3)
    params, state = model.init(jax.random.key(0), x)
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.sgd(1.0))
    ts, m = tr.step(tr.init(params, state), (x, y))
    assert set(m) == {"loss", "aux/load_balance", "aux/router_z"}
    assert jax.tree.structure(ts.state) == jax.tree.structure({})

    @jax.jit
    def objective(p):
        out, s = model.apply(p, {}, x)
        return nj.losses.softmax_cross_entropy(out, y) + aux.losses(s)[0]

    grad = jax.tree.map(lambda a, b: a - b, params, ts.params)  # sgd(1.0): params - grad
    # the router gets gradient only through the routing weights and the aux loss
    g = grad["moe_0"]["router"]["kernel"]
    eps = 1e-3
    for i, j in [(0, 0), (3, 2), (5, 1)]:
        bump = jnp.zeros_like(g).at[i, j].set(eps)

        def at(s, bump=bump):
            p = jax.tree.map(lambda a: a, params)
            p["moe_0"]["router"]["kernel"] = params["moe_0"]["router"]["kernel"] + s * bump
            return float(objective(p))

        fd = (at(1.0) - at(-1.0)) / (2 * eps)
        np.testing.assert_allclose(float(g[i, j]), fd, rtol=2e-2, atol=2e-4)
    # and the aux term is part of it: without it the router's gradient differs
    no_aux = jax.jit(
        jax.grad(lambda p: nj.losses.softmax_cross_entropy(model.apply(p, {}, x)[0], y))
    )(params)
    assert not np.allclose(np.asarray(no_aux["moe_0"]["router"]["kernel"]), np.asarray(g))


# --- expert kernels under masks, LoRA, quantization and sharding rules ---------------------


def _moe_lm(**kw):
    return nj.serial(
        blocks=nj.repeat(nj.residual(nj.layers.MoE(E, 2, F, **kw)), 2), head=nj.Dense(3)
    )


def test_lora_on_one_expert_trains_it_and_keeps_the_base_bit_identical():
    model = _moe_lm(aux_loss_weight=0.01)
    x = _x((4, 5, D))
    y = jax.random.randint(jax.random.key(2), (4, 5), 0, 3)
    params, state = model.init(jax.random.key(0), x)
    lora, _ = nj.finetune.add_lora(
        params, jax.random.key(1), "blocks/*/*/experts/*/*/kernel", rank=2
    )
    mask = nj.finetune.mask(lora, "blocks/*/*/experts/1/*/lora_*")  # expert 1 of every layer
    m = mask["blocks"]["stacked"]["moe_0"]["experts"]["stacked"]["up"]["lora_b"]
    np.testing.assert_array_equal(m, [[False, True, False, False]] * 2)
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-2), trainable=mask)
    ts = tr.init(lora, state)
    for _ in range(3):
        ts, _ = tr.step(ts, (x, y))
    before, after = nj.paths.flatten(lora), nj.paths.flatten(ts.params)
    for path, a in before.items():
        changed = not np.array_equal(np.asarray(a), np.asarray(after[path]))
        if "lora_b" in path:  # only expert 1's adapters moved
            moved = ~np.all(np.asarray(a) == np.asarray(after[path]), axis=(-2, -1))
            np.testing.assert_array_equal(moved, [[False, True, False, False]] * 2)
        elif "lora_a" not in path:
            assert not changed, path  # the base, bit for bit
    # the adapted model is W + A @ B per expert: merging gives the same outputs
    merged = nj.finetune.merge_lora(ts.params)
    np.testing.assert_allclose(
        np.asarray(model.apply(ts.params, {}, x)[0]),
        np.asarray(model.apply(merged, {}, x)[0]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_quantized_experts_equal_their_dequantized_floats():
    moe = nj.layers.MoE(E, 2, F)
    x = _x()
    params, _ = moe.init(jax.random.key(0), x)
    q = nj.finetune.quantize(params, "experts/*/*/kernel", bits=8)
    assert q["experts"]["stacked"]["gate"]["kernel"].dtype == jnp.int8
    assert q["router"]["kernel"].dtype == jnp.float32
    deq = nj.finetune.dequantize(q)
    np.testing.assert_allclose(
        np.asarray(moe.apply(q, {}, x)[0]),
        _np_moe(deq, x, 2, False).reshape(2, 7, D),
        rtol=1e-4,
        atol=1e-5,
    )


def test_expert_parallel_rules_split_the_experts_axis():
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    model = _moe_lm()
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 5, D)))[0]
    mesh = AbstractMesh((2, 2), ("data", "expert"))
    specs = nj.paths.flatten(
        nj.sharding.param_specs(params, mesh, nj.sharding.expert_parallel_rules())
    )
    for path, spec in specs.items():
        assert spec == (P(None, "expert") if "/experts/" in path else P()), path
    with pytest.raises(nj.ShardingError, match=r"divisible|multiple|does not divide"):
        nj.sharding.param_specs(
            params, AbstractMesh((3,), ("expert",)), nj.sharding.expert_parallel_rules()
        )


def test_expert_parallel_training_equals_one_device(tmp_path):
    """4 simulated devices (2 data x 2 expert) in a subprocess; reference: one device there."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    flags = (
        "--xla_force_host_platform_device_count=4 "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.moe_parallel_worker", str(out)],
        cwd=root,
        env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for dispatch in ("capacity", "sorted"):
        r = results[dispatch]
        assert r["diff"] < 1e-5, dispatch
        assert r["moved"] == 0, dispatch
        assert r["spec"] == "(None, 'expert')", dispatch
        assert r["shard_shape"] == [2, 2, 8, 12], dispatch  # 2 of the 4 experts per device
        assert np.isfinite(r["aux"])
