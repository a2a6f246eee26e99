"""nnjax's native CPU kernel for products with few rows, against NumPy float64 products.

Where the machine has no C++ compiler the products fall back to XLA's operations (the
value tests still run); the tests that the kernel itself ran skip with the reason.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.kernels import native
from nnjax.kernels.small_matmul import (
    MIN_WEIGHTS,
    ROWS,
    TRANSPOSED_FLOAT32_ROWS,
    available,
    small_matmul,
    takes,
)

TARGET = 'custom_call_target="nnjax_small_matmul"'


def _needs_kernel():
    if not available():
        pytest.skip("the native kernel is not built here (no C++ compiler, or turned off)")


def _stored(rng, shape, kind):
    """``(stored weight, scale or None, float64 values it stands for)``."""
    w = rng.standard_normal(shape).astype(np.float32)
    if kind == "float32":
        return jnp.asarray(w), None, w.astype(np.float64)
    if kind == "bfloat16":
        b = jnp.asarray(w, jnp.bfloat16)
        return b, None, np.asarray(b.astype(jnp.float32), np.float64)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output channel
    q = np.round(w / scale).astype(np.int8)
    return jnp.asarray(q), jnp.asarray(scale), q.astype(np.float64) * scale.astype(np.float64)


def _assert_close(y, expected):
    """Float32 sums of K products: within 1e-5 of the largest magnitude (float64 reference)."""
    y = np.asarray(y, np.float64)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    "rows,k,n",
    [(1, 768, 2048), (3, 37, 50), (8, 64, 33), (13, 300, 517), (16, 17, 1000), (5, 512, 1000)],
)
def test_products_equal_numpy(kind, transposed, rows, k, n):
    # odd K and N cover the vector loops' tails; (5, 512, 1000) splits over threads
    rng = np.random.default_rng(rows * 1000 + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w, scale, values = _stored(rng, (k, n), kind)
    if transposed:
        w = w.T  # stored (N, K); an int8 scale stays per output
    y = jax.jit(small_matmul, static_argnames="transposed")(x, w, scale, transposed=transposed)
    _assert_close(y, x.astype(np.float64) @ values)


def test_the_kernel_runs_and_a_leading_batch_is_rows():
    _needs_kernel()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    w, scale, values = _stored(rng, (256, 300), "int8")
    f = jax.jit(small_matmul)
    assert TARGET in f.lower(x, w, scale).compile().as_text()
    _assert_close(f(x, w, scale), x.astype(np.float64) @ values)


def test_gradients_are_the_plain_products():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    w = rng.standard_normal((96, 80)).astype(np.float32)
    s = rng.uniform(0.5, 2, 80).astype(np.float32)
    dy = rng.standard_normal((4, 80))
    loss = lambda x, w, s: jnp.sum(small_matmul(x, w, s) * dy)
    dx, dw, ds = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, s)
    x64, w64, s64 = (a.astype(np.float64) for a in (x, w, s))
    _assert_close(dx, (dy * s64) @ w64.T)
    _assert_close(dw, x64.T @ (dy * s64))
    _assert_close(ds, np.sum(dy * (x64 @ w64), axis=0))
    # an int8 kernel has no gradient; its input and scale do
    q = jnp.asarray(np.round(w * 10).clip(-127, 127).astype(np.int8))
    dx8, ds8 = jax.grad(lambda x, s: jnp.sum(small_matmul(x, q, s) * dy), argnums=(0, 1))(x, s)
    q64 = np.asarray(q, np.float64)
    _assert_close(dx8, (dy * s64) @ q64.T)
    _assert_close(ds8, np.sum(dy * (x64 @ q64), axis=0))


def test_vmap_over_rows_and_over_weights():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    w = rng.standard_normal((3, 64, 40)).astype(np.float32)
    y = jax.vmap(small_matmul)(x, w)  # each copy its own weight (an expert stack)
    _assert_close(y, np.einsum("ebk,ekn->ebn", x.astype(np.float64), w.astype(np.float64)))
    y1 = jax.vmap(small_matmul, in_axes=(0, None))(x, w[0])
    _assert_close(y1, x.astype(np.float64) @ w[0].astype(np.float64))


def test_which_products_take_the_kernel():
    big = jnp.zeros((256, 256))
    assert MIN_WEIGHTS <= 256 * 256
    assert takes(jnp.zeros((ROWS, 256)), big) == (jax.default_backend() == "cpu")
    assert not takes(jnp.zeros((ROWS + 1, 256)), big)  # too many rows
    assert not takes(jnp.zeros((1, 8)), jnp.zeros((8, 8)))  # too few weights
    assert not takes(jnp.zeros((1, 256)), big.astype(jnp.float16))  # a dtype it does not read
    assert not takes(jnp.zeros((1, 256)), big.astype(jnp.int8))  # int8 without its scale
    assert not takes(jnp.zeros((1, 256), jnp.int32), big)  # integer input
    # a float32 table stored (N, K): XLA's product of that layout is as fast from 8 rows
    rows = TRANSPOSED_FLOAT32_ROWS
    assert takes(jnp.zeros((rows, 256)), big, transposed=True) == takes(jnp.zeros((1, 256)), big)
    assert not takes(jnp.zeros((rows + 1, 256)), big, transposed=True)
    assert takes(jnp.zeros((ROWS, 256)), big.astype(jnp.bfloat16), transposed=True) == (
        jax.default_backend() == "cpu"
    )


def test_dense_and_a_tied_head_take_it_with_their_values():
    _needs_kernel()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 256)).astype(np.float32)
    layer = nj.layers.Dense(300)
    params, _ = layer.init(jax.random.key(0), x)
    q = nj.finetune.quantize({"d": params}, bits=8)["d"]
    apply = jax.jit(lambda p, x: layer.apply(p, {}, x)[0])
    assert TARGET in apply.lower(q, x).compile().as_text()
    kernel = np.asarray(q["kernel"], np.float64) * np.asarray(q["kernel_scale"], np.float64)
    expected = x.astype(np.float64) @ kernel + np.asarray(params["bias"], np.float64)
    _assert_close(apply(q, x), expected)
    table, scale = nj.layers.quantized.quantize_rows(jnp.asarray(rng.standard_normal((400, 256))))
    head = {"embedding": table, "embedding_scale": scale}
    attend = jax.jit(nj.attend)
    assert TARGET in attend.lower(head, x).compile().as_text()
    rows = np.asarray(table, np.float64) * np.asarray(scale, np.float64)[:, None]
    _assert_close(attend(head, x), x.astype(np.float64) @ rows.T)


def test_a_bfloat16_compute_dtype_keeps_xla_s_product():
    # the kernel computes in float32; a bfloat16 layer keeps its own rounding
    x = jnp.zeros((1, 256), jnp.bfloat16)
    layer = nj.layers.Dense(300, dtype=jnp.bfloat16)
    params, _ = layer.init(jax.random.key(0), x)
    hlo = jax.jit(lambda p, x: layer.apply(p, {}, x)[0]).lower(params, x).compile().as_text()
    assert TARGET not in hlo


def test_a_build_is_kept_and_a_missing_compiler_is_named(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C++ compiler here")
    first = native.build("small_matmul", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build("small_matmul", tmp_path) == first  # found, not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(nj.BuildError, match="no-such-compiler"):
        native.build("small_matmul", tmp_path / "other")


def test_turned_off_or_unbuildable_the_product_is_xla_s_with_a_warning(tmp_path):
    script = (
        "import warnings, jax, jax.numpy as jnp, numpy as np\n"
        "from nnjax.kernels.small_matmul import small_matmul, available\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    x, w = jnp.ones((2, 256)), jnp.ones((256, 300))\n"
        "    hlo = jax.jit(small_matmul).lower(x, w).compile().as_text()\n"
        "    y = jax.jit(small_matmul)(x, w)\n"
        "print(available(), 'nnjax_small_matmul' in hlo, float(y[0, 0]),\n"
        "      [str(c.message) for c in caught])\n"
    )
    env = {**os.environ, "NNJAX_CACHE_DIR": str(tmp_path)}
    off = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "NNJAX_NATIVE_KERNELS": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert off.stdout.split() == ["False", "False", "256.0", "[]"]
    broken = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "CXX": "false"},  # a "compiler" that fails
        capture_output=True,
        text=True,
        check=True,
    )
    assert broken.stdout.startswith("False False 256.0 ")
    assert "the native kernel 'small_matmul' is unavailable" in broken.stdout
    assert "false could not build small_matmul.cc" in broken.stdout  # the cause, named


_TENSOR_PARALLEL_DECODE = """
import jax, jax.numpy as jnp, numpy as np
import nnjax as nj
from nnjax.kernels.small_matmul import available
cfg = nj.models.CausalLMConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4,
                               num_kv_heads=2, mlp_hidden=512)
model = nj.models.CausalLM(cfg)
prompt = np.random.default_rng(0).integers(1, 512, (2, 5)).astype(np.int32)
params, _ = model.init(jax.random.key(0), jnp.asarray(prompt))
one = np.asarray(nj.models.generate(cfg, params, prompt, 8, temperature=0))
mesh = nj.sharding.mesh({"model": 2})
rules = nj.sharding.tensor_parallel_rules(
    column=nj.sharding.GATED_COLUMN, row=nj.sharding.GATED_ROW, kv_heads=2)
sharded = nj.sharding.shard_params(params, mesh, rules)
two = np.asarray(nj.models.generate(cfg, sharded, prompt, 8, temperature=0))
print(available(), (one == two).all(), one[:, 5:].tolist())
"""


def test_tensor_parallel_decode_over_two_devices_gives_the_same_tokens():
    # the kernel's custom call inside a program partitioned over two devices (XLA
    # gathers its operands): the greedy tokens of the unsharded model
    from tests.test_train import _on_two_cpu_devices

    out = _on_two_cpu_devices(_TENSOR_PARALLEL_DECODE).split()
    assert out[1] == "True", out
