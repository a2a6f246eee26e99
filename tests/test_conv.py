"""Conv and ConvTranspose against PyTorch with the same weights, and by finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj

pytestmark = pytest.mark.torch


def _rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _init(layer, x, seed=1):
    """Params of the shapes ``layer.init`` plans, filled from a seeded NumPy normal.

    Skips compiling the truncated-normal initialiser for every kernel shape (most of
    this file's run time otherwise); biases come out nonzero, so they are checked too.
    """
    rng = np.random.default_rng(seed)
    params, state = jax.eval_shape(
        layer.init, jax.random.key(0), jax.ShapeDtypeStruct(np.shape(x), jnp.float32)
    )
    fill = lambda s: jnp.asarray(
        rng.normal(size=s.shape).astype(s.dtype) / np.sqrt(max(np.prod(s.shape[:-1]), 1))
    )
    return jax.tree.map(fill, params), state


def _run(layer, params, x):
    """``layer.apply`` under one jit: one compile instead of one per op (faster tests)."""
    return jax.jit(lambda p, x: layer.apply(p, {}, x)[0])(params, x)


def _to_torch(torch, x):  # (N, *spatial, C) -> (N, C, *spatial)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _from_torch(t):  # (N, C, *spatial) -> (N, *spatial, C)
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _torch_pad(torch, t, pads, value=0.0):
    """Explicit (lo, hi) pads on the spatial axes of an (N, C, *spatial) tensor."""
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    return torch.nn.functional.pad(t, flat, value=value)


def _same_pads(spatial, ks, strides, dilation):
    """TensorFlow/XLA SAME: out = ceil(n / s), the odd cell of padding at the end."""
    pads = []
    for n, k, s, d in zip(spatial, ks, strides, dilation, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _torch_conv(
    torch, params, x, *, strides, dilation, groups, pads, torch_padding=0, mode="zeros"
):
    """torch.nn.Conv{1,2,3}d with the nnjax kernel (*k, in/g, out) copied as (out, in/g, *k)."""
    kernel = np.asarray(params["kernel"])
    nd = kernel.ndim - 2
    ref = getattr(torch.nn, f"Conv{nd}d")(
        x.shape[-1],
        kernel.shape[-1],
        kernel.shape[:nd],
        stride=strides,
        padding=torch_padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
    )
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(np.transpose(kernel, (nd + 1, nd, *range(nd))))))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        return _from_torch(ref(_torch_pad(torch, _to_torch(torch, x), pads)))


CONV_CASES = {
    # name: (x shape, features, kernel_size, kwargs)
    "1d_same": ((2, 9, 3), 4, 3, {}),
    "1d_stride_dilation_valid": (
        (2, 17, 3),
        5,
        3,
        dict(strides=2, kernel_dilation=2, padding="VALID"),
    ),
    "2d_same": ((2, 7, 8, 3), 4, (3, 3), {}),
    "2d_same_strided": ((2, 8, 9, 3), 4, (3, 2), dict(strides=(2, 3))),
    "2d_valid_dilated": ((1, 9, 10, 2), 3, (3, 3), dict(padding="VALID", kernel_dilation=(1, 2))),
    "2d_int_padding": ((2, 6, 6, 3), 4, (3, 3), dict(padding=1, strides=2)),
    "2d_explicit_padding": ((2, 6, 7, 3), 4, (3, 3), dict(padding=((2, 0), (1, 3)))),
    # more than im2col.MAX_IN_CHANNELS inputs: lax's convolution on CPU too
    "2d_many_channels": ((2, 6, 7, 9), 4, (3, 3), dict(strides=(1, 2))),
    "1d_many_channels_valid": ((2, 11, 8), 3, 4, dict(padding="VALID", kernel_dilation=2)),
    "2d_grouped": ((2, 6, 6, 4), 6, (3, 3), dict(feature_group_count=2, strides=2)),
    "2d_depthwise": ((2, 6, 6, 4), 8, (3, 3), dict(feature_group_count=4)),
    "3d_same": ((1, 5, 6, 4, 2), 3, (3, 3, 2), {}),
    "3d_explicit_strided": (
        (2, 6, 5, 4, 3),
        4,
        (2, 3, 2),
        dict(strides=(1, 2, 2), padding=((1, 0), (1, 1), (0, 2))),
    ),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_torch(torch, case):
    shape, features, kernel_size, kw = CONV_CASES[case]
    x = _rand(shape)
    layer = nj.Conv(features, kernel_size, **kw)
    params, _ = _init(layer, x)
    nd = len(shape) - 2
    ks = params["kernel"].shape[:nd]
    strides = kw.get("strides", 1)
    strides = (strides,) * nd if isinstance(strides, int) else strides
    dilation = kw.get("kernel_dilation", 1)
    dilation = (dilation,) * nd if isinstance(dilation, int) else dilation
    padding = kw.get("padding", "SAME")
    torch_padding = 0
    if padding == "SAME" and set(strides) == {1}:
        pads, torch_padding = [(0, 0)] * nd, "same"  # PyTorch's own 'same' (stride 1 only)
    elif padding == "SAME":
        pads = _same_pads(shape[1:-1], ks, strides, dilation)
    elif padding == "VALID":
        pads = [(0, 0)] * nd
    elif isinstance(padding, int):
        pads, torch_padding = [(0, 0)] * nd, padding
    else:
        pads = padding
    expected = _torch_conv(
        torch,
        params,
        x,
        strides=strides,
        dilation=dilation,
        groups=kw.get("feature_group_count", 1),
        pads=pads,
        torch_padding=torch_padding,
    )
    y = _run(layer, params, x)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_conv_circular_matches_torch_circular(torch):
    x = _rand((2, 6, 7, 3))
    layer = nj.Conv(4, (3, 5), padding="CIRCULAR")
    params, _ = _init(layer, x)
    expected = _torch_conv(
        torch,
        params,
        x,
        strides=1,
        dilation=1,
        groups=1,
        pads=[],
        torch_padding=(1, 2),
        mode="circular",
    )
    y = _run(layer, params, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,strides", [("VALID", 1), ("SAME", (2, 1))])
def test_conv_input_dilation_is_conv_of_zero_stuffed_input(torch, padding, strides):
    x = _rand((2, 4, 5, 3))
    layer = nj.Conv(4, (2, 3), padding=padding, strides=strides, input_dilation=(2, 3))
    params, _ = _init(layer, x)
    stuffed = np.zeros((2, 7, 13, 3), np.float32)
    stuffed[:, ::2, ::3] = x
    strides = (strides,) * 2 if isinstance(strides, int) else strides
    pads = _same_pads((7, 13), (2, 3), strides, (1, 1)) if padding == "SAME" else [(0, 0)] * 2
    expected = _torch_conv(torch, params, stuffed, strides=strides, dilation=1, groups=1, pads=pads)
    y = _run(layer, params, x)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_conv_takes_several_batch_axes():
    x = _rand((2, 3, 6, 6, 2))
    layer = nj.Conv(4, (3, 3), strides=2)
    params, state = _init(layer, x)
    y = _run(layer, params, x)
    flat, _ = layer.apply(params, state, x.reshape(6, 6, 6, 2))
    assert y.shape == (2, 3, 3, 3, 4)
    np.testing.assert_array_equal(y, np.asarray(flat).reshape(2, 3, 3, 3, 4))


def test_conv_lora_adds_low_rank_kernel(torch):
    x = _rand((2, 6, 6, 4))
    layer = nj.Conv(6, (3, 3), feature_group_count=2)
    params, state = _init(layer, x)
    a, b = _rand((3 * 3 * 2, 2), 1), _rand((2, 6), 2)
    y, _ = layer.apply({**params, "lora_a": a, "lora_b": b}, state, x)
    merged = {**params, "kernel": params["kernel"] + (a @ b).reshape(3, 3, 2, 6)}
    expected = _torch_conv(
        torch, merged, x, strides=1, dilation=1, groups=2, pads=[], torch_padding="same"
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        nj.LayerError,
        match=r"expected adapter param 'lora_a' \(in, r\) with shape \(18, 2\) beside kernel "
        r"\(in, out\) == \(18, 6\) and r == 2 \(from lora_a\), got \(9, 2\)",
    ):
        layer.apply({**params, "lora_a": a[:9], "lora_b": b}, state, x)


@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3"])
def test_finetune_adapters_reach_conv_and_merge_to_a_torch_conv(torch, adapter):
    """add_* targets a Conv kernel; after training-like changes, the adapted model equals
    torch's Conv2d with the merged kernel (and nnjax's merged model)."""
    x = _rand((2, 6, 6, 3))
    model = nj.serial(conv=nj.Conv(4, (3, 3)))
    params, state = _init(model, x)
    if adapter == "ia3":
        p2, m = nj.finetune.add_ia3(params, "conv/kernel")
    else:
        add = nj.finetune.add_lora if adapter == "lora" else nj.finetune.add_dora
        p2, m = add(params, jax.random.key(1), "conv/kernel", rank=2)
    assert (
        nj.finetune.trainable_count(p2, m)
        == {"lora": 27 * 2 + 2 * 4, "dora": 27 * 2 + 2 * 4 + 4, "ia3": 4}[adapter]
    )
    np.testing.assert_allclose(
        model.apply(p2, state, x)[0], model.apply(params, state, x)[0], rtol=1e-5, atol=1e-5
    )
    flat = nj.paths.flatten(p2)
    for path in flat:
        if path.rpartition("/")[2] in ("lora_a", "lora_b", "ia3_scale", "dora_magnitude"):
            flat[path] = flat[path] + 0.3 * _rand(flat[path].shape, len(path))
    p2 = nj.paths.unflatten(flat)
    y = np.asarray(model.apply(p2, state, x)[0])
    merged = nj.finetune.merge_adapters(p2)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    expected = _torch_conv(
        torch, merged["conv"], x, strides=1, dilation=1, groups=1, pads=[], torch_padding="same"
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    # the merged kernel is the closed form of the adapter on the (27, 4) matrix view
    c = {k: np.asarray(v, np.float64) for k, v in p2["conv"].items()}
    w = c["kernel"].reshape(27, 4)
    if adapter != "ia3":
        w = w + c["lora_a"] @ c["lora_b"]
    if adapter == "dora":
        w = w * c["dora_magnitude"] / np.linalg.norm(w, axis=0)
    if adapter == "ia3":
        w = w * c["ia3_scale"]
    np.testing.assert_allclose(
        merged["conv"]["kernel"], w.reshape(3, 3, 3, 4), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(y, model.apply(params, state, x)[0], atol=1e-3)


def test_conv_without_bias_and_init_shapes():
    layer = nj.Conv(5, (2, 3), use_bias=False, feature_group_count=1)
    params, state = jax.eval_shape(
        layer.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)
    )
    assert jax.tree.map(jnp.shape, params) == {"kernel": (2, 3, 3, 5)}
    assert state == {}
    p, _ = nj.Conv(8, (3, 3), feature_group_count=4).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 4))
    )
    assert p["kernel"].shape == (3, 3, 1, 8)


def test_conv_dtype_rules():
    layer = nj.Conv(3, (3, 3), dtype=jnp.bfloat16)
    params, state = _init(layer, jnp.zeros((1, 4, 4, 2)))
    assert params["kernel"].dtype == jnp.float32
    y, _ = layer.apply(params, state, jnp.ones((1, 4, 4, 2)))
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kw",
    [
        dict(strides=2, feature_group_count=2),
        dict(padding="VALID", kernel_dilation=2, input_dilation=2),
        dict(strides=(2, 1), padding=((1, 0), (0, 2))),  # im2col on CPU
        dict(padding="VALID", kernel_dilation=(2, 1)),  # im2col on CPU
    ],
)
def test_conv_grads_by_finite_differences(kw):
    layer = nj.Conv(4, (3, 2), **kw)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 2))
    params, state = _init(layer, x)
    f = jax.jit(lambda p, x: layer.apply(p, state, x)[0])
    check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_conv_transpose_grads_by_finite_differences():
    layer = nj.ConvTranspose(3, (3, 2), strides=(2, 1))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 2))
    params, state = _init(layer, x)
    f = jax.jit(lambda p, x: layer.apply(p, state, x)[0])
    check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def _torch_conv_transpose(torch, params, x, *, strides, dilation, padding, output_padding):
    """torch.nn.ConvTranspose{1,2}d with the nnjax kernel (*k, in, out) flipped to (in, out, *k)."""
    kernel = np.asarray(params["kernel"])
    nd = kernel.ndim - 2
    ref = getattr(torch.nn, f"ConvTranspose{nd}d")(
        kernel.shape[-2],
        kernel.shape[-1],
        kernel.shape[:nd],
        stride=strides,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
    )
    flipped = np.flip(kernel, axis=tuple(range(nd)))  # lax.conv_transpose does not flip; torch does
    with torch.no_grad():
        ref.weight.copy_(
            torch.from_numpy(np.ascontiguousarray(np.transpose(flipped, (nd, nd + 1, *range(nd)))))
        )
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        return _from_torch(ref(_to_torch(torch, x)))


TRANSPOSE_CASES = {
    # name: (x shape, kernel_size, strides, dilation, torch padding, torch output_padding)
    "1d": ((2, 5, 3), (3,), (2,), (1,), (0,), (0,)),
    "1d_padded": ((2, 5, 3), (4,), (3,), (1,), (1,), (2,)),
    "2d": ((2, 4, 5, 3), (3, 2), (2, 3), (1, 1), (0, 0), (0, 0)),
    "2d_padded_dilated": ((1, 4, 4, 2), (3, 3), (2, 1), (1, 2), (1, 2), (1, 0)),
}


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_conv_transpose_explicit_padding_matches_torch(torch, case):
    """torch (padding p, output_padding q) is nnjax's (lo, hi) = (k - 1 - p, k - 1 - p + q)."""
    shape, ks, strides, dilation, p, q = TRANSPOSE_CASES[case]
    x = _rand(shape)
    k_eff = [(k - 1) * d + 1 for k, d in zip(ks, dilation, strict=True)]
    pads = tuple((k - 1 - p_, k - 1 - p_ + q_) for k, p_, q_ in zip(k_eff, p, q, strict=True))
    layer = nj.ConvTranspose(4, ks, strides=strides, kernel_dilation=dilation, padding=pads)
    params, _ = _init(layer, x)
    expected = _torch_conv_transpose(
        torch, params, x, strides=strides, dilation=dilation, padding=p, output_padding=q
    )
    y = _run(layer, params, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ks,strides", [((3, 2), (2, 3)), ((2, 2), (2, 2)), ((1, 4), (3, 2))])
def test_conv_transpose_valid_matches_torch(torch, ks, strides):
    """VALID is torch's padding 0, with output_padding max(stride - k, 0)."""
    x = _rand((2, 4, 3, 3))
    layer = nj.ConvTranspose(4, ks, strides=strides, padding="VALID")
    params, _ = _init(layer, x)
    q = tuple(max(s - k, 0) for k, s in zip(ks, strides, strict=True))
    expected = _torch_conv_transpose(
        torch, params, x, strides=strides, dilation=1, padding=0, output_padding=q
    )
    y = _run(layer, params, x)
    assert y.shape == (
        2,
        4 * strides[0] + max(ks[0] - strides[0], 0),
        3 * strides[1] + max(ks[1] - strides[1], 0),
        4,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ks,strides", [((3, 3), (2, 2)), ((4, 1), (2, 3)), ((2, 5), (1, 1))])
def test_conv_transpose_same_is_input_times_stride(torch, ks, strides):
    """SAME gives in * stride: torch's full output (padding 0) cropped as XLA pads.

    XLA pads the dilated input by (k - 1, s - 1) if s > k - 1, else ceil((k + s - 2) / 2)
    before and the rest after; torch's padding 0 is (k - 1, k - 1), so crop the difference.
    """
    x = _rand((2, 4, 3, 3))
    layer = nj.ConvTranspose(4, ks, strides=strides)
    params, _ = _init(layer, x)
    full = _torch_conv_transpose(
        torch,
        {**params, "bias": np.zeros(4, np.float32)},
        x,
        strides=strides,
        dilation=1,
        padding=0,
        output_padding=0,
    )
    for axis, (k, s) in enumerate(zip(ks, strides, strict=True), start=1):
        lo = k - 1 if s > k - 1 else math.ceil((k + s - 2) / 2)
        hi = k + s - 2 - lo
        # (k - 1 - lo) cells to crop before, (k - 1 - hi) after; negative: zeros to add
        full = np.moveaxis(
            np.moveaxis(full, axis, 0)[max(k - 1 - lo, 0) : full.shape[axis] - max(k - 1 - hi, 0)],
            0,
            axis,
        )
        grow = [(0, 0)] * full.ndim
        grow[axis] = (max(lo - k + 1, 0), max(hi - k + 1, 0))
        full = np.pad(full, grow)
    expected = full + np.asarray(params["bias"])
    y = _run(layer, params, x)
    assert y.shape == (2, 4 * strides[0], 3 * strides[1], 4)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_kernel_shape_and_batch_axes():
    layer = nj.ConvTranspose(5, (3,), strides=2)
    x = _rand((2, 3, 4, 2))  # 1D (the tuple says so): (2, 3) batch axes, length 4
    params, state = _init(layer, x)
    assert jax.tree.map(jnp.shape, params) == {"bias": (5,), "kernel": (3, 2, 5)}
    y = _run(layer, params, x)
    flat, _ = layer.apply(params, state, x.reshape(6, 4, 2))
    assert y.shape == (2, 3, 8, 5)
    np.testing.assert_array_equal(y, np.asarray(flat).reshape(2, 3, 8, 5))


def test_conv_error_messages():
    layer = nj.Conv(16, (3, 3))
    params, state = _init(layer, jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(
        nj.LayerError,
        match=r"^expected x.shape\[-1\] == 3 \(kernel \(3, 3, 3, 16\)\), got x.shape == \(2, 8, 8, 4\)$",
    ):
        layer.apply(params, state, jnp.zeros((2, 8, 8, 4)))
    with pytest.raises(
        nj.LayerError,
        match=r"^expected x with at least 4 axes \(N, H, W, C\), got x.shape == \(8, 8, 3\)$",
    ):
        layer.apply(params, state, jnp.zeros((8, 8, 3)))
    with pytest.raises(nj.LayerError, match=r"expected x with at least 5 axes \(N, D, H, W, C\)"):
        nj.Conv(4, (3, 3, 3)).init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(
        nj.LayerError,
        match=r"^expected x.shape\[-1\] divisible by feature_group_count == 2, got x.shape == \(1, 4, 4, 5\)$",
    ):
        nj.Conv(4, (3, 3), feature_group_count=2).init(jax.random.key(0), jnp.zeros((1, 4, 4, 5)))
    grouped = nj.Conv(4, (3, 3), feature_group_count=2)
    gp, _ = _init(grouped, jnp.zeros((1, 4, 4, 4)))
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[-1\] == 4 \(kernel \(3, 3, 2, 4\) with feature_group_count == 2\), "
        r"got x.shape == \(1, 4, 4, 6\)",
    ):
        grouped.apply(gp, {}, jnp.zeros((1, 4, 4, 6)))
    with pytest.raises(
        nj.LayerError,
        match=r"expected param 'kernel' with shape \(3, 3, in, 16\), got \(3, 3, 3, 8\)",
    ):
        layer.apply({**params, "kernel": params["kernel"][..., :8]}, state, jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(nj.LayerError, match=r"^conv_0: expected x.shape\[-1\] == 3"):
        model = nj.serial(layer)
        mp, ms = _init(model, jnp.zeros((2, 8, 8, 3)))
        model.apply(mp, ms, jnp.zeros((2, 8, 8, 4)))
    ct = nj.ConvTranspose(4, (2, 2))
    cp, _ = _init(ct, jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(
        nj.LayerError, match=r"expected x.shape\[-1\] == 3 \(kernel \(2, 2, 3, 4\)\)"
    ):
        ct.apply(cp, {}, jnp.zeros((1, 4, 4, 2)))


def test_conv_constructor_errors():
    with pytest.raises(
        ValueError,
        match=r"Conv: features \(6\) must be a positive multiple of feature_group_count \(4\)",
    ):
        nj.Conv(6, (3, 3), feature_group_count=4)
    with pytest.raises(
        ValueError, match=r"Conv: padding must be one of \['SAME', 'VALID', 'CIRCULAR'\]"
    ):
        nj.Conv(6, (3, 3), padding="FULL")
    with pytest.raises(
        ValueError,
        match=r"Conv: the per-axis settings disagree on the number of spatial axes: "
        r"\{'kernel_size': 2, 'strides': 3\}",
    ):
        nj.Conv(6, (3, 3), strides=(1, 2, 3))
    with pytest.raises(
        ValueError, match=r"Conv: padding must be a string, an int or 2 \(lo, hi\) int pairs"
    ):
        nj.Conv(6, (3, 3), padding=((1, 1, 1), (1, 1)))
    with pytest.raises(
        ValueError, match=r"Conv: strides must be a positive int or 1 positive ints, got 0"
    ):
        nj.Conv(6, 3, strides=0)
    with pytest.raises(
        ValueError, match=r"ConvTranspose: padding must be one of \['SAME', 'VALID'\]"
    ):
        nj.ConvTranspose(6, (3, 3), padding="CIRCULAR")
    with pytest.raises(ValueError, match=r"Conv: per-axis settings must not be empty"):
        nj.Conv(6, ())


def test_valid_conv_on_input_smaller_than_kernel_is_an_error():
    conv = nj.Conv(4, (5, 5), padding="VALID")
    params, state = conv.init(jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
    with pytest.raises(
        nj.LayerError, match=r"expected spatial size >= the dilated kernel \(5, 5\)"
    ):
        conv.apply(params, state, jnp.zeros((1, 3, 3, 1)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the im2col choice is CPU-only")
@pytest.mark.parametrize("channels, expect_conv_op", [(1, False), (6, False), (7, True)])
def test_cpu_picks_im2col_for_few_input_channels(channels, expect_conv_op):
    layer = nj.Conv(5, (3, 3))
    x = jnp.ones((2, 8, 8, channels))
    params, state = _init(layer, x)

    def loss(p, x):
        return jnp.sum(layer.apply(p, state, x)[0] ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    assert ("convolution(" in hlo) is expect_conv_op


@pytest.mark.parametrize(
    ("shape", "torch_cls"),
    [((2, 9, 3), "Conv1d"), ((2, 8, 7, 1), "Conv2d"), ((1, 4, 5, 6, 2), "Conv3d")],
)
def test_int_kernel_size_takes_the_spatial_rank_of_the_input(torch, shape, torch_cls):
    """``Conv(5, 3, strides=2)`` is what Keras' ConvND(5, 3, strides=2) / torch's ConvNd are."""
    x = _rand(shape)
    nd = len(shape) - 2
    layer = nj.Conv(5, 3, strides=2, padding="VALID")
    params, _ = _init(layer, x)
    assert params["kernel"].shape == (*(3,) * nd, shape[-1], 5)
    ref = getattr(torch.nn, torch_cls)(shape[-1], 5, 3, stride=2)
    with torch.no_grad():
        k = np.asarray(params["kernel"])
        ref.weight.copy_(torch.from_numpy(np.array(np.transpose(k, (nd + 1, nd, *range(nd))))))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        expected = _from_torch(ref(_to_torch(torch, x)))
    np.testing.assert_allclose(_run(layer, params, x), expected, rtol=1e-5, atol=1e-5)
    # ConvTranspose infers the same way
    p_t, _ = _init(nj.ConvTranspose(5, 3), x)
    assert p_t["kernel"].shape == (*(3,) * nd, shape[-1], 5)


def test_int_kernel_size_on_input_without_spatial_axes_is_an_error():
    with pytest.raises(
        nj.LayerError,
        match=r"expected x \(N, \*spatial, C\) with at least one spatial axis, got x.shape == "
        r"\(2, 3\); an int kernel_size applies to every axis between the batch axis and the "
        r"channels \(give a tuple for several batch axes\)",
    ):
        nj.Conv(4, 3).init(jax.random.key(0), jnp.zeros((2, 3)))
