import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj


def _x(shape):
    # values in [1, 2): a zero in the output can only be a dropped element
    return jax.random.uniform(jax.random.key(0), shape, minval=1.0, maxval=2.0)


def test_eval_mode_is_identity():
    layer = nj.Dropout(0.5)
    x = _x((4, 8))
    params, state = layer.init(jax.random.key(0), x)
    assert params == {} and state == {}
    for kwargs in [{}, {"rng": jax.random.key(1)}]:
        y, s = layer.apply(params, state, x, **kwargs)
        assert y is x and s == {}


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_train_mode_drop_fraction_and_scaling(rate):
    layer = nj.Dropout(rate)
    x = _x((200, 500))
    y, _ = layer.apply({}, {}, x, rng=jax.random.key(3), train=True)
    n = x.size
    dropped = np.asarray(y) == 0.0
    # fraction of drops ~ Binomial(n, rate) / n: within 5 standard deviations
    assert abs(dropped.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    kept = ~dropped
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)


def test_same_key_same_mask_other_key_other_mask():
    layer = nj.Dropout(0.3)
    x = _x((16, 32))
    y1, _ = layer.apply({}, {}, x, rng=jax.random.key(5), train=True)
    y2 = jax.jit(lambda x, r: layer.apply({}, {}, x, rng=r, train=True)[0])(x, jax.random.key(5))
    y3, _ = layer.apply({}, {}, x, rng=jax.random.key(6), train=True)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(np.asarray(y1) == 0, np.asarray(y3) == 0)


def test_broadcast_dims_share_the_mask():
    layer = nj.Dropout(0.5, broadcast_dims=(-2,))
    x = _x((3, 10, 6))
    y, _ = layer.apply({}, {}, x, rng=jax.random.key(2), train=True)
    dropped = np.asarray(y) == 0.0
    assert (dropped == dropped[:, :1, :]).all()  # the same along axis -2
    assert 0 < dropped.mean() < 1


def test_rate_zero_is_identity_in_train_mode_and_bf16_is_kept():
    x = _x((4, 4))
    y, _ = nj.Dropout(0.0).apply({}, {}, x, train=True)
    assert y is x
    x16 = x.astype(jnp.bfloat16)
    y16, _ = nj.Dropout(0.5).apply({}, {}, x16, rng=jax.random.key(0), train=True)
    assert y16.dtype == jnp.bfloat16
    kept = np.asarray(y16) != 0
    np.testing.assert_array_equal(np.asarray(y16)[kept], np.asarray(x16 * 2)[kept])


def test_errors():
    with pytest.raises(
        nj.LayerError,
        match=r"^Dropout\(rate=0.3\) in train mode needs an rng: "
        r"apply\(\.\.\., train=True, rng=jax.random.key\(\.\.\.\)\)$",
    ):
        nj.Dropout(0.3).apply({}, {}, jnp.ones(3), train=True)
    with pytest.raises(ValueError, match=r"Dropout: rate must be in \[0, 1\), got 1.0"):
        nj.Dropout(1.0)
