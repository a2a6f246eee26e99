import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax import finetune as ft
from nnjax.checkpoint.state import load_params
from nnjax.training.losses import mse
from nnjax.training.trainer import trainer

X = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def gpt():
    """A 3-block GPT-style stack and a head; built once (the tests never modify params)."""
    model = nj.serial(blocks=nj.repeat(nj.TransformerBlock(2), 3), head=nj.Dense(3))
    params, state = jax.jit(model.init)(jax.random.key(0), X)
    return model, params, state


def _out(model, params, state):
    return np.asarray(jax.jit(model.apply)(params, state, X)[0])


def _randomize(params, names, seed=1, scale=0.3):
    """Give the named adapter leaves random values, as after training."""
    flat = nj.paths.flatten(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    for path, v in flat.items():
        name = path.rpartition("/")[2]
        if name in names:
            noise = scale * jax.random.normal(next(keys), v.shape)
            flat[path] = (1.0 + noise) if name in ("ia3_scale", "dora_magnitude") else noise
    return nj.paths.unflatten(flat)


def _f64(x):
    return np.asarray(x, np.float64)


def test_add_lora_shapes_mask_and_zero_change_at_init(gpt):
    model, params, state = gpt
    p2, m = ft.add_lora(params, jax.random.key(1), rank=2, alpha=4)
    q = p2["blocks"]["stacked"]["attn"]["query"]
    assert jax.tree.map(jnp.shape, q) == {
        "kernel": (3, 8, 8),
        "bias": (3, 8),
        "lora_a": (3, 8, 2),
        "lora_b": (3, 2, 8),
    }
    assert float(jnp.abs(q["lora_b"]).max()) == 0.0
    assert "lora_a" not in p2["blocks"]["stacked"]["attn"]["key"]
    assert m["blocks"]["stacked"]["attn"]["value"] == {
        "kernel": False,
        "bias": False,
        "lora_a": True,
        "lora_b": True,
    }
    assert ft.trainable_count(p2, m) == 2 * 3 * (8 * 2 + 2 * 8)
    # outputs bit for bit unchanged: the added term is (x @ a) @ 0
    np.testing.assert_array_equal(_out(model, p2, state), _out(model, params, state))


def test_lora_a_init_folds_alpha_over_rank():
    params = {"dense": {"kernel": jnp.zeros((400, 300))}}
    p2, _ = ft.add_lora(params, jax.random.key(0), "dense/kernel", rank=8, alpha=32)
    a = np.asarray(p2["dense"]["lora_a"])
    bound = 4.0 / np.sqrt(400)  # (alpha / r) * U(-1/sqrt(in), 1/sqrt(in)), as peft
    assert a.shape == (400, 8) and np.abs(a).max() <= bound
    np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)


def test_merge_lora_closed_form_and_same_outputs(gpt):
    model, params, state = gpt
    p2, _ = ft.add_lora(params, jax.random.key(1), ["**/attn/*/kernel", "head/kernel"], rank=2)
    p2 = _randomize(p2, ("lora_a", "lora_b"))
    merged = ft.merge_lora(p2)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    q = p2["blocks"]["stacked"]["attn"]["query"]
    expected = _f64(q["kernel"]) + _f64(q["lora_a"]) @ _f64(q["lora_b"])
    np.testing.assert_allclose(
        merged["blocks"]["stacked"]["attn"]["query"]["kernel"], expected, rtol=1e-5, atol=1e-6
    )
    h = p2["head"]
    np.testing.assert_allclose(
        merged["head"]["kernel"],
        _f64(h["kernel"]) + _f64(h["lora_a"]) @ _f64(h["lora_b"]),
        rtol=1e-5,
        atol=1e-6,
    )
    y = _out(model, p2, state)
    assert not np.allclose(y, _out(model, params, state), atol=1e-3)
    np.testing.assert_allclose(_out(model, merged, state), y, rtol=1e-4, atol=1e-5)


def test_ia3_init_and_merge(gpt):
    model, params, state = gpt
    p2, m = ft.add_ia3(params, ["**/key/kernel", "**/value/kernel", "**/mlp/fc/kernel"])
    fc = p2["blocks"]["stacked"]["mlp"]["fc"]
    np.testing.assert_array_equal(fc["ia3_scale"], np.ones((3, 32)))
    assert m["blocks"]["stacked"]["mlp"]["fc"]["ia3_scale"] is True
    assert ft.trainable_count(p2, m) == 3 * (8 + 8 + 32)
    np.testing.assert_array_equal(_out(model, p2, state), _out(model, params, state))
    p2 = _randomize(p2, ("ia3_scale",))
    merged = ft.merge_ia3(p2)
    fc = p2["blocks"]["stacked"]["mlp"]["fc"]
    np.testing.assert_allclose(
        merged["blocks"]["stacked"]["mlp"]["fc"]["kernel"],
        _f64(fc["kernel"]) * _f64(fc["ia3_scale"])[:, None, :],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        _out(model, merged, state), _out(model, p2, state), rtol=1e-4, atol=1e-5
    )


def _dora_closed_form(kernel, a, b, m):
    w = _f64(kernel) + _f64(a) @ _f64(b)
    return w * (_f64(m) / np.linalg.norm(w, axis=-2))[..., None, :]


def test_dora_init_and_merge(gpt):
    model, params, state = gpt
    p2, m = ft.add_dora(params, jax.random.key(2), "**/attn/query/kernel", rank=2)
    q = p2["blocks"]["stacked"]["attn"]["query"]
    np.testing.assert_allclose(
        q["dora_magnitude"], np.linalg.norm(_f64(q["kernel"]), axis=-2), rtol=1e-6
    )
    assert set(k for k, v in m["blocks"]["stacked"]["attn"]["query"].items() if v) == {
        "lora_a",
        "lora_b",
        "dora_magnitude",
    }
    np.testing.assert_allclose(
        _out(model, p2, state), _out(model, params, state), rtol=1e-5, atol=1e-6
    )
    p2 = _randomize(p2, ("lora_b", "dora_magnitude"))
    merged = ft.merge_dora(p2)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    q = p2["blocks"]["stacked"]["attn"]["query"]
    np.testing.assert_allclose(
        merged["blocks"]["stacked"]["attn"]["query"]["kernel"],
        _dora_closed_form(q["kernel"], q["lora_a"], q["lora_b"], q["dora_magnitude"]),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        _out(model, merged, state), _out(model, p2, state), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("second", ["lora", "dora"])
def test_merge_adapters_with_ia3_on_the_same_kernel(gpt, second):
    model, params, state = gpt
    targets = ["**/attn/value/kernel", "head/kernel"]
    add = ft.add_lora if second == "lora" else ft.add_dora
    p2, _ = add(params, jax.random.key(3), targets, rank=2)
    p2, _ = ft.add_ia3(p2, targets)
    p2 = _randomize(p2, ("lora_b", "ia3_scale", "dora_magnitude"))
    merged = ft.merge_adapters(p2)
    assert ft.adapter_params(merged) == {}
    np.testing.assert_allclose(
        _out(model, merged, state), _out(model, p2, state), rtol=1e-4, atol=1e-5
    )


def test_save_and_load_adapters_alone(gpt, tmp_path):
    model, params, state = gpt
    p2, m = ft.add_lora(params, jax.random.key(1), rank=2)
    p2 = _randomize(p2, ("lora_b",))
    path = tmp_path / "lora.safetensors"
    size = ft.save_adapters(path, p2)
    assert size < nj.paths.param_bytes(params) / 5
    assert nj.paths.flatten(ft.adapter_params(p2)).keys() == {
        f"blocks/stacked/attn/{n}/lora_{ab}" for n in ("query", "value") for ab in "ab"
    }
    loaded = ft.load_adapters(path, params)
    for path_, v in nj.paths.flatten(p2).items():
        assert np.array_equal(nj.paths.flatten(loaded)[path_], v), path_
    np.testing.assert_array_equal(_out(model, loaded, state), _out(model, p2, state))
    assert ft.adapter_mask(loaded) == m
    # with a mask, the file holds what it trains: the adapters and a new head
    ft.save_adapters(path, p2, trainable=ft.union(m, ft.head_only(p2)))
    assert "head" in load_params(path)
    bad = {
        "head": params["head"],
        "blocks": {"stacked": {"attn": {"query": {"kernel": jnp.zeros((3, 8, 4))}}}},
    }
    with pytest.raises(
        nj.CheckpointError,
        match=r"does not fit the params: \[.*'blocks/stacked/attn/query/lora_b \(3, 2, 8\) \(expected \(3, 2, 4\)\)'",
    ):
        ft.load_adapters(tmp_path / "lora.safetensors", bad)


def test_adapter_target_errors(gpt):
    _, params, _ = gpt
    with pytest.raises(
        nj.GlobError, match=r"add_lora target '\*\*/qeury/kernel' matches no parameter path"
    ):
        ft.add_lora(params, jax.random.key(0), "**/qeury/kernel")
    with pytest.raises(
        ValueError, match=r"targets must select layer kernels .* 'head/bias' has shape \(3,\)"
    ):
        ft.add_ia3(params, "head/bias")
    p2, _ = ft.add_lora(params, jax.random.key(0), "head/kernel", rank=2)
    with pytest.raises(ValueError, match=r"add_dora: head already has \['lora_a', 'lora_b'\]"):
        ft.add_dora(p2, jax.random.key(0), "head/kernel", rank=2)
    with pytest.raises(
        ValueError,
        match=r"add_lora: rank 4 is larger than the kernel 'head/kernel' allows: "
        r"its matrix \(in, out\) is \(8, 3\), so rank <= 3",
    ):
        ft.add_lora(params, jax.random.key(0), "head/kernel", rank=4)
    with pytest.raises(ValueError, match=r"add_lora: rank must be an int >= 1, got 2.5"):
        ft.add_lora(params, jax.random.key(0), "head/kernel", rank=2.5)


def test_broken_adapters_name_the_path_in_the_layer_and_in_merge(gpt):
    model, params, state = gpt
    p2, _ = ft.add_lora(params, jax.random.key(0), ["**/attn/query/kernel", "head/kernel"], rank=2)
    missing = nj.paths.unflatten(
        {k: v for k, v in nj.paths.flatten(p2).items() if k != "head/lora_b"}
    )
    msg = r"head: adapter param\(s\) \['lora_a'\] without \['lora_b'\]: the adapter needs lora_a \(in, r\), lora_b \(r, out\)"
    with pytest.raises(nj.LayerError, match=msg):
        model.apply(missing, state, X)
    with pytest.raises(nj.LayerError, match=msg):
        ft.merge_lora(missing)
    flat = nj.paths.flatten(p2)
    flat["blocks/stacked/attn/query/lora_b"] = jnp.zeros((3, 2, 5))
    wrong = nj.paths.unflatten(flat)
    msg = (
        r"blocks/stacked/attn/query: expected adapter param 'lora_b' \(r, out\) with shape \(2, 8\) "
        r"beside kernel \(in, out\) == \(8, 8\) and r == 2 \(from lora_a\), got \(2, 5\)"
    )
    with pytest.raises(
        nj.LayerError, match=msg.replace("blocks/stacked/attn/query", "blocks/attn/query")
    ):
        model.apply(wrong, state, X)
    with pytest.raises(nj.LayerError, match=msg):
        ft.merge_adapters(wrong)


def test_lora_recovers_a_low_rank_change():
    model = nj.serial(nj.Dense(16), jnp.tanh, nj.Dense(4))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype(np.float32)
    base, state = model.init(jax.random.key(0), x)
    u, v = rng.normal(size=(12, 2)) / 3, rng.normal(size=(2, 16)) / 3
    target = {
        **base,
        "dense_0": {
            **base["dense_0"],
            "kernel": base["dense_0"]["kernel"] + (u @ v).astype(np.float32),
        },
    }
    y = model.apply(target, state, x)[0]
    p, m = ft.add_lora(base, jax.random.key(1), "dense_0/kernel", rank=4, alpha=4)
    tr = trainer(model, mse, optax.adam(1e-2), trainable=m, steps_per_call=50)
    ts = tr.init(p, state)
    x_k, y_k = np.broadcast_to(x, (50, *x.shape)), np.broadcast_to(y, (50, *y.shape))
    first = None
    for _ in range(8):
        ts, met = tr.step(ts, (x_k, y_k))
        first = float(met["loss"][0]) if first is None else first
    last = float(met["loss"][-1])
    assert last < 1e-4 * first, (first, last)
    merged = ft.merge_lora(ts.params)
    np.testing.assert_allclose(merged["dense_0"]["kernel"], target["dense_0"]["kernel"], atol=2e-2)
    assert np.array_equal(ts.params["dense_1"]["kernel"], base["dense_1"]["kernel"])


def test_lora_on_a_subset_of_stacked_blocks_leaves_the_others_bit_identical(gpt):
    model, params, state = gpt
    p2, m = ft.add_lora(params, jax.random.key(1), "blocks/1/attn/*/kernel", rank=2)
    np.testing.assert_array_equal(
        m["blocks"]["stacked"]["attn"]["query"]["lora_a"], [False, True, False]
    )
    assert m["blocks"]["stacked"]["attn"]["key"]["lora_b"] is not True
    y = np.random.default_rng(1).normal(size=(2, 4, 3)).astype(np.float32)
    tr = trainer(model, mse, optax.adam(1e-2), trainable=m)
    ts = tr.init(p2, state)
    for _ in range(3):
        ts, _ = tr.step(ts, (X, y))
    for name in ("query", "key", "value", "out"):
        old, new = (
            p2["blocks"]["stacked"]["attn"][name],
            ts.params["blocks"]["stacked"]["attn"][name],
        )
        for leaf in ("lora_a", "lora_b", "kernel"):
            for i in (0, 2):
                assert np.asarray(old[leaf][i]).tobytes() == np.asarray(new[leaf][i]).tobytes()
        assert not np.allclose(old["lora_b"][1], new["lora_b"][1])
        merged = ft.merge_lora(ts.params)["blocks"]["stacked"]["attn"][name]["kernel"]
        np.testing.assert_array_equal(
            np.asarray(merged)[[0, 2]],
            np.asarray(params["blocks"]["stacked"]["attn"][name]["kernel"])[[0, 2]],
        )
        assert not np.allclose(merged[1], params["blocks"]["stacked"]["attn"][name]["kernel"][1])


def test_lora_on_every_kernel_of_a_cnn_trains_and_merges():
    """``"**/kernel"`` reaches the Conv and the Dense; training moves only the adapters."""
    model = nj.serial(nj.Conv(4, (3, 3)), jax.nn.relu, nj.Flatten(), head=nj.Dense(2))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 5, 2)).astype(np.float32)
    y = rng.normal(size=(4, 2)).astype(np.float32)
    params, state = model.init(jax.random.key(0), x)
    p2, m = ft.add_lora(params, jax.random.key(1), "**/kernel", rank=2)
    assert jax.tree.map(jnp.shape, p2)["conv_0"] == {
        "bias": (4,),
        "kernel": (3, 3, 2, 4),
        "lora_a": (18, 2),
        "lora_b": (2, 4),
    }
    tr = trainer(model, mse, optax.adam(1e-2), trainable=m)
    ts = tr.init(p2, state)
    for _ in range(3):
        ts, _ = tr.step(ts, (x, y))
    new = nj.paths.flatten(ts.params)
    for path, old in nj.paths.flatten(p2).items():
        changed = not np.array_equal(new[path], old)
        assert changed == (path.rpartition("/")[2] in ("lora_a", "lora_b")), path
    merged = ft.merge_lora(ts.params)
    np.testing.assert_allclose(
        model.apply(merged, state, x)[0], model.apply(ts.params, state, x)[0], rtol=1e-5, atol=1e-6
    )
