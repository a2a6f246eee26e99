"""SimpleRNN, LSTM, GRU, Bidirectional against torch.nn.RNN/LSTM/GRU with copied weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj

B, T, C, H = 3, 6, 4, 5
LENGTHS = np.array([6, 2, 4])  # unsorted, one full-length, one short
KINDS = ["rnn", "lstm", "gru"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _x(shape=(B, T, C), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _torch_module(torch, kind, bidirectional=False):
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    return cls(C, H, batch_first=True, bidirectional=bidirectional)


def _layer(kind, **kw):
    return {"rnn": nj.SimpleRNN, "lstm": nj.LSTM, "gru": nj.GRU}[kind](H, **kw)


def _params_from_torch(mod, kind, suffix=""):
    """PyTorch's weights as nnjax params: a transpose; biases summed except the GRU's."""
    get = lambda name: getattr(mod, f"{name}_l0{suffix}").detach().numpy()
    params = {"kernel": get("weight_ih").T, "recurrent_kernel": get("weight_hh").T}
    if kind == "gru":
        params |= {"bias": get("bias_ih"), "recurrent_bias": get("bias_hh")}
    else:
        params["bias"] = get("bias_ih") + get("bias_hh")
    return jax.tree.map(jnp.asarray, params)


def _carry(kind, h, c=None):
    return (h, c) if kind == "lstm" else h


def _assert_carry(kind, ours, h_ref, c_ref=None):
    if kind == "lstm":
        np.testing.assert_allclose(ours[0], h_ref, **TOL)
        np.testing.assert_allclose(ours[1], c_ref, **TOL)
    else:
        np.testing.assert_allclose(ours, h_ref, **TOL)


def _torch_run(torch, mod, kind, x, h0=None, c0=None, lengths=None):
    """(outputs (B, T, D*H) with zeros at padding, h_n, c_n or None) from PyTorch."""
    xt = torch.from_numpy(x)
    if lengths is not None:
        xt = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
        )
    state = None
    if h0 is not None:
        state = (
            (torch.from_numpy(h0), torch.from_numpy(c0)) if kind == "lstm" else torch.from_numpy(h0)
        )
    with torch.no_grad():
        out, hn = mod(xt, state)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    h, c = hn if kind == "lstm" else (hn, None)
    return out.numpy(), h.numpy(), None if c is None else c.numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "given_state"])
def test_matches_torch(torch, kind, given_state):
    mod = _torch_module(torch, kind)
    x = _x()
    rng = np.random.default_rng(1)
    h0, c0 = (rng.normal(size=(1, B, H)).astype(np.float32) for _ in range(2))
    out_ref, h_ref, c_ref = _torch_run(
        torch, mod, kind, x, *((h0, c0) if given_state else (None, None))
    )
    layer = _layer(kind, return_state=True)
    params = _params_from_torch(mod, kind)
    inputs = {"inputs": x, "initial_carry": _carry(kind, h0[0], c0[0])} if given_state else x
    (y, carry), _ = layer.apply(params, {}, inputs)
    np.testing.assert_allclose(y, out_ref, **TOL)
    _assert_carry(kind, carry, h_ref[0], None if c_ref is None else c_ref[0])


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_matches_torch(torch, kind):
    mod = _torch_module(torch, kind, bidirectional=True)
    x = _x()
    rng = np.random.default_rng(2)
    h0, c0 = (rng.normal(size=(2, B, H)).astype(np.float32) for _ in range(2))
    out_ref, h_ref, c_ref = _torch_run(torch, mod, kind, x, h0, c0)
    layer = nj.Bidirectional(_layer(kind, return_state=True))
    params = {
        "forward": _params_from_torch(mod, kind),
        "backward": _params_from_torch(mod, kind, "_reverse"),
    }
    carry0 = {"forward": _carry(kind, h0[0], c0[0]), "backward": _carry(kind, h0[1], c0[1])}
    (y, carry), _ = layer.apply(params, {}, {"inputs": x, "initial_carry": carry0})
    np.testing.assert_allclose(y, out_ref, **TOL)
    for d, direction in enumerate(["forward", "backward"]):
        _assert_carry(kind, carry[direction], h_ref[d], None if c_ref is None else c_ref[d])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padded_batch_matches_pack_padded_sequence(torch, kind, bidirectional):
    mod = _torch_module(torch, kind, bidirectional=bidirectional)
    x = _x()
    out_ref, h_ref, c_ref = _torch_run(torch, mod, kind, x, lengths=LENGTHS)
    inputs = {"inputs": x, "lengths": jnp.asarray(LENGTHS)}
    if bidirectional:
        layer = nj.Bidirectional(_layer(kind, return_state=True))
        params = {
            "forward": _params_from_torch(mod, kind),
            "backward": _params_from_torch(mod, kind, "_reverse"),
        }
        (y, carry), _ = layer.apply(params, {}, inputs)
        carries = [carry["forward"], carry["backward"]]
    else:
        layer = _layer(kind, return_state=True)
        (y, carry), _ = layer.apply(_params_from_torch(mod, kind), {}, inputs)
        carries = [carry]
    np.testing.assert_allclose(y, out_ref, **TOL)
    assert float(jnp.abs(y[1, 2:]).max()) == 0.0  # outputs are zeros past the length
    for d, ours in enumerate(carries):
        _assert_carry(kind, ours, h_ref[d], None if c_ref is None else c_ref[d])


@pytest.mark.parametrize(
    "make",
    [
        lambda: nj.LSTM(H, return_state=True),
        lambda: nj.Bidirectional(nj.GRU(H, return_state=True)),
        lambda: nj.LSTM(H, return_sequences=False),
        lambda: nj.Bidirectional(nj.SimpleRNN(H, return_sequences=False), merge="sum"),
    ],
    ids=["lstm", "bi_gru", "lstm_last", "bi_rnn_last"],
)
def test_padded_batch_equals_each_sequence_alone(make):
    layer, x = make(), _x()
    params, state = layer.init(jax.random.key(0), x)
    y_batch, _ = jax.jit(layer.apply)(params, state, {"inputs": x, "lengths": LENGTHS})
    for b, n in enumerate(LENGTHS):
        y_alone, _ = jax.jit(layer.apply)(params, state, x[b : b + 1, :n])
        for ours, alone in zip(jax.tree.leaves(y_batch), jax.tree.leaves(y_alone), strict=True):
            if ours.ndim == 3:  # a sequence: the valid prefix matches, zeros after it
                np.testing.assert_allclose(ours[b, :n], alone[0], **TOL)
                assert float(jnp.abs(ours[b, n:]).max(initial=0.0)) == 0.0
            else:
                np.testing.assert_allclose(ours[b], alone[0], **TOL)


def test_leading_batch_axes_fold_into_one():
    layer = nj.Bidirectional(nj.LSTM(H, return_state=True))
    x = _x((2, 3, T, C))
    lengths = np.array([[6, 1, 3], [2, 5, 6]])
    params, state = layer.init(jax.random.key(0), x)
    apply = jax.jit(layer.apply)
    y4, _ = apply(params, state, {"inputs": x, "lengths": lengths})
    y3, _ = apply(params, state, {"inputs": x.reshape(6, T, C), "lengths": lengths.ravel()})
    for a, b in zip(jax.tree.leaves(y4), jax.tree.leaves(y3), strict=True):
        np.testing.assert_allclose(a.reshape(b.shape), b, **TOL)


def test_bidirectional_merge_modes_agree_with_concat():
    x = _x()
    fwd_bwd = nj.Bidirectional(nj.GRU(H), merge=None)
    params, state = fwd_bwd.init(jax.random.key(0), x)
    (f, b), _ = fwd_bwd.apply(params, state, x)
    cat, _ = nj.Bidirectional(nj.GRU(H)).apply(params, state, x)
    np.testing.assert_array_equal(cat, jnp.concatenate([f, b], -1))
    for merge, expected in [("sum", f + b), ("mul", f * b), ("mean", (f + b) / 2)]:
        y, _ = nj.Bidirectional(nj.GRU(H), merge=merge).apply(params, state, x)
        np.testing.assert_allclose(y, expected, **TOL)


def test_init_names_shapes_and_initialisers():
    params, state = nj.LSTM(H).init(jax.random.key(0), jnp.zeros((B, T, C)))
    assert state == {}
    assert jax.tree.map(jnp.shape, params) == {
        "kernel": (C, 4 * H),
        "recurrent_kernel": (H, 4 * H),
        "bias": (4 * H,),
    }
    # forget gate bias 1, the rest 0 (gate order i, f, g, o)
    np.testing.assert_array_equal(params["bias"], np.repeat([0.0, 1.0, 0.0, 0.0], H))
    # each gate's recurrent block is orthogonal
    for block in jnp.split(params["recurrent_kernel"], 4, axis=-1):
        np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)
    gru, _ = nj.GRU(H, use_bias=False).init(jax.random.key(0), jnp.zeros((T, C)))
    assert sorted(gru) == ["kernel", "recurrent_kernel"]


def test_input_projection_is_hoisted_out_of_the_scan():
    layer = nj.LSTM(H)
    x = jnp.zeros((B, T, C))
    params, state = layer.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda p, x: layer.apply(p, state, x)[0])(params, x).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    inner = [e for e in scan.params["jaxpr"].jaxpr.eqns if e.primitive.name == "dot_general"]
    outer = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(inner) == 1  # h @ recurrent_kernel only
    # one matmul for every step, on the (B * T, C) view of x (matmul_last)
    assert [tuple(e.outvars[0].aval.shape) for e in outer] == [(B * T, 4 * H)]


def test_lstm_grads_by_finite_differences():
    with jax.enable_x64(True):
        layer = nj.LSTM(2, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, 3, 2), jnp.float64)
        params, state = layer.init(jax.random.key(0), x)
        lengths = jnp.array([3, 2])
        f = jax.jit(lambda p, x: layer.apply(p, state, {"inputs": x, "lengths": lengths})[0])
        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


def test_dtype_and_carry_follow_compute_dtype():
    layer = nj.LSTM(H, return_state=True, dtype=jnp.bfloat16)
    x = _x()
    params, state = layer.init(jax.random.key(0), x)
    assert params["kernel"].dtype == jnp.float32
    (y, (h, c)), _ = layer.apply(
        params, state, {"inputs": x, "initial_carry": (np.zeros((B, H)),) * 2}
    )
    assert y.dtype == h.dtype == c.dtype == jnp.bfloat16
    (y32, _), _ = nj.LSTM(H, return_state=True).apply(params, state, x)
    np.testing.assert_allclose(y.astype(jnp.float32), y32, atol=3e-2)


def _lstm():
    layer = nj.LSTM(H)
    return layer, *layer.init(jax.random.key(0), jnp.zeros((B, T, C)))


def test_error_wrong_rank():
    layer, params, state = _lstm()
    with pytest.raises(
        nj.LayerError,
        match=r"expected x with at least 2 axes \(\.\.\., T, C\), got x.shape == \(4,\)",
    ):
        layer.apply(params, state, jnp.zeros((C,)))


def test_error_wrong_feature_size():
    layer, params, state = _lstm()
    with pytest.raises(
        nj.LayerError,
        match=r"expected x.shape\[-1\] == 4 \(kernel \(4, 20\)\), got x.shape == \(3, 6, 7\)",
    ):
        layer.apply(params, state, jnp.zeros((B, T, 7)))


def test_error_params_of_another_size():
    _, params, state = _lstm()
    with pytest.raises(
        nj.LayerError, match=r"expected param 'kernel' with shape \(4, 24\), got \(4, 20\)"
    ):
        nj.LSTM(6).apply(params, state, jnp.zeros((B, T, C)))


def test_error_in_bidirectional_names_the_direction():
    layer = nj.serial(bi=nj.Bidirectional(nj.GRU(H)))
    params, state = layer.init(jax.random.key(0), jnp.zeros((B, T, C)))
    with pytest.raises(
        nj.LayerError,
        match=r"^bi/forward: expected x.shape\[-1\] == 4 \(kernel \(4, 15\)\), got x.shape == \(3, 6, 2\)$",
    ):
        layer.apply(params, state, jnp.zeros((B, T, 2)))


def test_error_lengths_shape():
    layer, params, state = _lstm()
    with pytest.raises(
        nj.LayerError,
        match=r'expected lengths.shape == \(3,\) \(x\["inputs"\].shape\[:-2\]\), '
        r'got lengths.shape == \(2,\) with x\["inputs"\].shape == \(3, 6, 4\)',
    ):
        layer.apply(params, state, {"inputs": jnp.zeros((B, T, C)), "lengths": jnp.array([1, 2])})
    with pytest.raises(
        nj.LayerError, match=r"expected integer lengths, got lengths.dtype == float32"
    ):
        layer.apply(params, state, {"inputs": jnp.zeros((B, T, C)), "lengths": jnp.ones(B)})


def test_error_initial_carry_and_input_keys():
    layer, params, state = _lstm()
    x = jnp.zeros((B, T, C))
    with pytest.raises(
        nj.LayerError,
        match=r"expected initial_carry \(h, c\) with h.shape == c.shape == \(3, 5\) .*"
        r"got \(h.shape, c.shape\) == \(\(3, 5\), \(3, 4\)\)",
    ):
        layer.apply(
            params, state, {"inputs": x, "initial_carry": (jnp.zeros((B, H)), jnp.zeros((B, 4)))}
        )
    gru = nj.GRU(H)
    p, s = gru.init(jax.random.key(0), x)
    with pytest.raises(
        nj.LayerError,
        match=r"expected initial_carry.shape == \(3, 5\) .* got initial_carry.shape == \(5,\)",
    ):
        gru.apply(p, s, {"inputs": x, "initial_carry": jnp.zeros(H)})
    with pytest.raises(
        nj.LayerError,
        match=r'expected an array or a padded batch \{"inputs": x, "lengths": lengths\}, got a '
        r"dict with keys \['x'\]",
    ):
        layer.apply(params, state, {"x": x})
    with pytest.raises(nj.LayerError, match=r"unexpected input key\(s\) \['mask'\]"):
        layer.apply(params, state, {"inputs": x, "mask": x})


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"lstm: features must be >= 1, got 0"):
        nj.LSTM(0)
    with pytest.raises(ValueError, match=r"Bidirectional: merge must be one of .*, got 'max'"):
        nj.Bidirectional(nj.LSTM(2), merge="max")
