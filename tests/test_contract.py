"""Every registered layer against the layer contract (tests/cases/*.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.core import aux
from tests.cases import all_cases

CASES = all_cases()


def _input(case, dtype):
    key = jax.random.key(1)
    if case.int_input is not None:
        return jax.random.randint(key, case.shape, *case.int_input)
    return jax.random.normal(key, case.shape, jnp.dtype(dtype))


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


def test_init_is_shape_only(case):
    layer, x = case.make(), _input(case, "float32")
    key = jax.random.key(0)
    planned = jax.eval_shape(layer.init, key, jax.ShapeDtypeStruct(x.shape, x.dtype))
    params, state = layer.init(key, x)
    assert _shapes(planned) == _shapes((params, state))
    for leaf in jax.tree.leaves((params, state)):
        assert isinstance(leaf, jax.Array)


def test_apply_shape_matches_eval_shape_and_jit(case):
    layer, x = case.make(), _input(case, "float32")
    params, state = layer.init(jax.random.key(0), x)
    predicted = nj.output_shape(layer, params, state, jax.ShapeDtypeStruct(x.shape, x.dtype))
    y, new_state = layer.apply(params, state, x)
    assert _shapes(y) == _shapes(predicted)
    # The auxiliary-loss channel is output only (nnjax.core.aux): the rest is init's state.
    assert _shapes(aux.strip(new_state)) == _shapes(state)
    y_jit, _ = jax.jit(lambda p, s, x: layer.apply(p, s, x))(params, state, x)
    for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(y_jit), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_grads_are_finite(case):
    if not case.grad:
        pytest.skip("layer has no differentiable output")
    layer, x = case.make(), _input(case, "float32")
    params, state = layer.init(jax.random.key(0), x)

    def loss(p, x):
        y, _ = layer.apply(p, state, x, rng=jax.random.key(2), train=case.train)
        return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(y))

    if case.int_input is None:
        g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        assert bool(jnp.all(jnp.isfinite(g_x)))
    else:
        g_params = jax.jit(jax.grad(loss))(params, x)
    for g in jax.tree.leaves(g_params):
        assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_is_kept(case, dtype):
    if dtype not in case.dtypes:
        pytest.skip(f"{case.name} does not take {dtype} input")
    layer, x = case.make(), _input(case, dtype)
    params, state = layer.init(jax.random.key(0), x)
    y, _ = jax.jit(lambda p, s, x: layer.apply(p, s, x))(params, state, x)
    expected = jnp.float32 if case.int_input is not None else jnp.dtype(dtype)
    for leaf in jax.tree.leaves(y):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == expected
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))


def test_train_mode(case):
    if not case.train:
        pytest.skip("no train-mode behaviour")
    layer, x = case.make(), _input(case, "float32")
    params, state = layer.init(jax.random.key(0), x)
    y, new_state = jax.jit(lambda p, s, x, r: layer.apply(p, s, x, rng=r, train=True))(
        params, state, x, jax.random.key(3)
    )
    y_eval, _ = layer.apply(params, state, x)
    assert _shapes(y) == _shapes(y_eval)
    assert _shapes(aux.strip(new_state)) == _shapes(state)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)


def test_bfloat16_close_to_float32(case):
    """bfloat16 params and input against float32: outputs within ``case.bf16_tol``
    relative, each parameter gradient within ``bf16_tol`` of the gradient's whole norm
    (products accumulate in float32, statistics in float32; measured errors <= 1e-2)."""
    if "bfloat16" not in case.dtypes:
        pytest.skip(f"{case.name} does not take bfloat16 input")
    layer, x = case.make(), _input(case, "float32")
    params, state = layer.init(jax.random.key(0), x)
    to16 = functools.partial(
        jax.tree.map,
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
    )

    def loss(p, s, x):
        y, _ = layer.apply(p, s, x)
        leaves = [a.astype(jnp.float32) for a in jax.tree.leaves(y)]
        return sum(jnp.sum(a * jnp.cos(jnp.arange(a.size).reshape(a.shape))) for a in leaves), y

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y32), g32 = grad(params, state, x)
    x16 = x if case.int_input is not None else x.astype(jnp.bfloat16)
    (_, y16), g16 = grad(to16(params), to16(state), x16)
    for a, b in zip(jax.tree.leaves(y16), jax.tree.leaves(y32), strict=True):
        assert _rel_err(a, b) <= case.bf16_tol
    if case.grad:  # each leaf's error against the whole gradient's norm (some leaves are ~0)
        norm = np.sqrt(
            sum(np.sum(np.square(np.asarray(b, np.float64))) for b in jax.tree.leaves(g32))
        )
        for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
            diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
            assert np.linalg.norm(diff) <= case.bf16_tol * max(norm, 1e-12)
