import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj


def _rand(shape, seed=0, loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(np.float32)


def _random_affine(params, seed=1):
    """Replace ones/zeros by random scale and bias so the tests see them."""
    return {
        k: jnp.asarray(_rand(v.shape, seed + i)) for i, (k, v) in enumerate(sorted(params.items()))
    }


def _np(a):
    return np.asarray(a, dtype=np.float64)


# --- BatchNorm -----------------------------------------------------------------------


def _torch_bn(torch, cls, params, state, momentum):
    c = params["scale"].shape[0]
    ref = cls(c, eps=1e-5, momentum=1 - momentum)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        ref.running_mean.copy_(torch.from_numpy(np.array(state["mean"])))
        ref.running_var.copy_(torch.from_numpy(np.array(state["var"])))
    return ref


def _bn_setup(x_shape, momentum, axis=-1):
    layer = nj.BatchNorm(momentum=momentum, axis=axis)
    x = _rand(x_shape)
    params, state = layer.init(jax.random.key(0), x)
    params = _random_affine(params)
    c = state["mean"].shape[0]
    state = {"mean": jnp.asarray(_rand((c,), 5)), "var": jnp.asarray(_rand((c,), 6) ** 2 + 0.5)}
    return layer, params, state


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 7)])
def test_batchnorm1d_train_and_eval_match_torch(torch, shape):
    # torch BatchNorm1d takes (N, C) or (N, C, L): features on axis 1
    layer, params, state = _bn_setup(shape, 0.9, axis=1)
    ref = _torch_bn(torch, torch.nn.BatchNorm1d, params, state, 0.9)
    ref.train()
    for step in range(2):  # two updates: the running stats compound
        x = _rand(shape, 10 + step, loc=2.0, scale=3.0)
        y, state = layer.apply(params, state, x, train=True)
        with torch.no_grad():
            expected = ref(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state["mean"], ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state["var"], ref.running_var.numpy(), rtol=1e-6, atol=1e-6)
    ref.eval()
    x = _rand(shape, 20)
    y, state_after = layer.apply(params, state, x, train=False)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert state_after is state


def test_batchnorm2d_channels_last_matches_torch(torch):
    shape = (3, 5, 4, 6)  # NHWC
    layer, params, state = _bn_setup(shape, 0.99)
    ref = _torch_bn(torch, torch.nn.BatchNorm2d, params, state, 0.99)
    x = _rand(shape, 3, loc=-1.0, scale=2.0)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    y, new_state = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, state, x)
    with torch.no_grad():
        expected = ref.train()(x_nchw).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state["mean"], ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state["var"], ref.running_var.numpy(), rtol=1e-6, atol=1e-6)
    y_eval, _ = layer.apply(params, new_state, x)
    with torch.no_grad():
        expected = ref.eval()(x_nchw).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)


def test_batchnorm2d_train_grads_match_torch(torch):
    shape = (4, 3, 3, 5)
    layer, params, state = _bn_setup(shape, 0.9)
    x = _rand(shape, 7)
    w = _rand(shape, 8)  # a random cotangent: loss = sum(y * w)

    def loss(p, x):
        return jnp.sum(layer.apply(p, state, x, train=True)[0] * w)

    g_p, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    ref = _torch_bn(torch, torch.nn.BatchNorm2d, params, state, 0.9).train()
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    (ref(x_t) * torch.from_numpy(w.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_allclose(g_x, x_t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_p["scale"], ref.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_p["bias"], ref.bias.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_batchnorm_running_stats_formula_and_no_gradient():
    # running var takes the unbiased batch variance (PyTorch, the paper), not Flax's biased one
    layer = nj.BatchNorm(momentum=0.8, use_scale=False, use_bias=False)
    x = _rand((5, 2, 3), 4)
    params, state = layer.init(jax.random.key(0), x)
    _, new = layer.apply(params, state, x, train=True)
    flat = _np(x).reshape(-1, 3)
    np.testing.assert_allclose(new["mean"], 0.2 * flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.8 + 0.2 * flat.var(0, ddof=1), rtol=1e-5)
    assert new["mean"].dtype == new["var"].dtype == jnp.float32
    g = jax.grad(lambda x: jnp.sum(layer.apply(params, state, x, train=True)[1]["var"]))(x)
    np.testing.assert_array_equal(g, np.zeros_like(x))


def test_batchnorm_in_serial_keeps_state_paths_and_bf16():
    model = nj.serial(nj.Dense(4), nj.BatchNorm())
    x = jnp.asarray(_rand((6, 3)), jnp.bfloat16)
    params, state = model.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, state) == {"batchnorm_0": {"mean": (4,), "var": (4,)}}
    y, new_state = model.apply(params, state, x, train=True)
    assert y.dtype == jnp.bfloat16
    assert new_state["batchnorm_0"]["var"].dtype == jnp.float32
    # batch-normalised output: per-feature mean 0, biased variance 1 (up to bf16 rounding)
    y32 = _np(y.astype(jnp.float32))
    np.testing.assert_allclose(y32.mean(0), 0.0, atol=2e-2)
    np.testing.assert_allclose(y32.var(0), 1.0, atol=3e-2)


def test_batchnorm_errors():
    layer = nj.BatchNorm()
    params, state = layer.init(jax.random.key(0), jnp.zeros((4, 3)))
    with pytest.raises(
        nj.LayerError,
        match=r"expected more than 1 value per feature in train mode \(batch statistics\), "
        r"got x.shape == \(1, 3\) with feature axis -1",
    ):
        layer.apply(params, state, jnp.ones((1, 3)), train=True)
    with pytest.raises(nj.LayerError, match=r"missing state\(s\) \['mean', 'var'\]; got keys \[\]"):
        layer.apply(params, {}, jnp.ones((4, 3)))
    with pytest.raises(
        nj.LayerError, match=r"expected x with a feature axis 2, got x.shape == \(4, 3\)"
    ):
        nj.BatchNorm(axis=2).init(jax.random.key(0), jnp.zeros((4, 3)))
    with pytest.raises(nj.LayerError, match=r"expected param 'mean' with shape \(5,\), got \(3,\)"):
        layer.apply(params, state, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        nj.BatchNorm(momentum=1.5)


# --- LayerNorm / RMSNorm -------------------------------------------------------------


def test_layernorm_matches_torch(torch):
    x = _rand((2, 3, 8), loc=1.0, scale=2.0)
    layer = nj.LayerNorm(epsilon=1e-5)
    params = _random_affine(layer.init(jax.random.key(0), x)[0])
    ref = torch.nn.LayerNorm(8, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        expected = ref(torch.from_numpy(x)).numpy()
    y, _ = layer.apply(params, {}, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_layernorm_bf16_computes_stats_in_float32():
    # an offset of 256 leaves bf16 only ~1 unit of resolution: bf16 statistics would be garbage
    x = jnp.asarray(256.0 + 8.0 * _rand((4, 16)), jnp.bfloat16)
    y, _ = nj.LayerNorm(use_scale=False, use_bias=False).apply({}, {}, x)
    assert y.dtype == jnp.bfloat16
    xf = _np(x.astype(jnp.float32))
    expected = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(_np(y.astype(jnp.float32)), expected, rtol=1e-2, atol=1e-2)


def test_rmsnorm_matches_numpy_and_torch(torch):
    x = _rand((2, 5, 8), loc=0.5)
    layer = nj.RMSNorm(epsilon=1e-6)
    params = _random_affine(layer.init(jax.random.key(0), x)[0])
    y, _ = layer.apply(params, {}, x)
    xd = _np(x)
    expected = xd / np.sqrt(np.mean(xd**2, -1, keepdims=True) + 1e-6) * _np(params["scale"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    ref = torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["scale"])))
        np.testing.assert_allclose(y, ref(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_rmsnorm_without_scale_and_dtype():
    x = _rand((3, 4))
    layer = nj.RMSNorm(use_scale=False, dtype=jnp.bfloat16)
    params, state = layer.init(jax.random.key(0), x)
    assert params == {}
    y, _ = layer.apply(params, state, x)
    assert y.dtype == jnp.bfloat16
    xd = _np(x)
    expected = xd / np.sqrt(np.mean(xd**2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_np(y.astype(jnp.float32)), expected, rtol=1e-2, atol=1e-2)


def test_norms_reject_integer_input():
    with pytest.raises(nj.LayerError, match=r"expected a floating-point x, got x.dtype == int32"):
        nj.RMSNorm().apply({"scale": jnp.ones(3)}, {}, jnp.ones((2, 3), jnp.int32))


# --- GroupNorm -----------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "groups"), [((2, 4, 3, 6), 3), ((2, 5, 8), 2), ((3, 4), 4)])
def test_groupnorm_matches_torch(torch, shape, groups):
    x = _rand(shape, loc=1.0, scale=2.0)
    layer = nj.GroupNorm(groups)
    params = _random_affine(layer.init(jax.random.key(0), x)[0])
    ref = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5)
    perm = (0, x.ndim - 1, *range(1, x.ndim - 1))  # channels-last -> channels-first
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        expected = ref(torch.from_numpy(x.transpose(perm).copy())).numpy()
    y, _ = layer.apply(params, {}, x)
    np.testing.assert_allclose(y, expected.transpose(np.argsort(perm)), rtol=1e-5, atol=1e-5)


def test_groupnorm_grads_by_finite_differences():
    with jax.enable_x64(True):
        layer = nj.GroupNorm(2, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float64)
        params, state = layer.init(jax.random.key(0), x)
        params = jax.tree.map(
            lambda a: a + jax.random.normal(jax.random.key(2), a.shape, a.dtype), params
        )
        f = lambda p, x: layer.apply(p, state, x)[0]
        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_batchnorm_train_grads_by_finite_differences():
    with jax.enable_x64(True):
        layer = nj.BatchNorm(param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
        params, state = layer.init(jax.random.key(0), x)
        f = lambda p, x: layer.apply(p, state, x, train=True)[0]
        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_groupnorm_errors():
    with pytest.raises(
        nj.LayerError,
        match=r"expected the channel count x.shape\[-1\] divisible by num_groups == 32, "
        r"got x.shape == \(2, 4, 4, 12\) \(12 channels\)",
    ):
        nj.GroupNorm().init(jax.random.key(0), jnp.zeros((2, 4, 4, 12)))
    with pytest.raises(
        nj.LayerError,
        match=r"expected x with at least 2 axes \(N, \.\.\., C\), got x.shape == \(6,\)",
    ):
        nj.GroupNorm(2).apply({"scale": jnp.ones(6), "bias": jnp.ones(6)}, {}, jnp.ones(6))
    with pytest.raises(ValueError, match=r"num_groups must be >= 1, got 0"):
        nj.GroupNorm(0)
