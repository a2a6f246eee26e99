"""Pools against PyTorch's pooling layers and NumPy closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj


def _rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _run(layer, x):
    return jax.jit(lambda x: layer.apply({}, {}, x)[0])(x)


def _torch_pool(torch, module, x, pads=None, value=0.0):
    """A torch pooling module on channels-last ``x``, after optional explicit (lo, hi) pads."""
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    if pads is not None:
        t = torch.nn.functional.pad(t, [p for lo_hi in reversed(pads) for p in lo_hi], value=value)
    return np.moveaxis(module(t).numpy(), 1, -1)


def _numpy_avg_pool(x, window, strides, pads):
    """Mean over the real (unpadded) cells of each window, by brute force on (N, H, W, C)."""
    n, h, w, c = x.shape
    (plo, phi), (qlo, qhi) = pads
    oh = (h + plo + phi - window[0]) // strides[0] + 1
    ow = (w + qlo + qhi - window[1]) // strides[1] + 1
    out = np.zeros((n, oh, ow, c), np.float64)
    for i, j in itertools.product(range(oh), range(ow)):
        r0, c0 = i * strides[0] - plo, j * strides[1] - qlo
        rows = slice(max(r0, 0), min(r0 + window[0], h))
        cols = slice(max(c0, 0), min(c0 + window[1], w))
        out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    return out


MAX_CASES = {
    # name: (x shape, nnjax kwargs, torch kwargs, explicit pads before torch or None)
    "1d": ((2, 9, 3), dict(window_shape=3), dict(kernel_size=3), None),
    "2d_default_stride": ((2, 8, 7, 3), dict(window_shape=(2, 2)), dict(kernel_size=2), None),
    "2d_strided_valid": (
        (2, 9, 9, 2),
        dict(window_shape=(3, 2), strides=(2, 1)),
        dict(kernel_size=(3, 2), stride=(2, 1)),
        None,
    ),
    "2d_same_stride1": (
        (2, 6, 7, 2),
        dict(window_shape=(3, 3), strides=1, padding="SAME"),
        dict(kernel_size=3, stride=1, padding=1),
        None,
    ),
    "2d_int_padding": (
        (2, 6, 6, 2),
        dict(window_shape=(3, 3), strides=2, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        None,
    ),
    "2d_same_asymmetric": (
        (2, 8, 8, 2),
        dict(window_shape=(3, 3), strides=2, padding="SAME"),
        dict(kernel_size=3, stride=2),
        [(0, 1), (0, 1)],
    ),
    "3d": ((1, 4, 6, 5, 2), dict(window_shape=(2, 2, 2)), dict(kernel_size=2), None),
}


@pytest.mark.parametrize("case", list(MAX_CASES))
def test_max_pool_matches_torch(torch, case):
    shape, kw, torch_kw, pads = MAX_CASES[case]
    x = _rand(shape)
    nd = len(shape) - 2
    ref = getattr(torch.nn, f"MaxPool{nd}d")(**torch_kw)
    expected = _torch_pool(torch, ref, x, pads, value=-np.inf)
    y = _run(nj.MaxPool(**kw), x)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


def test_max_pool_grad_matches_torch(torch):
    x = _rand((2, 6, 6, 3))
    layer = nj.MaxPool((3, 3), strides=2, padding=1)
    g = jax.grad(lambda x: jnp.sum(layer.apply({}, {}, x)[0] ** 2))(x)
    t = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_()
    (torch.nn.MaxPool2d(3, 2, padding=1)(t) ** 2).sum().backward()
    np.testing.assert_allclose(g, np.moveaxis(t.grad.numpy(), 1, -1), rtol=1e-6, atol=1e-6)


AVG_CASES = {
    # name: (x shape, nnjax kwargs, torch kwargs, explicit pads before torch or None)
    "1d": ((2, 9, 3), dict(window_shape=3, strides=2), dict(kernel_size=3, stride=2), None),
    "2d_non_overlapping": ((2, 8, 6, 3), dict(window_shape=(2, 2)), dict(kernel_size=2), None),
    "2d_non_overlapping_floor": (
        (2, 7, 9, 3),
        dict(window_shape=(2, 3)),
        dict(kernel_size=(2, 3)),
        None,
    ),
    "2d_overlapping": (
        (2, 7, 7, 2),
        dict(window_shape=(3, 3), strides=2),
        dict(kernel_size=3, stride=2),
        None,
    ),
    "2d_pad_included": (
        (2, 6, 7, 2),
        dict(window_shape=(3, 3), strides=1, padding="SAME"),
        dict(kernel_size=3, stride=1, padding=1),
        None,
    ),
    "2d_pad_excluded": (
        (2, 6, 7, 2),
        dict(window_shape=(3, 3), strides=1, padding=1, count_include_pad=False),
        dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
        None,
    ),
    "2d_same_asymmetric": (
        (2, 8, 8, 2),
        dict(window_shape=(3, 3), strides=2, padding="SAME"),
        dict(kernel_size=3, stride=2),
        [(0, 1), (0, 1)],
    ),
    "3d": (
        (1, 4, 6, 5, 2),
        dict(window_shape=(2, 3, 2), strides=1),
        dict(kernel_size=(2, 3, 2), stride=1),
        None,
    ),
}


@pytest.mark.parametrize("case", list(AVG_CASES))
def test_avg_pool_matches_torch(torch, case):
    shape, kw, torch_kw, pads = AVG_CASES[case]
    x = _rand(shape)
    nd = len(shape) - 2
    ref = getattr(torch.nn, f"AvgPool{nd}d")(**torch_kw)
    expected = _torch_pool(torch, ref, x, pads)
    y = _run(nj.AvgPool(**kw), x)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_avg_pool_excluding_asymmetric_padding_matches_numpy():
    x = _rand((2, 8, 7, 3))
    y = _run(nj.AvgPool((3, 2), strides=(2, 3), padding="SAME", count_include_pad=False), x)
    # SAME: out (4, 3); pad totals max((4 - 1) * 2 + 3 - 8, 0) = 1 and (3 - 1) * 3 + 2 - 7 = 1
    expected = _numpy_avg_pool(x, (3, 2), (2, 3), [(0, 1), (0, 1)])
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_avg_pool_reshape_path_equals_reduce_window_path():
    x = _rand((2, 3, 8, 6, 4))  # two batch axes
    fast = _run(nj.AvgPool((2, 3)), x)  # non-overlapping, unpadded: reshape + mean
    slow = _run(
        nj.AvgPool((2, 3), padding=((0, 0), (0, 0)), strides=(2, 3), count_include_pad=False), x
    )
    overlapping = _run(nj.AvgPool((2, 3), strides=(2, 2)), x)  # reduce_window, for the shapes
    assert fast.shape == (2, 3, 4, 2, 4) and overlapping.shape == (2, 3, 4, 2, 4)
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        fast, x.reshape(2, 3, 4, 2, 2, 3, 4).mean(axis=(3, 5)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_avg_pool_grads_by_finite_differences(padding):
    layer = nj.AvgPool((2, 3), strides=(1, 2), padding=padding, count_include_pad=False)
    f = jax.jit(lambda x: layer.apply({}, {}, x)[0])
    check_grads(f, (_rand((2, 4, 5, 2)),), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_pools_keep_dtype():
    x = jnp.asarray(_rand((2, 4, 4, 3)), jnp.bfloat16)
    for layer in [
        nj.MaxPool((2, 2)),
        nj.AvgPool((2, 2)),
        nj.AvgPool((3, 3), 1, "SAME"),
        nj.GlobalAvgPool(),
    ]:
        assert layer.apply({}, {}, x)[0].dtype == jnp.bfloat16
    ints = jnp.arange(32).reshape(1, 4, 4, 2)
    assert nj.MaxPool((2, 2)).apply({}, {}, ints)[0].dtype == ints.dtype
    np.testing.assert_array_equal(
        nj.MaxPool((2, 2)).apply({}, {}, ints)[0], [[[[10, 11], [14, 15]], [[26, 27], [30, 31]]]]
    )
    assert nj.AvgPool((2, 2)).apply({}, {}, ints)[0].dtype == jnp.float32


@pytest.mark.parametrize("shape", [(2, 7, 3), (2, 5, 6, 3), (1, 3, 4, 5, 2)])
def test_global_pools_match_numpy(shape):
    x = _rand(shape)
    axes = tuple(range(1, len(shape) - 1))
    np.testing.assert_allclose(_run(nj.GlobalAvgPool(), x), x.mean(axis=axes), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _run(nj.GlobalAvgPool(keepdims=True), x),
        x.mean(axis=axes, keepdims=True),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_array_equal(_run(nj.GlobalMaxPool(), x), x.max(axis=axes))


def test_pools_have_no_params_and_take_no_entry_in_serial():
    assert nj.MaxPool((2, 2)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 1))) == ({}, {})
    assert nj.GlobalAvgPool().init(jax.random.key(0), jnp.zeros((1, 4, 4, 1))) == ({}, {})
    model = nj.serial(
        nj.Conv(2, (3, 3)), nj.MaxPool((2, 2)), nj.AvgPool((2, 2)), nj.GlobalAvgPool(), nj.Dense(3)
    )
    params, _ = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    )
    assert sorted(params) == ["conv_0", "dense_0"]


def test_pool_errors():
    with pytest.raises(
        nj.LayerError,
        match=r"^expected x with at least 4 axes \(N, H, W, C\), got x.shape == \(8, 8, 3\)$",
    ):
        nj.MaxPool((2, 2)).apply({}, {}, jnp.zeros((8, 8, 3)))
    with pytest.raises(nj.LayerError, match=r"expected x with at least 5 axes \(N, D, H, W, C\)"):
        nj.AvgPool((2, 2, 2)).apply({}, {}, jnp.zeros((8, 8, 8, 3)))
    with pytest.raises(
        nj.LayerError,
        match=r"^expected x with at least 3 axes \(N, \*spatial, C\), got x.shape == \(2, 3\)$",
    ):
        nj.GlobalAvgPool().apply({}, {}, jnp.zeros((2, 3)))
    with pytest.raises(
        ValueError,
        match=r"MaxPool: strides must be a positive int or 2 positive ints, got \(0, 1\)",
    ):
        nj.MaxPool((2, 2), strides=(0, 1))
    with pytest.raises(ValueError, match=r"AvgPool: padding must be one of \['SAME', 'VALID'\]"):
        nj.AvgPool((2, 2), padding="CIRCULAR")


@pytest.mark.parametrize("kind", ["MaxPool", "AvgPool"])
@pytest.mark.parametrize("shape", [(2, 9, 3), (2, 8, 7, 3), (1, 4, 6, 5, 2)])
def test_int_window_takes_the_spatial_rank_of_the_input(torch, kind, shape):
    """``MaxPool(2)`` is Keras' MaxPoolingND(2) / torch's MaxPoolNd(2) for the input's N."""
    x = _rand(shape)
    nd = len(shape) - 2
    ref = getattr(torch.nn, f"{kind}{nd}d")(2)
    y = _run(getattr(nj, kind)(2), x)
    np.testing.assert_allclose(y, _torch_pool(torch, ref, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(nj.LayerError, match=r"an int window_shape applies to every axis"):
        getattr(nj, kind)(2).apply({}, {}, jnp.zeros((2, 3)))
