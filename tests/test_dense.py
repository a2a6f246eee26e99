import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj


def test_dense_matches_torch_linear(torch):
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    layer = nj.Dense(7)
    params, state = layer.init(jax.random.key(0), x)
    ref = torch.nn.Linear(5, 7)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["kernel"]).T))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        expected = ref(torch.from_numpy(x)).numpy()
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dense_default_init_is_lecun_normal_and_zero_bias():
    params, _ = nj.Dense(400).init(jax.random.key(0), jnp.zeros((1, 300)))
    assert float(jnp.abs(params["bias"]).max()) == 0.0
    # lecun_normal: truncated normal with variance 1/fan_in
    np.testing.assert_allclose(float(jnp.std(params["kernel"])), (1 / 300) ** 0.5, rtol=0.03)


def test_dense_grads_by_finite_differences():
    layer = nj.Dense(3)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    params, state = layer.init(jax.random.key(0), x)
    f = lambda p, x: layer.apply(p, state, x)[0]
    check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_dense_lora_adds_low_rank_term():
    layer = nj.Dense(6)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    params, state = layer.init(jax.random.key(0), x)
    a = jax.random.normal(jax.random.key(2), (4, 2))
    b = jax.random.normal(jax.random.key(3), (2, 6))
    y, _ = layer.apply({**params, "lora_a": a, "lora_b": b}, state, x)
    x, a, b, params = jax.tree.map(np.asarray, (x, a, b, params))
    expected = x @ (params["kernel"] + a @ b) + params["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dense_dtype_rules():
    layer = nj.Dense(3, dtype=jnp.bfloat16)
    params, state = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
    assert params["kernel"].dtype == jnp.float32
    y, _ = layer.apply(params, state, jnp.ones((2, 4)))
    assert y.dtype == jnp.bfloat16


def test_dense_rejects_scalar_input():
    params, state = nj.Dense(3).init(jax.random.key(0), jnp.zeros((2, 4)))
    with pytest.raises(
        nj.LayerError, match=r"expected x with at least 1 axes \(\.\.\., in\), got x.shape == \(\)"
    ):
        nj.Dense(3).apply(params, state, jnp.float32(1.0))


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 5), (2, 1, 3, 5)])
def test_matmul_last_equals_numpy_on_any_leading_axes(shape):
    from nnjax.layers.base import matmul_last

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=shape), rng.normal(size=(5, 3))
    y = matmul_last(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert y.shape == (*shape[:-1], 3)
    np.testing.assert_allclose(y, np.einsum("...i,ij->...j", x, w), rtol=1e-5, atol=1e-5)


def test_dense_grads_on_three_axes_by_finite_differences():
    layer = nj.Dense(4, use_bias=False)
    x = jax.random.normal(jax.random.key(1), (2, 3, 5))
    params, state = layer.init(jax.random.key(0), x)
    f = jax.jit(lambda p, x: jnp.sin(layer.apply(p, state, x)[0]))
    check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_adapter_internals_stay_in_their_module():
    from nnjax.layers import adapters

    for name in ("adapted_matmul", "ADAPTER_KEYS", "ADAPTERS", "AdapterKind"):
        assert not hasattr(nj, name), name
        assert hasattr(adapters, name), name
