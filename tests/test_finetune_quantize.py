"""Quantized frozen kernels (int8, NF4) against NumPy references of the same schemes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import nnjax as nj
from nnjax import finetune as ft
from nnjax.models.gpt import GPT, GPTConfig
from nnjax.training.losses import mse
from nnjax.training.trainer import trainer

# QLoRA's NF4 code values (Dettmers et al. 2023, Appendix E), typed in here.
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


def _int8_reference(w, depth):
    """Symmetric absmax per output channel, per stacked copy, in NumPy float64."""
    w = np.asarray(w, np.float64)
    axes = tuple(range(depth, w.ndim - 1))
    scale = np.abs(w).max(axis=axes) / 127.0
    q = np.round(w / np.expand_dims(scale, axes)).astype(np.int8)
    return q, scale


def _nf4_reference(w, depth, block):
    """Row-major blocks per copy, absmax per block, nearest NF4 code, high nibble first."""
    w = np.asarray(w, np.float64)
    stack = w.shape[:depth]
    blocks = w.reshape(*stack, -1, block)
    scale = np.abs(blocks).max(axis=-1)
    codes = np.abs((blocks / scale[..., None])[..., None] - NF4).argmin(axis=-1)
    codes = codes.reshape(*w.shape[:-1], w.shape[-1] // 2, 2)
    return (codes[..., 0] * 16 + codes[..., 1]).astype(np.uint8), scale


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "blocks": {"stacked": {"fc": {"kernel": rng.normal(size=(2, 16, 8)).astype(np.float32)}}},
        "conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
        "head": {"kernel": rng.normal(size=(8, 6)).astype(np.float32), "bias": np.zeros(6)},
    }


def test_int8_matches_the_numpy_scheme_and_dequantizes():
    params = _params()
    q = ft.quantize(params, "**/kernel", bits=8)
    for path, depth in [("blocks/stacked/fc", 1), ("conv", 0), ("head", 0)]:
        node = nj.paths.flatten(q)
        w = nj.paths.flatten(params)[f"{path}/kernel"]
        ref_q, ref_s = _int8_reference(w, depth)
        assert node[f"{path}/kernel"].dtype == jnp.int8
        np.testing.assert_array_equal(node[f"{path}/kernel"], ref_q)
        np.testing.assert_allclose(node[f"{path}/kernel_scale"], ref_s, rtol=1e-6)
        back = nj.paths.flatten(ft.dequantize(q))[f"{path}/kernel"]
        expect = ref_q * np.expand_dims(ref_s, tuple(range(depth, w.ndim - 1)))
        np.testing.assert_allclose(back, expect, rtol=1e-6, atol=1e-7)
        # within half a step of the float kernel
        step = np.expand_dims(ref_s, tuple(range(depth, w.ndim - 1)))
        assert np.all(np.abs(back - w) <= 0.5 * step + 1e-6)
    assert "kernel_scale" not in ft.dequantize(q)["head"]
    np.testing.assert_array_equal(q["head"]["bias"], params["head"]["bias"])


def test_nf4_matches_the_numpy_scheme_and_dequantizes():
    params = _params()
    q = ft.quantize(params, ["blocks/**", "conv/kernel"], bits=4, block_size=16)
    flat = nj.paths.flatten(q)
    for path, depth in [("blocks/stacked/fc", 1), ("conv", 0)]:
        w = nj.paths.flatten(params)[f"{path}/kernel"]
        ref_q, ref_s = _nf4_reference(w, depth, 16)
        assert flat[f"{path}/kernel"].dtype == jnp.uint8
        assert flat[f"{path}/kernel"].shape == (*w.shape[:-1], w.shape[-1] // 2)
        assert flat[f"{path}/kernel_scale"].shape == (
            *w.shape[:depth],
            w[0].size // 16 if depth else w.size // 16,
        )
        np.testing.assert_array_equal(flat[f"{path}/kernel"], ref_q)
        np.testing.assert_allclose(flat[f"{path}/kernel_scale"], ref_s, rtol=1e-6)
        hi, lo = ref_q >> 4, ref_q & 15
        codes = np.stack([hi, lo], -1).reshape(w.shape)
        values = NF4[codes].reshape(*w.shape[:depth], -1, 16) * ref_s[..., None]
        back = nj.paths.flatten(ft.dequantize(q))[f"{path}/kernel"]
        np.testing.assert_allclose(back, values.reshape(w.shape), rtol=1e-6, atol=1e-7)
    assert flat["head/kernel"].dtype == np.float32  # not selected


def test_quantize_errors_name_the_argument_or_path():
    params = _params()
    with pytest.raises(nj.ArgumentError, match=r"quantize: bits must be 4 or 8, got 3"):
        ft.quantize(params, bits=3)
    with pytest.raises(nj.GlobError, match=r"'\*\*/qkv/kernel' matches no parameter path"):
        ft.quantize(params, "**/qkv/kernel")
    with pytest.raises(nj.GlobError, match=r"select no kernel"):
        ft.quantize(params, "head/bias")
    for bad in (0, 2.0, True, "64"):
        with pytest.raises(nj.ArgumentError, match=r"quantize: block_size: expected an int >= 1"):
            ft.quantize(params, "head/kernel", bits=4, block_size=bad)
    with pytest.raises(
        nj.GlobError,
        match=r"only some copies of the stacked kernel 'blocks/stacked/fc/kernel' \(1 of 2\)",
    ):
        ft.quantize(params, "blocks/1/**")
    with pytest.raises(nj.ArgumentError, match=r"quantize: 'head/kernel' is already quantized"):
        ft.quantize(ft.quantize(params, "head/kernel"), "head/kernel")


def _nf4_padded_reference(w, depth, block):
    """NF4 of any kernel in NumPy float64: per copy, n = ceil(size / block) blocks of
    ceil(size / n) row-major values, the last zero-padded; returns (codes in the kernel's
    shape, scales (*stack, n), the dequantized kernel)."""
    w = np.asarray(w, np.float64)
    stack, size = w.shape[:depth], int(np.prod(w.shape[depth:]))
    n = -(-size // block)
    length = -(-size // n)
    flat = np.zeros((*stack, n * length))
    flat[..., :size] = w.reshape(*stack, size)
    blocks = flat.reshape(*stack, n, length)
    scale = np.abs(blocks).max(axis=-1)
    codes = np.abs((blocks / scale[..., None])[..., None] - NF4).argmin(axis=-1)
    back = (NF4[codes] * scale[..., None]).reshape(*stack, n * length)[..., :size]
    codes = codes.reshape(*stack, n * length)[..., :size].reshape(w.shape)
    return codes, scale, back.reshape(w.shape)


def _unpack(kernel, out):
    k = np.asarray(kernel)
    return np.stack([k >> 4, k & 15], -1).reshape(*k.shape[:-1], -1)[..., :out]


@pytest.mark.parametrize(
    ("shape", "depth", "block"),
    [((32, 101), 0, 64), ((2, 9, 7), 1, 16), ((3, 3, 3, 5), 0, 64), ((2, 10, 6), 1, 64)],
)
def test_nf4_pads_the_last_block_and_odd_last_axes(shape, depth, block):
    """Sizes that do not divide into blocks and odd output axes (a head over an odd
    vocabulary) quantize, as bitsandbytes pads them; dequantize equals NumPy's."""
    w = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    path = "blocks/stacked/fc/kernel" if depth else "head/kernel"
    params = nj.paths.unflatten({path: w})
    glob = "blocks/**/kernel" if depth else path
    flat = nj.paths.flatten(ft.quantize(params, glob, bits=4, block_size=block))
    codes, scale, back = _nf4_padded_reference(w, depth, block)
    out = shape[-1]
    assert flat[path].shape == (*shape[:-1], -(-out // 2))
    np.testing.assert_array_equal(_unpack(flat[path], out), codes)
    np.testing.assert_allclose(
        np.asarray(flat[path.replace("kernel", "kernel_scale")]).reshape(scale.shape),
        scale,
        rtol=1e-6,
    )
    q = nj.paths.unflatten(flat)
    deq = nj.paths.flatten(ft.dequantize(q))[path]
    assert deq.shape == shape
    np.testing.assert_allclose(deq, back, rtol=1e-6, atol=1e-7)
    assert (
        nj.layers.adapters.kernel_shape(
            {"kernel": flat[path], "kernel_scale": flat[path.replace("kernel", "kernel_scale")]}
        )
        == shape
    )


def test_nf4_head_over_an_odd_vocabulary_runs_in_a_causal_lm():
    """``quantize(params, "**/kernel", bits=4)`` on a model with an untied head of an odd
    vocabulary (GPT-2's 50,257 in small): the quantized model computes with the
    dequantized kernels (a NumPy reference of each) and LoRA sits on the head."""
    cfg = nj.models.CausalLMConfig(
        vocab_size=101, hidden_size=32, num_heads=4, mlp_hidden=64, num_layers=2,
        tie_embeddings=False,
    )  # fmt: skip
    model = nj.models.CausalLM(cfg)
    ids = jnp.array([[1, 5, 100, 7]])
    params, _ = model.init(jax.random.key(0), ids)
    q = ft.quantize(params, "**/kernel", bits=4)
    flat, qflat = nj.paths.flatten(params), nj.paths.flatten(q)
    assert qflat["lm_head/kernel"].shape == (32, 51)
    reference = {}
    for path, w in flat.items():
        if path.endswith("/kernel"):
            depth = path.split("/").count("stacked")
            reference[path] = _nf4_padded_reference(w, depth, 64)[2].astype(np.float32)
        else:
            reference[path] = w
    want, _ = model.apply(nj.paths.unflatten(reference), {}, ids)
    got, _ = model.apply(q, {}, ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    lora, _ = ft.add_lora(q, jax.random.key(1), "lm_head/kernel", rank=2)
    assert lora["lm_head"]["lora_b"].shape == (2, 101)
    assert model.apply(lora, {}, ids)[0].shape == (1, 4, 101)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_path(bits, bad):
    params = _params()
    params["head"]["kernel"][5, 3] = bad
    with pytest.raises(
        nj.ArgumentError,
        match=rf"quantize: 'head/kernel' holds 1 non-finite value\(s\), the first {bad} at \[5, 3\]",
    ):
        ft.quantize(params, "**/kernel", bits=bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("big", [1e38, 3e38, -2e38])
def test_huge_finite_weights_round_trip(bits, big):
    """A block (NF4) or column (int8) whose largest magnitude is near float32's top
    dequantizes to the NumPy float64 reference (before: NF4 gave all zeros)."""
    w = np.random.default_rng(4).normal(size=(16, 8)).astype(np.float32)
    w[2, 1] = big
    q = ft.quantize({"d": {"kernel": w}}, "d/kernel", bits=bits, block_size=16)
    back = np.asarray(ft.dequantize(q)["d"]["kernel"], np.float64)
    if bits == 8:
        ref_q, ref_s = _int8_reference(w, 0)
        want = ref_q * np.expand_dims(ref_s, 0)
    else:
        want = _nf4_padded_reference(w, 0, 16)[2]
    np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-7)
    assert back[2, 1] == pytest.approx(float(np.float32(big)), rel=1e-6)


CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=64)


@pytest.mark.parametrize(("bits", "tol"), [(8, 0.02), (4, 0.25)])
def test_quantized_gpt_logits_stay_close_to_the_float_model(bits, tol):
    """int8 keeps logits within 2% of their range, NF4 within 25% (Dense = attention and MLP)."""
    model = GPT(CFG)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 16)), jnp.int32)
    params, state = jax.jit(model.init)(jax.random.key(0), ids)
    q = ft.quantize(params, "blocks/**/kernel", bits=bits, block_size=64)
    assert nj.paths.flatten(q)["blocks/stacked/attn/query/kernel"].dtype == (
        jnp.int8 if bits == 8 else jnp.uint8
    )
    y = np.asarray(jax.jit(model.apply)(params, state, ids)[0])
    yq = np.asarray(jax.jit(model.apply)(q, state, ids)[0])
    err = np.abs(yq - y).max() / np.ptp(y)
    assert 0 < err < tol, err
    # the quantized model computes with exactly the dequantized kernels
    yd = np.asarray(jax.jit(model.apply)(ft.dequantize(q), state, ids)[0])
    np.testing.assert_allclose(yq, yd, rtol=1e-5, atol=1e-5)


def _mlp():
    model = nj.serial(nj.Dense(32), jnp.tanh, head=nj.Dense(4))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    y = rng.normal(size=(8, 4)).astype(np.float32)
    params, state = model.init(jax.random.key(0), x)
    return model, params, state, x, y


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_quantized_base_trains_and_the_base_stays_bit_identical(bits):
    model, params, state, x, y = _mlp()
    q = ft.quantize(params, "**/kernel", bits=bits, block_size=16)
    p2, m = ft.add_lora(q, jax.random.key(1), "**/kernel", rank=2)
    tr = trainer(model, mse, optax.adam(1e-2), trainable=m)
    ts = tr.init(p2, state)
    # no optimizer state for the frozen (quantized) leaves: Adam's mu and nu are the adapters'
    lora_bytes = nj.param_bytes(ft.adapter_params(p2))
    assert nj.param_bytes(ts.opt_state) == 2 * lora_bytes + 4
    losses = []
    for _ in range(5):
        ts, met = tr.step(ts, (x, y))
        losses.append(float(met["loss"]))
    assert losses[-1] < losses[0]
    for path, old in nj.paths.flatten(p2).items():
        new = nj.paths.flatten(ts.params)[path]
        if "lora" not in path:
            assert new.dtype == old.dtype and np.array_equal(new, old), path


def test_the_trainer_refuses_a_mask_that_trains_a_quantized_leaf():
    model, params, state, _, _ = _mlp()
    q = ft.quantize(params, "dense_0/kernel", bits=8)
    msg = r"trains quantized \(frozen\) leaves \['dense_0/kernel', 'dense_0/kernel_scale'\]"
    with pytest.raises(nj.MaskError, match=msg):
        trainer(model, mse, optax.adam(1e-2)).init(q, state)
    with pytest.raises(
        nj.MaskError, match=r"trains quantized \(frozen\) leaves \['dense_0/kernel_scale'\]"
    ):
        m = ft.mask(q, "dense_0/kernel_scale")
        trainer(model, mse, optax.adam(1e-2), trainable=m).init(q, state)
    ts = trainer(model, mse, optax.adam(1e-2), trainable=ft.mask(q, "head/**")).init(q, state)
    assert ts.params["dense_0"]["kernel"].dtype == jnp.int8


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_adapter_gradients_on_a_quantized_kernel_by_finite_differences(bits, adapter):
    model, params, state, x, y = _mlp()
    q = ft.quantize(params, "dense_0/kernel", bits=bits, block_size=16)
    add = ft.add_lora if adapter == "lora" else ft.add_dora
    p2, _ = add(q, jax.random.key(1), "dense_0/kernel", rank=2)
    names = [n for n in ("lora_a", "lora_b", "dora_magnitude") if n in p2["dense_0"]]
    rng = np.random.default_rng(3)
    start = {
        n: p2["dense_0"][n] + 0.1 * rng.normal(size=p2["dense_0"][n].shape).astype(np.float32)
        for n in names
    }

    def loss(adapters):
        p = {**p2, "dense_0": {**p2["dense_0"], **adapters}}
        return mse(model.apply(p, state, x)[0], y)

    check_grads(loss, (start,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-3)


def test_memory_report_of_qlora_beside_full_fine_tuning_matches_closed_forms():
    model, params, state, x, y = _mlp()  # Dense(16 -> 32), Dense(32 -> 4)
    q = ft.quantize(params, "**/kernel", bits=4, block_size=16)
    qlora, m = ft.add_lora(q, jax.random.key(1), "**/kernel", rank=2)
    costs = {}
    for name, p, mk in [("full", params, None), ("qlora", qlora, m)]:
        tr = trainer(model, mse, optax.adam(1e-3), trainable=mk)
        costs[name] = ft.step_cost(tr.step, tr.init(p, state), (x, y), trainable=mk)
    f32, adam_count = 4, 4  # Adam keeps mu and nu per trainable leaf and an int32 count
    n_full = 16 * 32 + 32 + 32 * 4 + 4
    full = costs["full"]
    assert (full.frozen_bytes, full.gradient_bytes) == (0, n_full * f32)
    assert full.opt_state_bytes == 2 * n_full * f32 + adam_count
    qc = costs["qlora"]
    packed = (16 * 32 + 32 * 4) // 2  # two 4-bit codes per byte
    scales = (16 * 32 + 32 * 4) // 16 * f32  # one float32 absmax per 16-value block
    biases = (32 + 4) * f32
    lora = (16 * 2 + 2 * 32 + 32 * 2 + 2 * 4) * f32
    assert qc.frozen_bytes == packed + scales + biases
    assert qc.gradient_bytes == lora
    assert qc.opt_state_bytes == 2 * lora + adam_count
    assert full.temp_bytes > 0 and qc.temp_bytes > 0
    text = ft.memory_table(costs)
    assert text.splitlines()[2].split() == ["frozen", "weights", "0", "B", "624", "B"]
    assert [line.split()[0] for line in text.splitlines()[2:]] == [
        "frozen",
        "trainable",
        "optimizer",
        "temporaries",
        "peak",
    ]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(3, 6, 9), (2, 3, 4, 5)])  # odd outputs; 1 or 2 stacked axes
def test_streamed_quantize_is_bit_identical_to_one_shot(bits, shape):
    """quantize goes copy by copy along the stacked axes; the leaves equal the one-shot
    nnjax.layers.quantized.quantize of the whole stack bit for bit."""
    from nnjax.core.paths import STACKED
    from nnjax.layers import quantized

    kernel = jax.random.normal(jax.random.key(3), shape) * 2.0
    depth = len(shape) - 2
    tree = {"blocks": {STACKED: {"dense": {"kernel": kernel}}}}
    if depth == 2:
        tree = {"blocks": {STACKED: {"inner": {STACKED: {"dense": {"kernel": kernel}}}}}}
    leaf = jax.tree.leaves(ft.quantize(tree, "**/kernel", bits=bits, block_size=8))
    want_q, want_scale = quantized.quantize(kernel, bits, depth=depth, block_size=8)
    np.testing.assert_array_equal(leaf[0], want_q)
    np.testing.assert_array_equal(leaf[1], want_scale)
    assert leaf[0].dtype == want_q.dtype and leaf[1].dtype == want_scale.dtype
