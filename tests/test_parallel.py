"""nnjax.sharding: meshes, path rules, presets, sharded training, multi-process, checkpoints.

Rule logic is checked here on ``jax.sharding.AbstractMesh`` (no devices needed).
Training on 8 devices runs in a subprocess (``tests/parallel_worker.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported;
its reference is the same 5 steps on one device. The multi-process test runs
``examples/distributed_train.py`` with two ``jax.distributed`` CPU processes
(gloo collectives) and compares with the same steps run here on one device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nnjax.sharding as sh
from nnjax import finetune
from nnjax.core.errors import GlobError
from nnjax.core.paths import flatten
from nnjax.sharding import ShardingError
from tests import parallel_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Test-only XLA flags: 8 simulated CPU devices, and cheaper LLVM passes (compile time
# dominates these tiny steps; the reference runs in the same process with the same flags).
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
MESH_2x4 = AbstractMesh((2, 4), ("data", "model"))
MESH_8 = AbstractMesh((8,), ("data",))
TP_MLP = sh.tensor_parallel_rules(column=("mlp/fc",), row=("mlp/proj",))


def shapes(model, x):
    return jax.eval_shape(model.init, jax.random.key(0), x)


@pytest.fixture(scope="module")
def mlp_params():
    return shapes(worker.block_mlp(), jax.ShapeDtypeStruct((16, 16), jnp.float32))[0]


def flat_specs(tree):
    """``{path: spec tuple without trailing Nones}``."""

    def norm(s):
        s = list(s)
        while s and s[-1] is None:
            s.pop()
        return tuple(s)

    return {p: norm(s) for p, s in flatten(tree).items()}


# ---------------------------------------------------------------- meshes


def test_mesh_fills_the_minus_one_axis_and_uses_auto_axes():
    m = sh.mesh()
    assert dict(m.shape) == {"data": jax.device_count()}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    m = sh.mesh({"data": 1, "model": -1})
    assert dict(m.shape) == {"data": 1, "model": 1}


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"data": -1, "model": -1}, r"at most one -1"),
        ({"data": 0}, r"positive axis sizes"),
        ({"data": 2}, r"product is the 1 devices, got axes == \{'data': 2\}"),
    ],
)
def test_mesh_rejects_bad_axis_sizes(axes, message):
    with pytest.raises(ShardingError, match=message):
        sh.mesh(axes)


# ---------------------------------------------------------------- rules


def test_rules_first_match_wins_and_stacked_leaves_get_leading_none(mlp_params):
    rules = {"**/fc/kernel": P(None, "model"), "**/kernel": P("data"), "**": P()}
    specs = flat_specs(sh.param_specs(mlp_params, MESH_2x4, rules))
    assert specs["blocks/stacked/mlp/fc/kernel"] == (None, None, "model")  # (2, 16, 64)
    assert specs["blocks/stacked/mlp/proj/kernel"] == (None, "data")  # (2, 64, 16)
    assert specs["head/kernel"] == ("data",)  # (16, 8), not stacked
    assert specs["blocks/stacked/mlp/fc/bias"] == ()


def test_param_shardings_are_named_shardings_on_the_mesh(mlp_params):
    shard = sh.param_shardings(mlp_params, MESH_2x4, TP_MLP)
    fc = shard["blocks"]["stacked"]["mlp"]["fc"]["kernel"]
    assert isinstance(fc, NamedSharding) and fc.mesh == MESH_2x4
    assert fc.spec == P(None, None, "model")


def test_a_rule_that_matches_nothing_is_a_glob_error_naming_it(mlp_params):
    rules = {"**/attn/*/kernel": P(None, "model"), "**": P()}
    with pytest.raises(
        GlobError, match=r"sharding rule '\*\*/attn/\*/kernel' matches no parameter"
    ):
        sh.param_specs(mlp_params, MESH_2x4, rules)
    # check_unused=False lets a generic rule set pass over a model without attention.
    specs = sh.param_specs(mlp_params, MESH_2x4, rules, check_unused=False)
    assert set(flat_specs(specs).values()) == {()}


def test_rules_must_cover_every_leaf(mlp_params):
    with pytest.raises(GlobError, match=r"no sharding rule matches 5 path\(s\).*catch-all '\*\*'"):
        sh.param_specs(mlp_params, MESH_2x4, {"**/kernel": P()})


def test_a_glob_must_match_all_stacked_copies_or_none(mlp_params):
    rules = {"blocks/1/**": P(), "**": P()}
    with pytest.raises(GlobError, match=r"'blocks/1/\*\*' matches 1 of the 2 stacked copies"):
        sh.param_specs(mlp_params, MESH_2x4, rules)


def test_a_non_divisible_dimension_names_path_shape_spec_and_axis_size(mlp_params):
    mesh = AbstractMesh((3,), ("model",))
    rules = {"**/fc/kernel": P(None, "model"), "**": P()}
    message = (
        r"blocks/stacked/mlp/fc/kernel: shape \(2, 16, 64\) does not fit spec "
        r"P\(None, None, 'model'\): dimension 2 \(64\) is not divisible by "
        r"mesh axis 'model' of size 3"
    )
    with pytest.raises(ShardingError, match=message):
        sh.param_specs(mlp_params, mesh, rules)
    # shard_params checks every leaf before it moves anything (this mesh has no devices).
    with pytest.raises(ShardingError, match=message):
        sh.shard_params(mlp_params, mesh, rules)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (P(None, "expert"), r"names mesh axis 'expert'; the mesh has axes \('data', 'model'\)"),
        (P("model", "model"), r"uses mesh axis 'model' twice"),
        (P(None, None, "model"), r"head/kernel: spec .* has 3 entries for shape \(16, 8\)"),
    ],
)
def test_bad_specs_are_sharding_errors(mlp_params, spec, message):
    with pytest.raises(ShardingError, match=message):
        sh.param_specs(mlp_params, MESH_2x4, {"head/kernel": spec, "**": P()})


# ---------------------------------------------------------------- presets


def test_fsdp_splits_the_largest_divisible_dimension_of_big_leaves(mlp_params):
    specs = flat_specs(sh.param_specs(mlp_params, MESH_8, sh.fsdp_rules(min_size=64)))
    assert specs == {
        "blocks/stacked/layernorm_0/bias": (),  # (2, 16): 16 per copy < min_size
        "blocks/stacked/layernorm_0/scale": (),
        "blocks/stacked/mlp/fc/bias": (None, "data"),  # (2, 64)
        "blocks/stacked/mlp/fc/kernel": (None, None, "data"),  # (2, 16, 64): the 64
        "blocks/stacked/mlp/proj/bias": (),
        "blocks/stacked/mlp/proj/kernel": (None, "data"),  # (2, 64, 16): the 64
        "head/bias": (),
        "head/kernel": ("data",),  # (16, 8): the first of 16 and 8
    }
    odd = {"w": jax.ShapeDtypeStruct((12, 10), jnp.float32)}  # nothing divisible by 8
    assert flat_specs(sh.param_specs(odd, MESH_8, sh.fsdp_rules(min_size=1))) == {"w": ()}


def test_tensor_parallel_rules_for_the_gpt_block_are_megatron_style():
    model = worker.gpt()
    params = shapes(model, jax.ShapeDtypeStruct((2, 8), jnp.int32))[0]
    params, _ = finetune.add_lora(params, jax.random.key(0), ["**/attn/*/kernel"], rank=4)
    specs = flat_specs(sh.param_specs(params, MESH_2x4, sh.tensor_parallel_rules()))
    col, col_b, row = (None, None, "model"), (None, "model"), (None, "model")
    for name in ("query", "key", "value"):
        assert specs[f"blocks/stacked/attn/{name}/kernel"] == col  # (2, d, d): split outputs
        assert specs[f"blocks/stacked/attn/{name}/bias"] == col_b
        assert specs[f"blocks/stacked/attn/{name}/lora_a"] == ()  # (2, d, r)
        assert specs[f"blocks/stacked/attn/{name}/lora_b"] == col  # (2, r, d)
    assert specs["blocks/stacked/attn/out/kernel"] == row  # (2, d, d): split inputs
    assert specs["blocks/stacked/attn/out/lora_a"] == row
    assert specs["blocks/stacked/attn/out/lora_b"] == ()
    assert specs["blocks/stacked/attn/out/bias"] == ()
    assert specs["blocks/stacked/mlp/fc/kernel"] == col
    assert specs["blocks/stacked/mlp/fc/bias"] == col_b
    assert specs["blocks/stacked/mlp/proj/kernel"] == row
    assert specs["blocks/stacked/mlp/proj/bias"] == ()
    rest = [p for p in specs if "/attn/" not in p and "/mlp/" not in p]
    assert rest and all(specs[p] == () for p in rest)  # embeddings, norms, head


# ---------------------------------------------------------------- optimizer and train state


def test_opt_state_leaves_that_mirror_params_take_their_sharding(mlp_params):
    # The trainer builds optimizer state on the trainable subset only.
    trainable = {"blocks": {"stacked": {"mlp": mlp_params["blocks"]["stacked"]["mlp"]}}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adafactor(1e-3), optax.adam(1e-3))
    opt_state = jax.eval_shape(opt.init, trainable)
    shard = sh.param_shardings(mlp_params, MESH_2x4, TP_MLP)
    out = sh.opt_state_shardings(opt_state, mlp_params, shard, MESH_2x4)
    adam = out[2][0]
    assert adam.count.spec == P()
    fc, proj = (
        adam.mu["blocks"]["stacked"]["mlp"]["fc"],
        adam.nu["blocks"]["stacked"]["mlp"]["proj"],
    )
    assert fc["kernel"].spec == P(None, None, "model") and fc["bias"].spec == P(None, "model")
    assert proj["kernel"].spec == P(None, "model") and proj["bias"].spec == P()
    # adafactor: a statistic with its param's shape takes its sharding; the factored
    # row/column statistics (other shapes) are replicated.
    params, specs = flatten(mlp_params), flatten(sh.param_specs(mlp_params, MESH_2x4, TP_MLP))
    leaves = jax.tree_util.tree_leaves_with_path(opt_state[1])
    shardings = jax.tree.leaves(out[1], is_leaf=lambda s: isinstance(s, NamedSharding))
    kinds = set()
    for (kp, leaf), s in zip(leaves, shardings, strict=True):
        path = "/".join(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
        same = path in params and np.shape(params[path]) == np.shape(leaf)
        kinds.add(same)
        assert s.spec == (specs[path] if same else P()), (kp, leaf.shape)
    assert kinds == {True, False}


def test_train_state_shardings_replicate_step_and_layer_state(mlp_params):
    from nnjax.training.trainer import TrainState

    ts = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        mlp_params,
        {"bn": {"mean": jax.ShapeDtypeStruct((64,), jnp.float32)}},
        jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, mlp_params),
    )
    out = sh.train_state_shardings(ts, MESH_2x4, TP_MLP)
    assert out.step.spec == P() and out.state["bn"]["mean"].spec == P()
    assert out.params["blocks"]["stacked"]["mlp"]["fc"]["kernel"].spec == P(None, None, "model")
    trace = out.opt_state[0].trace
    assert trace["blocks"]["stacked"]["mlp"]["proj"]["kernel"].spec == P(None, "model")


# ---------------------------------------------------------------- 8 devices (subprocess)


def run_worker(path: pathlib.Path) -> dict:
    """Run tests/parallel_worker.py on 8 simulated CPU devices; its JSON results."""
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.parallel_worker", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


FSDP_SPECS = {
    "blocks/stacked/mlp/fc/kernel": "(None, None, 'data')",
    "blocks/stacked/mlp/fc/bias": "(None, 'data')",
    "blocks/stacked/mlp/proj/kernel": "(None, 'data')",
    "blocks/stacked/mlp/proj/bias": "()",
    "head/kernel": "('data',)",
    "blocks/stacked/mlp/fc/lora_a": "(None, 'data')",
    "blocks/stacked/mlp/fc/lora_b": "(None, None, 'data')",
    "blocks/stacked/mlp/proj/lora_a": "(None, 'data')",
    "blocks/stacked/mlp/proj/lora_b": "(None, None, 'data')",
}
TP_SPECS = {
    "blocks/stacked/mlp/fc/kernel": "(None, None, 'model')",
    "blocks/stacked/mlp/fc/bias": "(None, 'model')",
    "blocks/stacked/mlp/proj/kernel": "(None, 'model')",
    "blocks/stacked/mlp/proj/bias": "()",
    "head/kernel": "()",
    "blocks/stacked/mlp/fc/lora_a": "()",
    "blocks/stacked/mlp/fc/lora_b": "(None, None, 'model')",
    "blocks/stacked/mlp/proj/lora_a": "(None, 'model')",
    "blocks/stacked/mlp/proj/lora_b": "()",
}


def check_training(r: dict, mode: str, variant: str) -> None:
    where = f"{variant}/{mode}"
    assert r["diff"] < 1e-5, where  # float32 reduction order only; a wrong collective is ~1e-2
    assert r["moved"] == 0, where  # jit kept every output leaf on the rules' sharding
    assert r["frozen_exact"], where  # masked leaves and copies bit for bit
    want = {"dp": {}, "fsdp": FSDP_SPECS, "tp": TP_SPECS}[mode]
    for path, spec in r["specs"].items():
        assert spec == want.get(path, "()"), (where, path)
    assert r["mu_specs"], where
    for path, spec in r["mu_specs"].items():  # Adam's mu follows its param
        assert spec == r["specs"][path], (where, path)
    if variant == "lora":  # optimizer state for the trainable leaves only
        trained = sorted(p for p in r["specs"] if "lora" in p or p.startswith("head/"))
        assert sorted(r["mu_specs"]) == trained, where


def test_eight_devices(tmp_path):
    """One subprocess for every 8-device check (a fixture would rerun per xdist worker)."""
    results = run_worker(tmp_path / "out.json")
    # Data parallel, FSDP, tensor parallel (2 x 4): full training and LoRA with a mask,
    # 5 steps equal to one device, params and optimizer state sharded as the rules say.
    for variant in ("full", "lora"):
        for mode in ("dp", "fsdp", "tp"):
            check_training(results[f"mlp/{variant}/{mode}"], mode, variant)
    # The GPT: Megatron tensor parallelism through attention and MLP.
    r = results["gpt/tp"]
    assert r["diff"] < 1e-5 and r["moved"] == 0
    assert r["specs"]["blocks/stacked/attn/query/kernel"] == "(None, None, 'model')"
    assert r["specs"]["blocks/stacked/attn/out/kernel"] == "(None, 'model')"
    assert r["specs"]["blocks/stacked/mlp/proj/bias"] == "()"
    # The FSDP state (8 x data) saved, restored onto 2 x 4 tensor parallel and onto
    # one device, bit-exact, then one more step on the new mesh.
    r = results["checkpoint"]
    assert r["tp"] == {
        "equal": True,
        "moved": 0,
        "spec": "(None, 'model')",
        "devices": 8,
        "loss_finite": True,
    }
    assert r["one"] == {"equal": True, "moved": 0, "spec": "()", "devices": 1, "loss_finite": True}
    # Batches.
    r = results["errors"]
    assert r["batch"] == (
        "batch[0]: expected x.shape[0] divisible by the 8 blocks of mesh axis 'data', "
        "got x.shape == (12, 16)"
    )
    assert r["slice"] == [0, 16]
    assert r["batch_spec"] == "('data',)"
    assert r["steps_spec"] == "(None, 'data')"


# ---------------------------------------------------------------- two processes


def load_example():
    spec = importlib.util.spec_from_file_location(
        "distributed_train", ROOT / "examples" / "distributed_train.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    cmd = [sys.executable, str(ROOT / "examples" / "distributed_train.py")]
    args = ["--processes=2", "--devices-per-process=2", "--steps=5", "--batch=32"]
    proc = subprocess.run(
        [*cmd, *args, "--mode=fsdp", f"--checkpoint={ckpt}", "--timeout=240"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), 4 device(s), mesh {'data': 4}, fsdp" in proc.stdout
    # The same 5 global batches on this process's one device.
    ex = load_example()
    _, tr, params, state = ex.build()
    ts = tr.init(params, state)
    for step in range(5):
        ts, _ = tr.step(ts, ex.global_batch(step, 32), None)
    # Saved by two processes from a 4-device FSDP mesh, restored onto one device.
    target = jax.eval_shape(tr.init, params, state)
    got, _ = sh.restore_sharded(
        ckpt, target, sh.train_state_shardings(target, sh.mesh(), sh.data_parallel_rules())
    )
    assert int(got.step) == 5
    for path, a in flatten(ts.params).items():
        np.testing.assert_allclose(flatten(got.params)[path], a, rtol=1e-5, atol=1e-6, err_msg=path)
