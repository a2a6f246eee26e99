import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax import finetune as ft
from nnjax.training.losses import mse
from nnjax.training.trainer import trainer


def _model():
    block = nj.residual(ln=nj.LayerNorm(), fc=nj.Dense(8), act=jnp.tanh)
    return nj.serial(embed=nj.Dense(8), blocks=nj.repeat(block, 3), head=nj.Dense(2))


def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    model = _model()
    params, state = model.init(jax.random.key(0), x)
    return model, params, state, x, y


def _grads(model, params, state, x, y):
    """The reference gradient, straight from jax.grad on the whole model."""
    return jax.grad(lambda p: mse(model.apply(p, state, x, train=True)[0], y))(params)


def _step(model, params, state, x, y, tx, trainable=None):
    tr = trainer(model, mse, tx, trainable=trainable)
    ts, _ = tr.step(tr.init(params, state), (x, y))
    return ts.params


def test_labels_first_match_wins():
    _, params, *_ = _setup()
    lab = ft.labels(params, {"head/**": 0, "**/bias": 1, "**": 2})
    assert lab["head"] == {"kernel": "head/**", "bias": "head/**"}
    assert lab["embed"] == {"kernel": "**", "bias": "**/bias"}
    assert lab["blocks"]["stacked"]["ln"] == {"scale": "**", "bias": "**/bias"}


def test_labels_must_be_exhaustive_and_every_rule_used():
    _, params, *_ = _setup()
    with pytest.raises(
        nj.GlobError,
        match=r"groups must be exhaustive: 7 path\(s\) match no rule, e.g. \['blocks/0/fc/kernel'",
    ):
        ft.labels(params, ["head/**", "**/bias"])
    with pytest.raises(
        nj.GlobError, match=r"rule 'haed/\*\*' matches no parameter path; near paths"
    ):
        ft.labels(params, ["haed/**", "**"])
    with pytest.raises(
        nj.GlobError, match=r"rule 'head/\*\*' claims no leaf: every path it matches"
    ):
        ft.labels(params, ["**", "head/**"])


def test_labels_refuse_to_split_a_stacked_leaf():
    _, params, *_ = _setup()
    with pytest.raises(
        nj.GlobError,
        match=r"the stacked leaf 'blocks/stacked/fc/bias' fall in different groups \['\*\*', 'blocks/2/\*\*'\]; a group is per leaf",
    ):
        ft.labels(params, ["blocks/2/**", "**"])


def test_group_learning_rates_match_measured_sgd_updates():
    model, params, state, x, y = _setup()
    rates = {"head/**": 0.5, "blocks/**": 0.05, "**": 0.005}
    tx = ft.multi_optimizer({g: optax.sgd(lr) for g, lr in rates.items()}, params)
    new = _step(model, params, state, x, y, tx)
    grads = _grads(model, params, state, x, y)
    lab = ft.labels(params, rates)
    for path, g in nj.paths.flatten(grads).items():
        lr = rates[nj.paths.flatten(lab)[path]]
        delta = nj.paths.flatten(new)[path] - nj.paths.flatten(params)[path]
        # float32 rounding of new = old + update is ~6e-8 for |old| < 1
        np.testing.assert_allclose(delta, -lr * g, rtol=1e-4, atol=2e-7, err_msg=path)
        if float(jnp.abs(g).max()) > 0:
            measured = float(jnp.linalg.norm(delta) / jnp.linalg.norm(g))
            assert abs(measured - lr) <= 1e-2 * lr, path


def test_multi_optimizer_on_the_trainable_subset():
    model, params, state, x, y = _setup()
    tx = ft.multi_optimizer({"head/kernel": optax.sgd(0.5), "**": optax.sgd(0.05)}, params)
    new = _step(model, params, state, x, y, tx, trainable=ft.head_only(params))
    grads = _grads(model, params, state, x, y)
    np.testing.assert_allclose(
        new["head"]["kernel"] - params["head"]["kernel"],
        -0.5 * grads["head"]["kernel"],
        rtol=1e-4,
        atol=2e-7,
    )
    np.testing.assert_allclose(
        new["head"]["bias"] - params["head"]["bias"],
        -0.05 * grads["head"]["bias"],
        rtol=1e-4,
        atol=2e-7,
    )
    assert np.array_equal(new["embed"]["kernel"], params["embed"]["kernel"])


def test_layerwise_scales_closed_form():
    _, params, *_ = _setup()
    s = ft.layerwise_scales(params, 0.5, below="embed/**")
    assert s["embed"] == {"kernel": 0.5**4, "bias": 0.5**4}
    assert s["head"] == {"kernel": 1.0, "bias": 1.0}
    np.testing.assert_array_equal(s["blocks"]["stacked"]["fc"]["kernel"], [0.125, 0.25, 0.5])
    with pytest.raises(ValueError, match=r"expected 0 < decay <= 1, got 1.5"):
        ft.layerwise_scales(params, 1.5)


def test_layerwise_lr_decay_scales_each_stacked_copy():
    model, params, state, x, y = _setup()
    tx = ft.layerwise_lr_decay(params, 0.1, 0.5, below="embed/**", optimizer=optax.sgd)
    new = _step(model, params, state, x, y, tx)
    grads = _grads(model, params, state, x, y)
    k_new, k_old = (
        new["blocks"]["stacked"]["fc"]["kernel"],
        params["blocks"]["stacked"]["fc"]["kernel"],
    )
    g = grads["blocks"]["stacked"]["fc"]["kernel"]
    for i, scale in enumerate([0.125, 0.25, 0.5]):
        np.testing.assert_allclose(k_new[i] - k_old[i], -0.1 * scale * g[i], rtol=1e-4, atol=2e-7)
    np.testing.assert_allclose(
        new["embed"]["kernel"] - params["embed"]["kernel"],
        -0.1 * 0.0625 * grads["embed"]["kernel"],
        rtol=1e-4,
        atol=2e-7,
    )
    np.testing.assert_allclose(
        new["head"]["bias"] - params["head"]["bias"],
        -0.1 * grads["head"]["bias"],
        rtol=1e-4,
        atol=2e-7,
    )


def test_scale_by_tree_checks_paths_and_shapes():
    u = {"a": jnp.ones((3, 2)), "b": jnp.ones(2)}
    out, _ = ft.scale_by_tree({"a": np.array([1.0, 2.0, 3.0]), "b": 0.5}).update(
        u, optax.EmptyState()
    )
    np.testing.assert_array_equal(out["a"], [[1, 1], [2, 2], [3, 3]])
    np.testing.assert_array_equal(out["b"], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"scale_by_tree: no scale for 'b'"):
        ft.scale_by_tree({"a": 1.0}).update(u, optax.EmptyState())
    with pytest.raises(
        ValueError,
        match=r"expected a scale of shape \(3,\) for 'a' \(update \(3, 2\)\), got \(2,\)",
    ):
        ft.scale_by_tree({"a": np.ones(2), "b": 1.0}).update(u, optax.EmptyState())
