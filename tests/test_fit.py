"""nj.fit: the loop against a hand-written loop, exact resumption, divergence, Ctrl-C, callbacks."""

import functools
import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
import nnjax.checkpoint as ckpt
import nnjax.data as nd
from nnjax.training.fit import TrainingDiverged, early_stopping, fit
from nnjax.training.losses import softmax_cross_entropy
from nnjax.training.metrics import accuracy
from nnjax.training.trainer import trainer

N, D, C = 48, 5, 3


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D, C))).argmax(-1).astype(np.int32)
    return x, y


# Dropout makes every step depend on its rng, so a resume with the wrong key shows.
MODEL = nj.serial(nj.Dense(16), jax.nn.relu, nj.Dropout(0.25), nj.Dense(C))


@functools.cache  # one trainer (one compile) per configuration for the whole file
def _setup(lr=1e-2, check_finite=False):
    opt = optax.adam(lr)
    tr = trainer(MODEL, softmax_cross_entropy, opt, metrics=[accuracy], check_finite=check_finite)
    params, state = MODEL.init(jax.random.key(0), jnp.zeros((1, D)))
    return tr, (params, state)


def _fresh(tr, init):
    return tr.init(*init)  # copies: the same init seeds every run


def test_losses_match_a_hand_written_loop():
    tr, init = _setup()
    x, y = _data()
    data = nd.batches((x, y), 8, seed=1, epochs=2)
    _, history = fit(tr, _fresh(tr, init), data, log_every=5, progress=False)
    ts, rng, want = _fresh(tr, init), jax.random.key(0), []
    for s, batch in enumerate(nd.batches((x, y), 8, seed=1, epochs=2)):
        ts, m = tr.step(ts, batch, jax.random.fold_in(rng, s))
        want.append(float(m["loss"]))
    assert len(history["loss"]) == 12
    assert history["loss"] == want
    # log points at 5, 10 and the end; each the mean of its window
    assert [e["step"] for e in history["train"]] == [5, 10, 12]
    np.testing.assert_allclose(history["train"][0]["loss"], np.mean(want[:5]), rtol=1e-6)
    np.testing.assert_allclose(history["train"][2]["loss"], np.mean(want[10:]), rtol=1e-6)
    assert 0.0 <= history["train"][2]["accuracy"] <= 1.0
    # no prefetch, a plain list: the same losses
    batches = list(nd.batches((x, y), 8, seed=1, epochs=2))
    _, h2 = fit(tr, _fresh(tr, init), batches, prefetch=0, progress=False)
    h3 = fit(
        tr,
        _fresh(tr, init),
        lambda e: nd.batches((x, y), 8, seed=1).at(6 * e, epochs=e + 1),
        epochs=2,
        progress=False,
    )[1]
    assert h2["loss"] == want and h3["loss"] == want


def test_metrics_fetched_only_at_log_points(monkeypatch):
    tr, init = _setup()
    x, y = _data()
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda t: calls.append(1) or real(t))
    fit(tr, _fresh(tr, init), nd.batches((x, y), 4, epochs=1), log_every=4, progress=False)
    assert len(calls) == 3  # 12 steps, log_every=4: one fetch per log point, none per step


def test_eval_is_weighted_by_batch_size():
    tr, init = _setup(lr=0.0)  # params stay at init: the reference is a closed form
    x, y = _data()
    xv, yv = _data(13, seed=1)
    eval_batches = [(xv[:10], yv[:10]), (xv[10:], yv[10:])]  # sizes 10 and 3
    _, history = fit(
        tr,
        _fresh(tr, init),
        nd.batches((x, y), 8),
        eval_data=eval_batches,
        eval_every=3,
        progress=False,
    )
    assert [e["step"] for e in history["eval"]] == [3, 6]
    params = jax.tree.map(np.float64, init[0])
    h = np.maximum(xv @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0)
    logits = h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want_loss = -logp[np.arange(13), yv].mean()
    want_acc = (logits.argmax(-1) == yv).mean()
    np.testing.assert_allclose(history["eval"][-1]["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(history["eval"][-1]["accuracy"], want_acc, rtol=1e-6)
    # an endless batches() iterator as eval_data: one full pass (5 + 5 + 3) per evaluation
    eval_iter = nd.batches((xv, yv), 5, shuffle=False, drop_remainder=False, epochs=None)
    _, h2 = fit(tr, _fresh(tr, init), nd.batches((x, y), 8), eval_data=eval_iter, progress=False)
    np.testing.assert_allclose(h2["eval"][-1]["loss"], want_loss, rtol=1e-5)


@pytest.mark.parametrize("how", ["raise", "stop", "ctrl_c"])
def test_resume_gives_identical_losses(tmp_path, how):
    tr, init = _setup()
    x, y = _data()
    make = lambda: nd.batches((x, y), 8, seed=3, epochs=None)
    _, full = fit(tr, _fresh(tr, init), make(), steps=14, log_every=1, progress=False)

    def interrupt(step, ts, logs):
        if step == 9:
            if how == "raise":
                raise RuntimeError("crash at step 9")
            if how == "ctrl_c":
                raise KeyboardInterrupt
            return True
        return False

    run = dict(steps=14, log_every=1, progress=False, checkpoint_dir=tmp_path, checkpoint_every=4)
    error = {"raise": RuntimeError, "ctrl_c": KeyboardInterrupt, "stop": None}[how]
    if error is None:
        _, partial = fit(tr, _fresh(tr, init), make(), callbacks=[interrupt], **run)
        assert len(partial["loss"]) == 9
    else:
        with pytest.raises(error):
            fit(tr, _fresh(tr, init), make(), callbacks=[interrupt], **run)
    resumed_from = {"raise": 8, "stop": 9, "ctrl_c": 9}[how]  # a crash loses the steps since 8
    assert ckpt.latest(tmp_path).endswith(f"step_{resumed_from:06d}")
    ts, resumed = fit(tr, _fresh(tr, init), make(), **run)
    assert resumed["loss"] == full["loss"]
    assert ckpt.latest(tmp_path).endswith("step_000014")
    assert int(ts.step) == 14


def test_resume_mid_epoch_of_a_list(tmp_path):
    tr, init = _setup()
    x, y = _data()
    batches = list(nd.batches((x, y), 8, seed=3))  # 6 per epoch
    run = dict(epochs=3, log_every=1, progress=False, checkpoint_every=4, checkpoint_dir=tmp_path)
    _, full = fit(tr, _fresh(tr, init), batches, **{**run, "checkpoint_dir": None})
    stop_at_8 = lambda step, ts, logs: step == 8
    _, part = fit(tr, _fresh(tr, init), batches, callbacks=[stop_at_8], **run)
    assert len(part["loss"]) == 8
    _, resumed = fit(tr, _fresh(tr, init), batches, **run)
    assert len(full["loss"]) == 18 and resumed["loss"] == full["loss"]


def _nan_batches(bad_index, n_batches=12):
    x, y = _data()
    out = list(nd.batches((x, y), 4, seed=0))[:n_batches]
    xb, yb = out[bad_index]
    out[bad_index] = (np.full_like(xb, np.nan), yb)
    return out


def test_divergence_names_first_bad_step_and_keeps_last_good_checkpoint(tmp_path):
    tr, init = _setup()
    data = _nan_batches(7)  # step 8 (counted from 1) sees NaN inputs
    with pytest.raises(
        TrainingDiverged, match=r"loss nan at step 8; last good checkpoint: .*step_000006"
    ) as info:
        fit(
            tr,
            _fresh(tr, init),
            data,
            log_every=5,
            checkpoint_dir=tmp_path,
            checkpoint_every=3,
            progress=False,
        )
    assert info.value.step == 8
    assert info.value.checkpoint.endswith("step_000006")
    assert isinstance(info.value, nj.NNJaxError)
    saved = sorted(n for n in os.listdir(tmp_path) if n != ".writer.lock")  # (the folder lock)
    assert saved == ["step_000003", "step_000006"]  # nothing after
    ts, extra = ckpt.restore(info.value.checkpoint, _fresh(tr, init))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(ts.params))
    assert len(extra["fit"]["history"]["loss"]) == 6


def test_divergence_with_check_finite_trainer():
    tr, init = _setup(check_finite=True)
    with pytest.raises(TrainingDiverged, match="at step 3; no checkpoint saved"):
        fit(tr, _fresh(tr, init), _nan_batches(2), log_every=100, progress=False)


def test_early_stopping_callback_logic():
    cb = early_stopping("val_loss", patience=2)
    values = [1.0, 0.5, 0.6, 0.5, 0.4, 0.45, 0.41]
    got = [cb(i, None, {"val_loss": v}) for i, v in enumerate(values)]
    assert got == [False, False, False, True, False, False, True]
    assert cb(9, None, {"loss": 0.0}) is False  # logs without the monitor are ignored
    up = early_stopping("val_accuracy", patience=1, mode="max")
    assert [up(i, None, {"val_accuracy": v}) for i, v in enumerate([0.5, 0.6, 0.6])] == [
        False,
        False,
        True,
    ]


def test_early_stopping_in_fit():
    tr, init = _setup(lr=0.0)  # val_loss never improves after the first eval
    x, y = _data()
    _, history = fit(
        tr,
        _fresh(tr, init),
        nd.batches((x, y), 4, epochs=None),
        steps=50,
        eval_data=[_data(8, seed=2)],
        eval_every=2,
        callbacks=[early_stopping(patience=3)],
        progress=False,
    )
    assert [e["step"] for e in history["eval"]] == [2, 4, 6, 8]
    assert len(history["loss"]) == 8


def _val_history_with_params(tr, init, data, val, **kw):
    """A reference run: val_loss at each eval and a host copy of the params there."""
    seen = []

    def record(step, ts, logs):
        if "val_loss" in logs:
            seen.append((logs["val_loss"], jax.device_get(ts.params)))

    ts, _ = fit(tr, _fresh(tr, init), data, eval_data=val, callbacks=[record], progress=False, **kw)
    return seen, jax.device_get(ts.params)


@pytest.mark.parametrize("patience", [2, 100])  # stops early / runs to the end
def test_early_stopping_restore_best_returns_the_best_evaluations_params(patience):
    tr, init = _setup()
    x, y = _data()
    val = [(x[:16], (y[:16] + 1) % C)]  # labels the training moves away from: val_loss rises
    data = nd.batches((x, y), 8, seed=0, epochs=6)
    seen, last = _val_history_with_params(tr, init, data, val)
    best = int(np.argmin([v for v, _ in seen]))
    assert best < len(seen) - min(patience, 2)  # the best is not the last evaluation
    stop = early_stopping("val_loss", patience=patience, restore_best=True)
    ts, history = fit(tr, _fresh(tr, init), data, eval_data=val, callbacks=[stop], progress=False)
    want = seen[best][1]
    for got, ref in zip(jax.tree.leaves(ts.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), ref)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(last), strict=True)
    )
    stopped_early = len(history["eval"]) < len(seen)
    assert stopped_early == (patience == 2)
    assert int(ts.step) == history["eval"][-1]["step"]  # the step count stays the last one
    plain, _ = fit(tr, _fresh(tr, init), data, eval_data=val, progress=False,
                   callbacks=[early_stopping("val_loss", patience=patience)])  # fmt: skip
    final = seen[len(history["eval"]) - 1][1]  # without restore_best: the last step's params
    for got, ref in zip(jax.tree.leaves(plain.params), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(got), ref)


def test_early_stopping_restore_best_without_the_monitor_warns():
    tr, init = _setup()
    stop = early_stopping("val_accuracy", patience=2, mode="max", restore_best=True)
    with pytest.warns(UserWarning, match="'val_accuracy' was never logged"):
        fit(tr, _fresh(tr, init), nd.batches(_data(), 8, epochs=1), callbacks=[stop],
            progress=False)  # fmt: skip
    with pytest.raises(nj.ArgumentError, match="mode: expected 'min' or 'max', got 'up'"):
        early_stopping(mode="up")


def test_steps_per_call_matches_single_steps():
    x, y = _data()
    model = nj.serial(nj.Dense(16), jax.nn.relu, nj.Dense(C))  # no rng use: same losses
    params, state = model.init(jax.random.key(0), jnp.zeros((1, D)))
    one = trainer(model, softmax_cross_entropy, optax.sgd(0.1))
    four = trainer(model, softmax_cross_entropy, optax.sgd(0.1), steps_per_call=4)
    data = nd.batches((x, y), 4, seed=0, epochs=2)  # 24 batches
    _, h1 = fit(one, one.init(params, state), data, log_every=8, progress=False)
    _, h4 = fit(four, four.init(params, state), data, log_every=8, steps_per_call=4, progress=False)
    assert len(h4["loss"]) == 24
    np.testing.assert_allclose(h4["loss"], h1["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match=r"steps_per_call=2\) but trainer.step returned 1 losses"):
        fit(one, one.init(params, state), data, steps_per_call=2, progress=False)


def test_progress_bar_shows_loss_and_throughput(capsys):
    tr, init = _setup()
    x, y = _data()
    fit(tr, _fresh(tr, init), nd.batches((x, y), 8), log_every=2, progress="bar")
    err = capsys.readouterr().err
    assert "6/6" in err and "loss=" in err and "ex/s=" in err


def test_redirected_output_gets_plain_lines_not_bar_redraws(capsys):
    tr, init = _setup()
    x, y = _data()  # under capsys neither stdout nor stderr is a terminal
    _, history = fit(tr, _fresh(tr, init), nd.batches((x, y), 8, epochs=2), log_every=2)
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "it/s" not in err and "step/s" not in err
    lines = out.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    for line, entry in zip(lines, history["epoch"], strict=True):
        assert f"loss {entry['loss']:.4g}" in line and line.endswith(" s")
    stream = lambda epoch: iter(list(nd.batches((x, y), 8, seed=epoch)))  # epoch length unknown
    fit(tr, _fresh(tr, init), stream, steps=4, log_every=2)
    steps = capsys.readouterr().out.splitlines()  # no epochs: a line per log point
    assert [ln.split("  ")[0] for ln in steps] == ["step 2/4", "step 4/4"]
    with pytest.raises(nj.ArgumentError, match="progress: expected True, False, 'bar' or"):
        fit(tr, _fresh(tr, init), nd.batches((x, y), 8), progress="yes")


@pytest.mark.parametrize(
    "seconds, shown",
    [
        (0.0123, "0.0123 s"),
        (0.0004, "0.0004 s"),
        (0.5, "0.5 s"),
        (1.234, "1.23 s"),
        (123.4, "123 s"),
    ],
)
def test_epoch_seconds_keep_three_significant_digits(seconds, shown):
    from nnjax.training.logs import seconds_str

    assert seconds_str(seconds) == shown


def test_endless_data_needs_steps():
    tr, init = _setup()
    x, y = _data()
    with pytest.raises(ValueError, match="endless"):
        fit(tr, _fresh(tr, init), nd.batches((x, y), 8, epochs=None), progress=False)


def test_lm_batches_resume(tmp_path):
    vocab = 11
    ids = (np.arange(500) * 7 % vocab).astype(np.int32)
    model = nj.serial(nj.Embedding(vocab, 8), nj.Dense(vocab))
    params, state = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))
    tr = trainer(model, softmax_cross_entropy, optax.adam(1e-2))
    data = nd.lm_batches(ids, 6, 4, seed=1)
    run = dict(steps=7, log_every=1, progress=False)
    _, full = fit(tr, tr.init(params, state), data, **run)
    stop = lambda step, ts, logs: step == 3
    fit(tr, tr.init(params, state), data, callbacks=[stop], checkpoint_dir=tmp_path, **run)
    with open(os.path.join(ckpt.latest(tmp_path), "metadata.json")) as f:
        assert '"position": 3' in f.read()
    _, resumed = fit(tr, tr.init(params, state), data, checkpoint_dir=tmp_path, **run)
    assert len(full["loss"]) == 7 and resumed["loss"] == full["loss"]
    with pytest.raises(ValueError, match="LMBatchIterator has no epochs; pass steps="):
        fit(tr, tr.init(params, state), data, epochs=1, progress=False)


# --- Keras habits: arrays in, evaluate / predict over datasets, epoch lines, metric files --


def test_arrays_go_straight_in_shuffled_seeded_and_resumable(tmp_path):
    tr, init = _setup()
    x, y = _data()
    run = dict(batch_size=8, epochs=2, seed=1, log_every=1, progress=False)
    _, got = fit(tr, _fresh(tr, init), (x, y), **run)
    ts, rng, want = _fresh(tr, init), jax.random.key(0), []
    for s, batch in enumerate(nd.batches((x, y), 8, seed=1, epochs=2)):  # the documented batching
        ts, m = tr.step(ts, batch, jax.random.fold_in(rng, s))
        want.append(float(m["loss"]))
    assert got["loss"] == want and len(want) == 12
    stop_at_5 = lambda step, ts, logs: step == 5
    ckpt_run = dict(run, checkpoint_dir=tmp_path, checkpoint_every=4)
    fit(tr, _fresh(tr, init), (x, y), callbacks=[stop_at_5], **ckpt_run)
    _, resumed = fit(tr, _fresh(tr, init), (x, y), **ckpt_run)
    assert resumed["loss"] == want


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        ("xy", {}, r"^train_data: got arrays without batch_size="),
        ("list_of_arrays", {}, r"^train_data: expected batches \(inputs, targets\), got a ndarray"),
        ("triples", {}, r"^train_data: expected batches \(inputs, targets\), got a tuple"),
        (
            "list_of_arrays",
            {"batch_size": 8},
            r"^fit\(batch_size=8\) takes arrays \(x, y\), got a list",
        ),
    ],
)
def test_data_that_is_not_batches_of_pairs_lists_the_accepted_forms(data, kwargs, match):
    tr, init = _setup()
    x, y = _data()
    data = {"xy": (x, y), "list_of_arrays": [x, y], "triples": [(x, y, y)]}[data]
    with pytest.raises(
        nj.DataError, match=match + ".*accepted forms: arrays \\(x, y\\) with batch_size="
    ):
        fit(tr, _fresh(tr, init), data, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 5, "steps_per_call": 2}, r"^steps: expected a multiple of steps_per_call == 2"),
        ({"epochs": 1.5}, r"^epochs: expected an int >= 0, got 1.5 \(float\)"),
        ({"eval_every": 0}, r"^eval_every: expected an int >= 1, got 0"),
        ({"log_every": 2.0}, r"^log_every: expected an int >= 1"),
        ({"tensorboard": True}, r"tensorboard=True needs log_dir="),
    ],
)
def test_bad_counts_name_the_argument_before_any_step(kwargs, match):
    tr, init = _setup()
    x, y = _data()
    ts = _fresh(tr, init)
    with pytest.raises(nj.ArgumentError, match=match):
        fit(tr, ts, (x, y), batch_size=8, progress=False, **kwargs)
    assert int(ts.step) == 0 and not ts.params["dense_0"]["kernel"].is_deleted()


def _numpy_logits(params, x):
    params = jax.tree.map(np.float64, params)
    h = np.maximum(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0)
    return h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


def test_evaluate_and_predict_over_datasets_against_numpy():
    tr, init = _setup()
    ts = _fresh(tr, init)
    x, y = _data(13, seed=2)
    logits = _numpy_logits(init[0], x)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = {"loss": -logp[np.arange(13), y].mean(), "accuracy": (logits.argmax(-1) == y).mean()}
    reusable = nd.batches((x, y), 5, shuffle=False, drop_remainder=False)
    for data, kw in [
        ((x, y), {"batch_size": 4}),
        (reusable, {}),
        (reusable, {}),
        (lambda: [(x, y)], {}),
    ]:
        got = nj.evaluate(tr, ts, data, **kw)  # the same batches object twice: both full passes
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(nj.predict(tr, ts, x, batch_size=4), logits, rtol=1e-5, atol=1e-6)
    probs = np.exp(logp)
    got = nj.predict(tr, ts, [x[:6], x[6:]], probabilities=True)
    np.testing.assert_allclose(got, probs, rtol=1e-5, atol=1e-7)
    with pytest.raises(nj.DataError, match="evaluate: got arrays without batch_size="):
        nj.evaluate(tr, ts, (x, y))
    with pytest.raises(ValueError, match="no batches"):
        nj.evaluate(tr, ts, iter([]))


def test_epoch_lines_and_metric_files(tmp_path, capsys):
    tr, init = _setup()
    x, y = _data()
    xv, yv = _data(13, seed=1)
    _, h = fit(
        tr, _fresh(tr, init), (x, y), batch_size=8, epochs=2, eval_data=(xv, yv),
        log_every=4, log_dir=tmp_path, progress=True,
    )  # fmt: skip
    err = capsys.readouterr().out  # the lines go where print's go; the bar to stderr
    assert re.search(
        r"epoch 1/2  loss [\d.]+  accuracy [\d.]+  val_loss [\d.]+  val_accuracy [\d.]+  [\d.]+ s",
        err,
    )
    assert "epoch 2/2  loss" in err
    assert [e["epoch"] for e in h["epoch"]] == [1, 2] and [e["step"] for e in h["eval"]] == [6, 12]
    for e, losses in zip(h["epoch"], (h["loss"][:6], h["loss"][6:]), strict=True):
        np.testing.assert_allclose(e["loss"], np.mean(losses), rtol=1e-12)
    assert h["epoch"][0]["val_loss"] == h["eval"][0]["loss"]
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("kind", "time")}
    by_kind = lambda kind: [strip(r) for r in records if r["kind"] == kind]
    assert by_kind("train") == h["train"]  # log points at 4, 8, 12
    assert by_kind("eval") == h["eval"]
    assert by_kind("epoch") == h["epoch"]


def _tfrecords(path):
    """TFRecord framing (length, crc, data, crc), as TensorBoard's reader does."""
    with open(path, "rb") as f:
        data = f.read()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    tr, init = _setup()
    x, y = _data()
    _, h = fit(
        tr, _fresh(tr, init), (x, y), batch_size=8, log_every=2, log_dir=tmp_path,
        tensorboard=True, progress=False,
    )  # fmt: skip
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents")]
    scalars = {}
    for record in _tfrecords(tmp_path / name):
        event = event_pb2.Event.FromString(record)
        for v in event.summary.value:
            scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
    np.testing.assert_allclose(
        [v for _, v in scalars["train/loss"]], [t["loss"] for t in h["train"]], rtol=1e-6
    )
    assert scalars["epoch/loss"][0][0] == 6


def test_the_compilers_freed_heap_is_released_once_after_the_first_step(monkeypatch):
    import nnjax.training.fit as fit_module

    tr, init = _setup()
    x, y = _data()
    seen = []

    def step(ts, batch, rng):  # counts the steps taken when the release comes
        seen.append("step")
        return tr.step(ts, batch, rng)

    monkeypatch.setattr(fit_module, "release_host_memory", lambda: seen.append("release"))
    data = nd.batches((x, y), 8, epochs=1)
    fit(tr._replace(step=step), _fresh(tr, init), data, progress=False)
    assert seen == ["step", "release"] + ["step"] * 5


def test_compile_beside_compiles_for_the_first_call(caplog):
    """Compiled on another thread from shapes: the call compiles nothing (jax logs every
    compilation it makes on the calling thread); a function not compiled ahead does."""
    import logging

    from nnjax.training.ahead import compile_beside

    def ahead(x):
        return jnp.cos(x) * 3

    def plain(x):
        return jnp.cos(x) * 3

    f, g = jax.jit(ahead), jax.jit(plain)
    thread = compile_beside(f, jax.ShapeDtypeStruct((5,), jnp.float32))
    thread.join()
    x = jnp.ones(5)
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        np.testing.assert_allclose(f(x), np.cos(1.0) * 3, rtol=1e-6)
        g(x)
    compiled = [r.getMessage() for r in caplog.records if "XLA compilation" in r.getMessage()]
    assert any("jit(plain)" in m for m in compiled)
    assert not any("jit(ahead)" in m for m in compiled)
