import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj
from nnjax.layers.embed import sinusoidal_table


def _rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _ids(shape, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


# --- Embedding -----------------------------------------------------------------------


def test_embedding_and_its_gradient_match_torch(torch):
    ids = _ids((3, 7), 5)  # 21 ids over 5 rows: repeats must accumulate in the gradient
    layer = nj.Embedding(5, 4)
    params, state = layer.init(jax.random.key(0), ids)
    w = _rand((3, 7, 4), 1)
    y, _ = layer.apply(params, state, ids)
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, state, ids)[0] * w))(params)

    ref = torch.nn.Embedding(5, 4)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["embedding"])))
    out = ref(torch.from_numpy(ids).long())
    (out * torch.from_numpy(w)).sum().backward()
    np.testing.assert_array_equal(y, out.detach().numpy())
    np.testing.assert_allclose(g["embedding"], ref.weight.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_embedding_shapes_dtype_and_default_init():
    layer = nj.Embedding(1000, 64)
    params, state = layer.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    assert jax.tree.map(jnp.shape, params) == {"embedding": (1000, 64)}
    # Flax's default: variance_scaling(1, fan_in, normal, out_axis=0) -> std 1/sqrt(features)
    np.testing.assert_allclose(float(jnp.std(params["embedding"])), 1 / 8, rtol=0.03)
    for shape in [(), (3,), (2, 3, 4)]:
        y, _ = layer.apply(params, state, jnp.ones(shape, jnp.int32))
        assert y.shape == (*shape, 64) and y.dtype == jnp.float32
    y16, _ = nj.Embedding(1000, 64, dtype=jnp.bfloat16).apply(params, state, jnp.arange(3))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y16, params["embedding"][:3].astype(jnp.bfloat16))


def test_embedding_errors():
    layer = nj.Embedding(10, 3)
    params, state = layer.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    with pytest.raises(
        nj.LayerError, match=r"expected integer ids, got x.dtype == float32 \(x.shape == \(2, 3\)\)"
    ):
        layer.apply(params, state, jnp.zeros((2, 3)))
    with pytest.raises(
        nj.LayerError,
        match=r"expected ids in \[0, 10\) \(num_embeddings == 10\), "
        r"got min\(x\) == -1, max\(x\) == 12 \(x.shape == \(3,\)\)",
    ):
        layer.apply(params, state, jnp.array([-1, 3, 12]))
    with pytest.raises(nj.LayerError, match=r"embed: expected ids in \[0, 10\).*max\(x\) == 10"):
        nj.serial(embed=layer).apply({"embed": params}, {}, np.array([[10]]))
    with pytest.raises(
        nj.LayerError, match=r"expected param 'embedding' with shape \(10, 3\), got \(10, 4\)"
    ):
        layer.apply({"embedding": jnp.zeros((10, 4))}, state, jnp.array([1]))


def test_embedding_out_of_range_under_jit_is_nan():
    layer = nj.Embedding(4, 2)
    params, state = layer.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
    y = jax.jit(lambda x: layer.apply(params, state, x)[0])(jnp.array([-1, 2, 4, -5]))
    assert np.isnan(np.asarray(y)[[0, 2, 3]]).all()  # neither wrapped (-1) nor clipped (4)
    np.testing.assert_array_equal(y[1], params["embedding"][2])


# --- attend and tied_embedding -------------------------------------------------------


def test_attend_matches_numpy_and_checks_width():
    table = _rand((9, 4))
    x = _rand((2, 3, 4), 1)
    logits = nj.attend({"embedding": jnp.asarray(table)}, x)
    np.testing.assert_allclose(
        logits, x.astype(np.float64) @ table.T.astype(np.float64), rtol=1e-5, atol=1e-5
    )
    assert logits.shape == (2, 3, 9)
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[-1\] == 4 \(embedding \(9, 4\)\), got x.shape == \(2, 5\)",
    ):
        nj.attend({"embedding": jnp.asarray(table)}, jnp.zeros((2, 5)))


def _tied_model(vocab=7, d=4):
    return nj.tied_embedding(nj.Embedding(vocab, d), nj.serial(nj.Dense(d), jnp.tanh))


def _by_hand(table, kernel, bias, ids):
    """The tied model written in plain JAX: embed, tanh(Dense), project with the table."""
    h = jnp.tanh(table[ids] @ kernel + jax.lax.broadcast_to_rank(bias, np.ndim(ids) + 1))
    return h @ table.T


def test_tied_embedding_matches_plain_jax_and_grads_from_both_uses():
    model = _tied_model()
    ids = _ids((2, 5), 7)
    params, state = model.init(jax.random.key(0), ids)
    assert jax.tree.map(jnp.shape, params) == {
        "embed": {"embedding": (7, 4)},
        "body": {"dense_0": {"bias": (4,), "kernel": (4, 4)}},
    }
    assert state == {}
    table, dense = params["embed"]["embedding"], params["body"]["dense_0"]
    w = _rand((2, 5, 7), 3)
    logits, _ = model.apply(params, state, ids)
    np.testing.assert_allclose(
        logits, _by_hand(table, dense["kernel"], dense["bias"], ids), rtol=1e-5, atol=1e-6
    )

    g = jax.grad(lambda p: jnp.sum(model.apply(p, state, ids)[0] * w))(params)

    def partial(stop_embed, stop_head):
        def f(t):
            t_in = jax.lax.stop_gradient(t) if stop_embed else t
            t_out = jax.lax.stop_gradient(t) if stop_head else t
            h = jnp.tanh(t_in[ids] @ dense["kernel"] + jax.lax.broadcast_to_rank(dense["bias"], 3))
            return jnp.sum((h @ t_out.T) * w)

        return jax.grad(f)(table)

    from_head, from_embed = partial(True, False), partial(False, True)
    assert float(jnp.abs(from_head).min()) > 0 and float(jnp.abs(from_embed).max()) > 0
    np.testing.assert_allclose(
        g["embed"]["embedding"], from_head + from_embed, rtol=1e-5, atol=1e-6
    )


def test_tied_embedding_grads_by_finite_differences():
    with jax.enable_x64(True):
        model = nj.tied_embedding(
            nj.Embedding(5, 3, param_dtype=jnp.float64),
            nj.serial(nj.Dense(3, param_dtype=jnp.float64), jnp.tanh),
        )
        ids = jnp.asarray(_ids((2, 3), 5))
        params, state = model.init(jax.random.key(0), ids)
        f = lambda p: model.apply(p, state, ids)[0]
        check_grads(f, (params,), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_tied_embedding_rng_and_state_plumbing():
    embed = nj.Embedding(6, 4)
    body = nj.serial(nj.BatchNorm(), nj.Dropout(0.5))
    model = nj.tied_embedding(embed, body)
    ids = _ids((3, 5), 6)
    params, state = model.init(jax.random.key(0), ids)
    assert jax.tree.map(jnp.shape, state) == {"body": {"batchnorm_0": {"mean": (4,), "var": (4,)}}}
    rng = jax.random.key(7)
    logits, new_state = model.apply(params, state, ids, rng=rng, train=True)
    # the same thing by hand: the body gets the second half of split(rng)
    h, _ = embed.apply(params["embed"], {}, ids)
    h, body_state = body.apply(
        params["body"], state["body"], h, rng=jax.random.split(rng)[1], train=True
    )
    np.testing.assert_allclose(logits, nj.attend(params["embed"], h), rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    np.testing.assert_allclose(
        new_state["body"]["batchnorm_0"]["mean"], body_state["batchnorm_0"]["mean"]
    )
    assert not np.allclose(new_state["body"]["batchnorm_0"]["mean"], 0.0)
    with pytest.raises(
        nj.LayerError, match=r"^body/dropout_0: Dropout\(rate=0.5\) in train mode needs an rng"
    ):
        model.apply(params, state, ids, train=True)


def test_tied_embedding_with_a_plain_callable_body_and_bad_width():
    model = nj.tied_embedding(nj.Embedding(6, 4), jnp.tanh)
    ids = _ids((5,), 6)
    params, state = model.init(jax.random.key(0), ids)
    assert list(params) == ["embed"]
    logits, _ = model.apply(params, state, ids)
    table = params["embed"]["embedding"]
    np.testing.assert_allclose(logits, jnp.tanh(table[ids]) @ table.T, rtol=1e-6, atol=1e-6)
    bad = nj.tied_embedding(nj.Embedding(6, 4), nj.Dense(3))
    with pytest.raises(
        nj.LayerError,
        match=r"^embed: expected x.shape\[-1\] == 4 \(embedding \(6, 4\)\), got x.shape == \(5, 3\)",
    ):
        bad.apply(*bad.init(jax.random.key(0), ids), ids)


# --- positional embeddings -----------------------------------------------------------


def _numpy_sinusoids(length, d, base=10000.0):
    """The Transformer paper's formula, element by element."""
    pe = np.zeros((length, d))
    for pos in range(length):
        for k in range(d):
            i = k // 2
            angle = pos / base ** (2 * i / d)
            pe[pos, k] = math.sin(angle) if k % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize(("length", "d"), [(50, 8), (7, 5)])
def test_sinusoidal_table_matches_numpy(length, d):
    np.testing.assert_allclose(sinusoidal_table(length, d), _numpy_sinusoids(length, d), atol=2e-5)


def test_sinusoidal_layer_adds_the_table():
    layer = nj.SinusoidalPositionalEmbedding()
    x = _rand((2, 6, 8))
    params, state = layer.init(jax.random.key(0), x)
    assert params == {} and state == {}
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, x + _numpy_sinusoids(6, 8), rtol=1e-5, atol=1e-5)
    y16, _ = layer.apply(params, state, jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    with pytest.raises(
        nj.LayerError,
        match=r"expected x with at least 2 axes \(\.\.\., T, d\), got x.shape == \(8,\)",
    ):
        layer.apply(params, state, jnp.zeros(8))


def test_learned_positional_embedding_adds_rows_and_checks_length():
    layer = nj.LearnedPositionalEmbedding(10)
    x = _rand((2, 6, 4))
    params, state = layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"embedding": (10, 4)}
    np.testing.assert_allclose(float(jnp.std(params["embedding"])), 0.02, rtol=0.3)
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, x + np.asarray(params["embedding"])[:6], rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, state, x)[0]))(params)["embedding"]
    np.testing.assert_array_equal(g, np.r_[np.full((6, 4), 2.0), np.zeros((4, 4))])  # batch of 2
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[-2\] <= max_length == 10, got x.shape == \(2, 11, 4\)",
    ):
        layer.apply(params, state, jnp.zeros((2, 11, 4)))


def test_concrete_out_of_range_ids_closed_over_by_a_trace_are_caught():
    layer = nj.Embedding(5, 3)
    params, state = layer.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    ids = jnp.array([1, 7])
    with pytest.raises(nj.LayerError, match=r"expected ids in \[0, 5\).*max\(x\) == 7"):
        jax.jit(lambda p: layer.apply(p, state, ids)[0])(params)
