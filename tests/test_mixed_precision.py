"""bfloat16 training (trainer(compute_dtype=bfloat16)) against the same run in float32,
and the float32 accumulation of bfloat16 products (nnjax.layers.base)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
from nnjax.layers.base import accumulating_einsum, matmul_last, transposed_copy

STEPS = 200


def _curve(compute_dtype):
    cfg = nj.models.CausalLMConfig(
        vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, mlp_hidden=64
    )
    model = nj.models.CausalLM(cfg)
    text = np.random.default_rng(0).integers(0, 16, size=4000).astype(np.int32)
    text = (text + np.roll(text, 1)) % 64  # learnable: each token depends on the last
    rng = np.random.default_rng(1)
    starts = rng.integers(0, len(text) - 17, size=(STEPS // 10, 10, 8))
    ids = text[starts[..., None] + np.arange(17)]  # (calls, 10 steps, 8, 17)
    params, _ = model.init(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    tr = nj.trainer(
        model,
        nj.losses.softmax_cross_entropy,
        optax.adam(3e-3),
        steps_per_call=10,
        compute_dtype=compute_dtype,
    )
    ts, losses = tr.init(params), []
    for batch in ids:
        ts, m = tr.step(ts, (batch[..., :-1], batch[..., 1:]))
        losses.extend(np.asarray(m["loss"]))
    return np.array(losses)


def test_bfloat16_loss_curve_follows_float32_over_200_steps():
    """Stated tolerance: every step's bf16 loss within 5% of the float32 loss (measured:
    at most 2.9%, 0.093 on losses 4.2 -> 3.2); both fall by more than 15%."""
    f32, bf16 = _curve(None), _curve(jnp.bfloat16)
    assert f32[-10:].mean() < 0.85 * f32[:10].mean()
    assert bf16[-10:].mean() < 0.85 * bf16[:10].mean()
    np.testing.assert_allclose(bf16, f32, rtol=0.05)


def test_bfloat16_products_accumulate_in_float32():
    """A long bf16 dot product: float32 accumulation matches NumPy float64 on the same
    bf16-rounded operands to float32 rounding, the gradients too."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4096)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(4096, 5)), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    y = accumulating_einsum("nk,km->nm", x, w)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert matmul_last(x, w).dtype == jnp.bfloat16
    g = rng.normal(size=(3, 5))
    gx, gw = jax.grad(lambda x, w: jnp.sum(accumulating_einsum("nk,km->nm", x, w) * g), (0, 1))(
        x, w
    )
    g16 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(
        np.asarray(gx, np.float64), g16 @ np.asarray(w, np.float64).T, rtol=1e-2, atol=1e-2
    )
    np.testing.assert_allclose(
        np.asarray(gw, np.float64), np.asarray(x, np.float64).T @ g16, rtol=1e-2, atol=1e-2
    )
    np.testing.assert_array_equal(transposed_copy(x), np.asarray(x).T)


def test_bfloat16_bias_gradient_is_summed_in_float32():
    """A bf16 Dense over 4096 rows: the float32 bias' gradient is the NumPy float64 sum
    of the bf16 cotangent to float32 rounding (a bf16 sum is off by ~1e-2 relative);
    the forward is the bf16 sum of the bf16 product and the bias rounded to bf16."""
    rng = np.random.default_rng(0)
    layer = nj.Dense(8)
    x = jnp.asarray(rng.normal(size=(4, 1024, 16)), jnp.bfloat16)
    params, _ = layer.init(jax.random.key(0), x)
    params["bias"] = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(4, 1024, 8)) + 3.0, jnp.bfloat16)

    def loss(p):
        y, _ = layer.apply(p, {}, x)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))

    grad = jax.grad(loss)(params)["bias"]
    assert grad.dtype == jnp.float32
    ref = np.asarray(g, np.float64).reshape(-1, 8).sum(0)
    np.testing.assert_allclose(grad, ref, rtol=1e-6)
    y, _ = layer.apply(params, {}, x)
    plain = np.asarray(
        jnp.asarray(matmul_last(x, params["kernel"].astype(jnp.bfloat16))), np.float32
    )
    bias16 = np.asarray(jnp.asarray(params["bias"], jnp.bfloat16), np.float32)
    expect = np.asarray(jnp.asarray(plain + bias16, jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(y, np.float32), expect)


def test_bfloat16_mlp_activation_runs_in_float32_and_rounds_once():
    """A gated bf16 MLP (SwiGLU): ``silu(gate) * up`` is computed from the bf16 products
    in float32 (NumPy float64 here) and rounded to bf16 once, then projected; the
    plain GELU MLP likewise. The references use only the products (tested above)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.bfloat16)

    def bf16(a):
        return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)

    def silu(a):
        return a / (1.0 + np.exp(-a))

    def gelu(a):
        from math import erf, sqrt

        return 0.5 * a * (1.0 + np.vectorize(erf)(a / sqrt(2.0)))

    for gated, act, ref_act in [(True, jax.nn.silu, silu), (False, _exact_gelu, gelu)]:
        layer = nj.layers.MLP(24, gated=gated, activation=act, use_bias=False)
        params, _ = layer.init(jax.random.key(0), x)
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        y, _ = layer.apply(params, {}, x)
        first, out = ("gate", "down") if gated else ("fc", "proj")
        g = np.asarray(matmul_last(x, params[first]["kernel"]), np.float64)
        h = ref_act(g)
        if gated:
            h = h * np.asarray(matmul_last(x, params["up"]["kernel"]), np.float64)
        h16 = jnp.asarray(bf16(h), jnp.bfloat16)
        expect = np.asarray(matmul_last(h16, params[out]["kernel"]), np.float32)
        np.testing.assert_allclose(np.asarray(y, np.float32), expect, rtol=1e-2, atol=1e-2)
        # rounded once: within half a bf16 ulp (2**-8 relative) of the float64 reference
        h_lib = _hidden_of(params, x, first, gated)
        np.testing.assert_allclose(h_lib, h, rtol=2**-8 * 1.01, atol=1e-6)


def _exact_gelu(a):
    return jax.nn.gelu(a, approximate=False)


def _hidden_of(params, x, first, gated):
    """The MLP's bf16 hidden activation: the projection's input, read by running the
    layer with an identity projection."""
    d_hidden = params[first]["kernel"].shape[1]
    out = "down" if gated else "proj"
    eye = {**params, out: {"kernel": jnp.eye(d_hidden, dtype=jnp.bfloat16)}}
    wide = nj.layers.MLP(d_hidden, gated=gated, activation=_act_of(gated), use_bias=False)
    h, _ = wide.apply(eye, {}, x)
    return np.asarray(h, np.float64)


def _act_of(gated):
    return jax.nn.silu if gated else _exact_gelu


def test_stacked_params_are_cast_one_copy_at_a_time_with_float32_gradients():
    """``compute_dtype=bfloat16`` leaves the stacked blocks' params float32 and lets each
    block cast its copy inside the scan: the loss equals the model run on params all
    cast to bf16 up front (the same bf16 values), and the stacked kernels' float32
    gradients equal that run's to bf16 rounding."""
    from nnjax.training.step import forward_fn

    cfg = nj.models.CausalLMConfig(
        vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, mlp_hidden=64, num_layers=3
    )
    model = nj.models.CausalLM(cfg)
    ids = np.random.default_rng(2).integers(0, 64, size=(4, 17)).astype(np.int32)
    params, _ = model.init(jax.random.key(0), jnp.zeros((4, 16), jnp.int32))
    forward = forward_fn(model, jnp.bfloat16)

    def loss(p):
        out, _ = forward(p, {}, ids[:, :-1], None, True)
        return nj.losses.softmax_cross_entropy(out, ids[:, 1:])

    def loss_cast_up_front(p):
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
        out, _ = model.apply(p16, {}, ids[:, :-1], train=True)
        return nj.losses.softmax_cross_entropy(out.astype(jnp.float32), ids[:, 1:])

    (value, grads), (ref_value, ref_grads) = (
        jax.jit(jax.value_and_grad(f))(params) for f in (loss, loss_cast_up_front)
    )
    np.testing.assert_array_equal(value, ref_value)
    kernel = grads["blocks"]["stacked"]["mlp"]["down"]["kernel"]
    ref_kernel = ref_grads["blocks"]["stacked"]["mlp"]["down"]["kernel"]
    assert kernel.dtype == jnp.float32 and kernel.shape[0] == 3
    np.testing.assert_allclose(kernel, ref_kernel, rtol=2**-7, atol=1e-6)
