"""A padded batch of token ids through serial(Embedding, LSTM, Dense): PyTorch's packed sequences
with copied weights are the reference; the form trains with fit, and wrong forms are LayerErrors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj

V, E, H, K = 20, 4, 5, 3
IDS = np.array([[3, 7, 1, 9, 4, 2], [5, 8, 0, 0, 0, 0], [2, 2, 6, 11, 0, 0]], np.int32)
LENGTHS = np.array([6, 2, 4], np.int32)


def _model():
    return nj.serial(nj.Embedding(V, E), nj.LSTM(H, return_sequences=False), nj.Dense(K))


def test_embedding_then_lstm_matches_pytorch_packed_sequences(torch):
    model = _model()
    x = {"inputs": IDS, "lengths": LENGTHS}
    params, state = model.init(jax.random.key(0), x)
    emb = torch.nn.Embedding(V, E)
    lstm = torch.nn.LSTM(E, H, batch_first=True)
    head = torch.nn.Linear(H, K)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor(np.asarray(params["embedding_0"]["embedding"])))
        p = params["lstm_0"]
        lstm.weight_ih_l0.copy_(torch.tensor(np.asarray(p["kernel"]).T.copy()))
        lstm.weight_hh_l0.copy_(torch.tensor(np.asarray(p["recurrent_kernel"]).T.copy()))
        lstm.bias_ih_l0.copy_(torch.tensor(np.asarray(p["bias"])))
        lstm.bias_hh_l0.zero_()
        head.weight.copy_(torch.tensor(np.asarray(params["dense_0"]["kernel"]).T.copy()))
        head.bias.copy_(torch.tensor(np.asarray(params["dense_0"]["bias"])))
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            emb(torch.tensor(IDS)), torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = lstm(packed)
        want = head(h[0]).numpy()
    got, _ = jax.jit(model.apply)(params, state, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the padding ids do not matter: other ids after each end give the same logits
    other = np.where(np.arange(6)[None] < LENGTHS[:, None], IDS, 13)
    again, _ = model.apply(params, state, {"inputs": other, "lengths": LENGTHS})
    np.testing.assert_allclose(again, got, rtol=1e-6, atol=1e-6)


def test_embedding_hands_the_lengths_on():
    layer = nj.Embedding(V, E)
    params, _ = layer.init(jax.random.key(0), {"inputs": IDS, "lengths": LENGTHS})
    y, _ = layer.apply(params, {}, {"inputs": IDS, "lengths": LENGTHS})
    assert sorted(y) == ["inputs", "lengths"] and y["lengths"] is LENGTHS
    np.testing.assert_array_equal(y["inputs"], np.asarray(params["embedding"])[IDS])


def test_padded_batches_train_with_fit_and_predict():
    rng = np.random.default_rng(0)
    n, t = 64, 8
    lengths = rng.integers(1, t + 1, size=n).astype(np.int32)
    ids = np.where(np.arange(t)[None] < lengths[:, None], rng.integers(1, V, (n, t)), 0)
    y = (lengths > t // 2).astype(np.int32)  # learnable only from the lengths
    x = {"inputs": ids.astype(np.int32), "lengths": lengths}
    model = nj.serial(nj.Embedding(V, E), nj.LSTM(H, return_sequences=False), nj.Dense(2))
    params, state = model.init(jax.random.key(0), x)
    tr = nj.trainer(model, "sparse_categorical_crossentropy", "adam", metrics=["accuracy"])
    ts, history = nj.fit(tr, tr.init(params, state), (x, y), batch_size=16, epochs=3,
                         progress=False)  # fmt: skip
    assert len(history["loss"]) == 12 and np.isfinite(history["loss"]).all()
    logits = nj.predict(tr, ts, x, batch_size=16)
    want, _ = model.apply(ts.params, ts.state, x)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def _copy_lstm(torch, mod, layer_index, p):
    get = lambda name: getattr(mod, f"{name}_l{layer_index}")
    get("weight_ih").copy_(torch.tensor(np.asarray(p["kernel"]).T.copy()))
    get("weight_hh").copy_(torch.tensor(np.asarray(p["recurrent_kernel"]).T.copy()))
    get("bias_ih").copy_(torch.tensor(np.asarray(p["bias"])))
    get("bias_hh").zero_()


def test_keep_lengths_stacks_recurrent_layers_as_pytorch_num_layers_2(torch):
    model = nj.serial(
        nj.Embedding(V, E), nj.keep_lengths(nj.LSTM(H)), nj.LSTM(H, return_sequences=False)
    )
    x = {"inputs": IDS, "lengths": LENGTHS}
    params, state = model.init(jax.random.key(0), x)
    assert sorted(params) == ["embedding_0", "lstm_0", "lstm_1"]  # paths unchanged
    emb, lstm = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H, num_layers=2, batch_first=True)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor(np.asarray(params["embedding_0"]["embedding"])))
        _copy_lstm(torch, lstm, 0, params["lstm_0"])
        _copy_lstm(torch, lstm, 1, params["lstm_1"])
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            emb(torch.tensor(IDS)), torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = lstm(packed)
    got, _ = jax.jit(model.apply)(params, state, x)
    np.testing.assert_allclose(got, h[1].numpy(), rtol=1e-5, atol=1e-5)
    unwrapped = nj.serial(nj.Embedding(V, E), nj.LSTM(H), nj.LSTM(H, return_sequences=False))
    wrong, _ = unwrapped.apply(params, state, x)  # without it the padding is read as input
    assert not np.allclose(wrong, got, atol=1e-3)
    with pytest.raises(nj.LayerError, match=r"lstm_0: keep_lengths: expected the layer to return"):
        nj.serial(nj.Embedding(V, E), nj.keep_lengths(nj.LSTM(H, return_sequences=False))).init(
            jax.random.key(0), x
        )


def test_wrong_forms_say_what_to_write():
    model = _model()
    with pytest.raises(
        nj.LayerError,
        match=r'embedding_0: expected an array or a padded batch \{"inputs": x, "lengths": '
        r"lengths\}, got a dict with keys \['ids', 'lengths'\]",
    ):
        model.init(jax.random.key(0), {"ids": IDS, "lengths": LENGTHS})
    with pytest.raises(nj.LayerError, match=r"embedding_0: unexpected input key\(s\) \['mask'\]"):
        model.init(jax.random.key(0), {"inputs": IDS, "mask": IDS > 0})
    dense_first = nj.serial(nj.Embedding(V, E), nj.Dense(K))
    with pytest.raises(
        nj.LayerError,
        match=r"dense_0: expected an array x, got a dict with keys \['inputs', 'lengths'\]\. A "
        r"padded batch .* goes first into Embedding, .* recurrent layer \(LSTM",
    ):
        dense_first.init(jax.random.key(0), {"inputs": IDS, "lengths": LENGTHS})
    params, _ = nj.LSTM(H).init(jax.random.key(0), jnp.zeros((3, 6, E)))
    with pytest.raises(nj.LayerError, match=r"expected lengths.shape == \(3,\)"):
        nj.LSTM(H).apply(params, {}, {"inputs": jnp.zeros((3, 6, E)), "lengths": LENGTHS[:2]})
