"""nnjax.training.trainer: the jitted step against hand-written JAX + optax steps, masks, scans, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.core.paths import flatten, param_bytes
from nnjax.training import losses, metrics
from nnjax.training import trainer as train


def _mlp():
    return nj.serial(nj.Dense(16), jax.nn.relu, nj.Dense(4))


def _data(n=8, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 5)), jax.random.randint(ky, (n,), 0, 4)


def _ce(logits, labels):
    """The reference loss, straight from optax (independent of nj.losses)."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _reference(model, params, state, batches, opt, rngs=None, frozen=()):
    """Hand-written JAX + optax steps; ``frozen`` top-level keys are closed over, not trained."""
    fixed = {k: params[k] for k in frozen}
    params = {k: v for k, v in params.items() if k not in frozen}
    opt_state = opt.init(params)
    losses_ = []
    for i, (x, y) in enumerate(batches):
        rng = None if rngs is None else rngs[i]

        def loss(p, x=x, y=y, rng=rng):
            out, _ = model.apply({**p, **fixed}, state, x, rng=rng, train=True)
            return _ce(out, y)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses_.append(value)
    return {**params, **fixed}, losses_


def _allclose(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _numpy(tree):
    return jax.tree.map(np.array, tree)


def _count_dots(tr, ts, batch):
    return tr.step.lower(ts, batch, jax.random.key(0)).as_text().count("stablehlo.dot_general")


def Counter():
    """A stateful test layer: counts train-mode calls and keeps an EMA of the batch mean."""

    def init(key, x):
        return {}, {"count": jnp.zeros((), jnp.int32), "ema": jnp.zeros(x.shape[-1])}

    def apply(params, state, x, *, rng=None, train=False):
        if train:
            state = {"count": state["count"] + 1, "ema": 0.5 * state["ema"] + 0.5 * x.mean(0)}
        return x, state

    return nj.Layer(init, apply, "counter")


# --- the plain step ------------------------------------------------------------------


def test_step_matches_handwritten_adam():
    model, (x, y) = _mlp(), _data()
    params, state = model.init(jax.random.key(0), x)
    opt = optax.adam(1e-2)
    tr = train.trainer(model, losses.softmax_cross_entropy, opt, metrics=[metrics.accuracy])
    ts = tr.init(params, state)
    for _ in range(3):
        before = np.asarray(tr.predict(ts, x))
        ts, m = tr.step(ts, (x, y), jax.random.key(0))
    ref, ref_losses = _reference(model, params, state, [(x, y)] * 3, opt)
    _allclose(ts.params, ref)
    assert int(ts.step) == 3 and ts.step.dtype == jnp.int32
    np.testing.assert_allclose(m["loss"], ref_losses[-1], rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], np.mean(before.argmax(-1) == np.asarray(y)))


def test_step_compiles_once():
    traces = []

    def loss(out, y):
        traces.append(1)
        return losses.softmax_cross_entropy(out, y)

    model, (x, y) = _mlp(), _data()
    tr = train.trainer(model, loss, optax.sgd(0.1), trainable={"dense_0": False, "dense_1": True})
    ts = tr.init(*model.init(jax.random.key(0), x))
    for i in range(4):
        ts, _ = tr.step(ts, (x, y), jax.random.key(i))
    assert len(traces) == 1
    assert tr.step._cache_size() == 1


def test_init_copies_and_step_donates():
    model, (x, y) = _mlp(), _data()
    params, state = model.init(jax.random.key(0), x)
    kept = _numpy(params)
    tr = train.trainer(model, losses.softmax_cross_entropy, optax.adam(1e-2))
    ts0 = tr.init(params, state)
    ts1, _ = tr.step(ts0, (x, y))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(ts0.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    _allclose(params, kept, rtol=0, atol=0)
    ts2 = tr.init(params, state)  # the same params seed a second run
    ts2, _ = tr.step(ts2, (x, y))
    _allclose(ts1.params, ts2.params, rtol=0, atol=0)

    keep = train.trainer(model, losses.softmax_cross_entropy, optax.adam(1e-2), donate=False)
    ts0 = keep.init(params, state)
    keep.step(ts0, (x, y))
    _allclose(ts0.params, kept, rtol=0, atol=0)


def test_loss_extras_and_metric_names():
    model, (x, y) = _mlp(), _data()

    def loss(out, y):
        ce = losses.softmax_cross_entropy(out, y)
        return ce, {"ce_twice": 2 * ce}

    tr = train.trainer(model, loss, optax.sgd(0.1), metrics={"acc": metrics.accuracy})
    ts = tr.init(*model.init(jax.random.key(0), x))
    ts, m = tr.step(ts, (x, y))
    assert sorted(m) == ["acc", "ce_twice", "loss"]
    np.testing.assert_allclose(m["ce_twice"], 2 * m["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="needs a unique __name__"):
        train.trainer(model, loss, optax.sgd(0.1), metrics=[lambda o, t: 0.0])
    with pytest.raises(ValueError, match="needs a unique __name__"):
        train.trainer(model, loss, optax.sgd(0.1), metrics=[metrics.accuracy, metrics.accuracy])


# --- trainable masks -----------------------------------------------------------------


def test_frozen_layer_is_bit_for_bit_and_has_no_weight_gradient():
    model, (x, y) = _mlp(), _data()
    params, state = model.init(jax.random.key(0), x)
    kept = _numpy(params)
    opt = optax.adam(1e-2)
    mask = {"dense_0": {"kernel": False, "bias": False}, "dense_1": {"kernel": True, "bias": True}}
    tr = train.trainer(model, losses.softmax_cross_entropy, opt, trainable=mask)
    ts = tr.init(params, state)
    for _ in range(4):
        ts, _ = tr.step(ts, (x, y))
    for k in ("kernel", "bias"):
        assert np.array_equal(np.asarray(ts.params["dense_0"][k]), kept["dense_0"][k])
    ref, _ = _reference(model, params, state, [(x, y)] * 4, opt, frozen=("dense_0",))
    _allclose(ts.params, ref)
    # Adam: mu and nu for the trainable leaves only, plus an int32 count.
    trainable_bytes = param_bytes(params["dense_1"])
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(ts.opt_state)) == 2 * trainable_bytes + 4

    full = train.trainer(model, losses.softmax_cross_entropy, opt)
    head_frozen = train.trainer(
        model, losses.softmax_cross_entropy, opt, trainable={"dense_0": True, "dense_1": False}
    )
    # forward 2 dots; full backward: dW1, dX1, dW0. Frozen dense_0: only dW1 (no dX1 either).
    assert _count_dots(full, full.init(params, state), (x, y)) == 5
    assert _count_dots(tr, tr.init(params, state), (x, y)) == 3
    assert _count_dots(head_frozen, head_frozen.init(params, state), (x, y)) == 4


def _stack_models():
    block = lambda: nj.serial(nj.Dense(6), jnp.tanh)
    stacked = nj.serial(nj.Dense(6), nj.repeat(block(), 4), nj.Dense(4))
    unrolled = nj.serial(nj.Dense(6), nj.serial(*[block() for _ in range(4)]), nj.Dense(4))
    return stacked, unrolled


def _unroll(params):
    st = params["serial_0"]["stacked"]["dense_0"]
    blocks = {f"serial_{i}": {"dense_0": {k: v[i] for k, v in st.items()}} for i in range(4)}
    return {**params, "serial_0": blocks}


def test_stacked_mask_selects_copies():
    stacked, unrolled = _stack_models()
    x, y = _data()
    params, state = stacked.init(jax.random.key(0), x)
    kept = _numpy(params)
    # Decay would move frozen copies without the where; clipping must see only selected copies.
    opt = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-2, weight_decay=0.1))
    sel = np.array([False, False, True, True])
    mask = {
        "dense_0": False,
        "serial_0": {"stacked": {"dense_0": {"kernel": sel, "bias": sel}}},
        "dense_1": True,
    }
    tr = train.trainer(stacked, losses.softmax_cross_entropy, opt, trainable=mask)
    ts = tr.init(params, state)
    for _ in range(3):
        ts, _ = tr.step(ts, (x, y))
    new = ts.params["serial_0"]["stacked"]["dense_0"]
    for k in ("kernel", "bias"):
        old = kept["serial_0"]["stacked"]["dense_0"][k]
        assert np.array_equal(np.asarray(new[k])[:2], old[:2])
        assert not np.allclose(np.asarray(new[k])[2:], old[2:])
    assert np.array_equal(np.asarray(ts.params["dense_0"]["kernel"]), kept["dense_0"]["kernel"])
    # Optimizer state exists for the whole stacked leaf; the unselected copies' stays zero.
    mu = ts.opt_state[1][0].mu["serial_0"]["stacked"]["dense_0"]["kernel"]
    assert mu.shape == (4, 6, 6) and not np.any(np.asarray(mu)[:2])
    assert "dense_0" not in ts.opt_state[1][0].mu
    # Reference: the same network unrolled, a plain leaf-level mask.
    blocks = {f"serial_{i}": i >= 2 for i in range(4)}
    ref_tr = train.trainer(
        unrolled,
        losses.softmax_cross_entropy,
        opt,
        trainable={"dense_0": False, "serial_0": blocks, "dense_1": True},
    )
    ref = ref_tr.init(_unroll(params), state)
    for _ in range(3):
        ref, _ = ref_tr.step(ref, (x, y))
    _allclose(_unroll(ts.params), ref.params)


def test_mask_errors():
    model, (x, _) = _mlp(), _data()
    params, _ = model.init(jax.random.key(0), x)
    make = lambda mask: train.trainer(model, losses.mse, optax.sgd(0.1), trainable=mask).init(
        params
    )
    with pytest.raises(nj.MaskError, match="no entry for param 'dense_1/bias'"):
        make({"dense_0": True, "dense_1": {"kernel": True}})
    with pytest.raises(nj.MaskError, match=r"not params: \['head'\]"):
        make({"dense_0": True, "dense_1": True, "head": False})
    with pytest.raises(nj.MaskError, match="stacked axes"):
        make({"dense_0": np.array([True, False]), "dense_1": True})
    with pytest.raises(nj.MaskError, match="expected a bool"):
        make({"dense_0": 1, "dense_1": True})


@pytest.mark.parametrize(
    "mask", [False, {"dense_0": False, "dense_1": {"kernel": False, "bias": False}}]
)
def test_a_mask_that_selects_nothing_is_refused(mask):
    """Today's alternative was a run that trains nothing and reports a flat loss."""
    model, (x, _) = _mlp(), _data()
    params, _ = model.init(jax.random.key(0), x)
    tr = train.trainer(model, losses.mse, optax.sgd(0.1), trainable=mask)
    with pytest.raises(nj.MaskError, match=r"selects no parameter \(all 4 leaves frozen\)"):
        tr.init(params)


# --- scans: several steps per call, gradient accumulation ------------------------------


def test_steps_per_call_equals_k_single_steps():
    model = nj.serial(nj.Dense(16), jax.nn.relu, nj.Dropout(0.3), nj.Dense(4))
    xs, ys = _data(24)
    xs, ys = xs.reshape(3, 8, 5), ys.reshape(3, 8)
    params, state = model.init(jax.random.key(0), xs[0])
    opt, rng = optax.adam(1e-2), jax.random.key(7)
    multi = train.trainer(
        model, losses.softmax_cross_entropy, opt, steps_per_call=3, metrics=[metrics.accuracy]
    )
    single = train.trainer(model, losses.softmax_cross_entropy, opt, metrics=[metrics.accuracy])
    ts_m, m_m = multi.step(multi.init(params, state), (xs, ys), rng)
    ts_s = single.init(params, state)
    got = []
    for i, r in enumerate(jax.random.split(rng, 3)):
        ts_s, m = single.step(ts_s, (xs[i], ys[i]), r)
        got.append(m)
    _allclose(ts_m, ts_s)
    assert m_m["loss"].shape == (3,) and int(ts_m.step) == 3
    np.testing.assert_allclose(m_m["loss"], [m["loss"] for m in got], rtol=1e-6)
    np.testing.assert_allclose(m_m["accuracy"], [m["accuracy"] for m in got])
    with pytest.raises(
        nj.ShapeError, match=r"leading axis of steps_per_call=3, got x.shape == \(8, 5\)"
    ):
        multi.step(multi.init(params, state), (xs[0], ys[0]), rng)


def test_accumulate_equals_one_full_batch_step():
    model, (x, y) = _mlp(), _data(8)
    params, state = model.init(jax.random.key(0), x)
    opt = optax.sgd(0.5)  # SGD: the update is proportional to the gradient, so scale errors show
    tr = train.trainer(model, losses.softmax_cross_entropy, opt, accumulate=4)
    ts, m = tr.step(tr.init(params, state), (x, y))
    ref, ref_losses = _reference(model, params, state, [(x, y)], opt)
    _allclose(ts.params, ref)
    np.testing.assert_allclose(m["loss"], ref_losses[0], rtol=1e-6)
    with pytest.raises(nj.ShapeError, match=r"divides by accumulate=3, got x.shape == \(8, 5\)"):
        train.trainer(model, losses.softmax_cross_entropy, opt, accumulate=3).step(ts, (x, y))


@pytest.mark.parametrize(("replicas", "accumulate"), [(2, 1), (4, 1), (2, 2)])
def test_replicas_equal_one_full_batch_step(replicas, accumulate):
    """Rows split over replicas, each through its own copy of the params, the loss over
    all rows and the copies' gradients summed: the hand-written full-batch step."""
    model, (x, y) = _mlp(), _data(8)
    params, state = model.init(jax.random.key(0), x)
    opt = optax.sgd(0.5)
    tr = train.trainer(
        model, losses.softmax_cross_entropy, opt, replicas=replicas, accumulate=accumulate
    )
    ts, m = tr.step(tr.init(params, state), (x, y))
    ref, ref_losses = _reference(model, params, state, [(x, y)], opt)
    _allclose(ts.params, ref)
    np.testing.assert_allclose(m["loss"], ref_losses[0], rtol=1e-6)


def test_replicas_with_lazy_logits_equal_the_full_batch_step():
    """A language model whose training output is LazyLogits (the chunked loss's head and
    hidden states, here a tied table): the replicas' step equals hand-written full logits,
    optax's cross-entropy and jax.grad over the whole batch."""
    import dataclasses

    hf = dict(model_type="llama", vocab_size=40, hidden_size=16, num_hidden_layers=1)
    hf.update(num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    config = nj.models.hf.config_from_hf({**hf, "tie_word_embeddings": True})
    model = nj.models.CausalLM(dataclasses.replace(config, lazy_logits_from=1))
    ids = np.random.default_rng(0).integers(0, 40, (4, 9)).astype(np.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    params, _ = model.init(jax.random.key(0), x)
    out, _ = model.apply(params, {}, x, train=True)
    assert isinstance(out, nj.losses.LazyLogits)
    opt = optax.sgd(0.5)
    tr = train.trainer(model, losses.softmax_cross_entropy, opt, replicas=2)
    ts, m = tr.step(tr.init(params), (x, y))

    def loss(p):
        logits, _ = model.apply(p, {}, {"ids": x, "lazy_logits": False}, train=True)
        return _ce(logits.reshape(-1, 40), y.reshape(-1))

    value, grads = jax.value_and_grad(loss)(params)
    want = optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
    np.testing.assert_allclose(m["loss"], value, rtol=1e-6)
    _allclose(ts.params, want)


def test_replicas_refuse_outputs_that_are_not_per_row():
    model = nj.serial(nj.Dense(3), lambda h: jnp.sum(h, axis=0))  # one output for the batch
    x, t = jnp.ones((4, 2)), jnp.zeros((4, 3))
    params, state = model.init(jax.random.key(0), x)
    tr = train.trainer(model, losses.mse, optax.sgd(0.1), replicas=2)
    with pytest.raises(
        nj.ShapeError, match=r"output is not per row: expected \(replicas, 2, \.\.\.\)"
    ):
        tr.step(tr.init(params, state), (x, t))


def test_replicas_draw_their_own_dropout():
    """Row 0 of each replica (rows 0 and 2 of 4) sees another dropout mask: a key shared
    by the replicas would give them the same one."""
    model = nj.serial(nj.Dropout(0.5), nj.Dense(3))
    x, t = jnp.ones((4, 64)), jnp.zeros((4, 3))
    params, state = model.init(jax.random.key(0), x)
    differ = {"differ": lambda out, _: jnp.abs(out[0] - out[2]).sum()}
    same = {"same": lambda out, _: jnp.abs(out[0] - out[0]).sum()}
    tr = train.trainer(model, losses.mse, optax.sgd(0.1), replicas=2, metrics={**differ, **same})
    _, m = tr.step(tr.init(params, state), (x, t), jax.random.key(1))
    assert float(m["differ"]) > 0 and float(m["same"]) == 0


def test_replicas_refuse_layer_state_and_uneven_rows():
    model, (x, y) = _mlp(), _data(8)
    params, state = model.init(jax.random.key(0), x)
    tr = train.trainer(model, losses.softmax_cross_entropy, optax.sgd(0.1), replicas=3)
    with pytest.raises(nj.ShapeError, match=r"divides by replicas=3, got x.shape == \(8, 5\)"):
        tr.step(tr.init(params, state), (x, y))
    stateful = nj.serial(Counter(), nj.Dense(3))
    params, state = stateful.init(jax.random.key(0), jnp.zeros((4, 2)))
    tr = train.trainer(stateful, losses.mse, optax.sgd(0.1), replicas=2)
    with pytest.raises(nj.ArgumentError, match=r"replicas=2\): the model keeps layer state"):
        tr.step(tr.init(params, state), (jnp.ones((4, 2)), jnp.zeros((4, 3))))


def test_layer_state_threads_through_micro_batches_and_steps():
    model = nj.serial(Counter(), nj.Dense(3))
    x = jnp.arange(24.0).reshape(3, 4, 2)  # 3 steps of 4 examples, 2 micro-batches of 2
    t = jnp.zeros((3, 4, 3))
    params, state = model.init(jax.random.key(0), x[0])
    tr = train.trainer(model, losses.mse, optax.sgd(0.1), steps_per_call=3, accumulate=2)
    ts, _ = tr.step(tr.init(params, state), (x, t))
    ema = np.zeros(2)
    for micro in np.asarray(x).reshape(6, 2, 2):
        ema = 0.5 * ema + 0.5 * micro.mean(0)
    assert int(ts.state["counter_0"]["count"]) == 6
    np.testing.assert_allclose(ts.state["counter_0"]["ema"], ema, rtol=1e-6)


# --- optax clipping and schedules -------------------------------------------------------


def test_lr_schedule_and_clipping_act_by_step_count():
    model, (x, y) = _mlp(), _data()
    params, state = model.init(jax.random.key(0), x)
    schedule = optax.cosine_decay_schedule(0.5, decay_steps=4, alpha=0.1)
    clip = 0.05
    opt = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(schedule))
    tr = train.trainer(model, losses.softmax_cross_entropy, opt)
    ts = tr.init(params, state)
    for t in range(5):
        before = _numpy(ts.params)
        grads = jax.grad(lambda p: _ce(model.apply(p, state, x)[0], y))(before)
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
        assert norm > clip  # so the clipping is active
        ts, _ = tr.step(ts, (x, y))
        for path, g in flatten(grads).items():
            delta = np.asarray(flatten(ts.params)[path]) - flatten(before)[path]
            expected = -float(schedule(t)) * np.asarray(g) * clip / norm
            np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-7)


def test_clipped_adamw_cosine_matches_handwritten():
    model, (x, y) = _mlp(), _data()
    params, state = model.init(jax.random.key(0), x)
    opt = optax.chain(
        optax.clip_by_global_norm(0.25),  # below the initial gradient norm (0.72)
        optax.adamw(optax.cosine_decay_schedule(1e-2, decay_steps=5), weight_decay=0.01),
    )
    tr = train.trainer(model, losses.softmax_cross_entropy, opt)
    ts = tr.init(params, state)
    for _ in range(5):
        ts, _ = tr.step(ts, (x, y))
    ref, _ = _reference(model, params, state, [(x, y)] * 5, opt)
    _allclose(ts.params, ref)
    # the comparison is not vacuous: clipping is active at the start and params moved
    grads = jax.grad(lambda p: _ce(model.apply(p, state, x)[0], y))(params)
    assert float(optax.tree.norm(grads)) > 0.25
    moved = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ts.params), jax.tree.leaves(params), strict=True)
    ]
    assert min(moved) > 1e-4
    assert int(ts.step) == 5


# --- mixed precision, finiteness ------------------------------------------------------


def test_bfloat16_compute_keeps_float32_master_params():
    model, (x, y) = _mlp(), _data()
    params, state = model.init(jax.random.key(0), x)
    opt = optax.adam(1e-2)
    bf = train.trainer(model, losses.softmax_cross_entropy, opt, compute_dtype=jnp.bfloat16)
    f32 = train.trainer(model, losses.softmax_cross_entropy, opt)
    ts_bf, ts_f = bf.init(params, state), f32.init(params, state)
    assert "bf16" in bf.step.lower(ts_bf, (x, y)).as_text()
    for _ in range(3):
        ts_bf, m_bf = bf.step(ts_bf, (x, y))
        ts_f, m_f = f32.step(ts_f, (x, y))
    for leaf in jax.tree.leaves((ts_bf.params, ts_bf.opt_state[0].mu, ts_bf.opt_state[0].nu)):
        assert leaf.dtype == jnp.float32
    assert m_bf["loss"].dtype == jnp.float32
    np.testing.assert_allclose(m_bf["loss"], m_f["loss"], rtol=2e-2)
    assert bf.predict(ts_bf, x).dtype == jnp.float32


def test_check_finite_skips_the_update():
    model, (x, y) = _mlp(), _data()
    tr = train.trainer(model, losses.softmax_cross_entropy, optax.adam(1e-2), check_finite=True)
    ts = tr.init(*model.init(jax.random.key(0), x))
    ts, m = tr.step(ts, (x, y))
    assert bool(m["finite"]) and int(ts.step) == 1
    kept = _numpy(ts)
    ts, m = tr.step(ts, (x.at[0, 0].set(jnp.nan), y))
    assert not bool(m["finite"])
    _allclose(ts, kept, rtol=0, atol=0)
    ts, m = tr.step(ts, (x, y))
    assert bool(m["finite"]) and int(ts.step) == 2


# --- evaluation -----------------------------------------------------------------------


def test_evaluate_predict_and_evaluate_over_batches():
    model, (x, y) = _mlp(), _data(12)
    params, state = model.init(jax.random.key(0), x)
    tr = train.trainer(
        model, losses.softmax_cross_entropy, optax.sgd(0.1), metrics=[metrics.accuracy]
    )
    ts = tr.init(params, state)
    logits = np.asarray(model.apply(params, state, x)[0], np.float64)
    np.testing.assert_allclose(tr.predict(ts, x), logits, rtol=1e-6, atol=1e-6)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(12), np.asarray(y)]
    hits = logits.argmax(-1) == np.asarray(y)
    m = tr.evaluate(ts, (x[:5], y[:5]))
    np.testing.assert_allclose(m["loss"], nll[:5].mean(), rtol=1e-5)
    batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]  # sizes 5, 5, 2
    got = nj.evaluate(tr, ts, batches)
    np.testing.assert_allclose(got["loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], hits.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        nj.evaluate(tr, ts, [])


def test_compiler_options_reach_only_the_train_step():
    model = nj.serial(nj.Dense(4), jax.nn.relu, nj.Dense(3))
    params, state = model.init(jax.random.key(0), jnp.zeros((2, 5)))
    bad = nj.trainer(
        model,
        losses.softmax_cross_entropy,
        optax.sgd(0.1),
        compiler_options={"xla_cpu_experimental_onednn_fusion_type": "NOT_A_FUSION"},
    )
    batch = (jnp.ones((2, 5)), jnp.array([0, 1]))
    ts = bad.init(params, state)
    # evaluate compiles without the options; the step is compiled with them (and XLA rejects them)
    assert set(bad.evaluate(ts, batch)) == {"loss"}
    with pytest.raises(Exception, match="NOT_A_FUSION"):
        bad.step(ts, batch, jax.random.key(0))


def test_onednn_dots_compile_a_sum_of_dots_and_match_numpy():
    # the sum of two dots is what made XLA abort with oneDNN's fusing variant
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(24, 16)).astype(np.float32) for _ in range(2))
    w1, w2 = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
    f = jax.jit(lambda a, b, w1, w2: a @ w1 + b @ w2, compiler_options=dict(nj.ONEDNN_DOTS))
    compiled = f.lower(a, b, w1, w2).compile()
    assert "__onednn_fusion" in compiled.as_text()
    want = a.astype(np.float64) @ w1 + b.astype(np.float64) @ w2
    np.testing.assert_allclose(compiled(a, b, w1, w2), want, rtol=1e-5, atol=1e-5)


def test_onednn_dots_train_a_transformer_like_the_default():
    model = nj.serial(nj.Embedding(11, 16), nj.TransformerBlock(2), nj.LayerNorm(), nj.Dense(11))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 8)), jnp.int32)
    y = jnp.roll(x, -1, axis=1)
    params, state = model.init(jax.random.key(0), x)
    runs = []
    for options in (None, nj.ONEDNN_DOTS):
        # SGD, not Adam: Adam would blow up rounding noise in the key bias's zero gradient
        tr = nj.trainer(
            model, losses.softmax_cross_entropy, optax.sgd(0.5), compiler_options=options
        )
        ts = tr.init(params, state)
        losses_ = []
        for _ in range(3):
            ts, m = tr.step(ts, (x, y))
            losses_.append(float(m["loss"]))
        runs.append((ts.params, losses_))
    (p_default, l_default), (p_onednn, l_onednn) = runs
    assert l_default[-1] < l_default[0]
    np.testing.assert_allclose(l_onednn, l_default, rtol=1e-5)
    _allclose(p_onednn, p_default, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps_per_call": 2.0}, r"^steps_per_call: expected an int >= 1, got 2.0 \(float\)"),
        ({"steps_per_call": 0}, r"^steps_per_call: expected an int >= 1, got 0"),
        ({"accumulate": -1}, r"^accumulate: expected an int >= 1, got -1"),
        ({"accumulate": True}, r"^accumulate: expected an int >= 1, got True \(bool\)"),
        ({"replicas": 0}, r"^replicas: expected an int >= 1, got 0"),
    ],
)
def test_counts_that_are_not_positive_ints_name_the_argument(kwargs, match):
    with pytest.raises(nj.ArgumentError, match=match):
        train.trainer(_mlp(), losses.mse, optax.sgd(0.1), **kwargs)


def test_reusing_a_donated_state_says_it_was_donated():
    model = nj.serial(nj.Dense(2))
    params, state = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    tr = nj.trainer(model, nj.losses.mse, optax.sgd(0.1))
    batch = (jnp.ones((4, 3)), jnp.ones((4, 2)))
    ts = tr.init(params, state)
    new, _ = tr.step(ts, batch)
    donated = r"ts: this TrainState was donated to an earlier train step.*donate=False"
    for call in (lambda: tr.step(ts, batch), lambda: tr.evaluate(ts, batch)):
        with pytest.raises(nj.ArgumentError, match=donated):
            call()
    new, _ = tr.step(new, batch)  # the returned state is the one to use
    keep = nj.trainer(model, nj.losses.mse, optax.sgd(0.1), donate=False)
    ts = keep.init(params, state)
    keep.step(ts, batch)
    keep.step(ts, batch)  # donate=False: the state stays valid
    with pytest.raises(nj.ShapeError):  # other errors pass through unchanged
        tr.step(new, (jnp.ones((4, 3)), jnp.ones((4, 5))))


_QUEUED_STEPS = """
import jax, numpy as np, optax
import nnjax as nj
mesh = nj.sharding.mesh({"data": 2})
model = nj.serial(nj.Dense(64), jax.nn.relu, nj.Dense(10))
x, y = np.ones((8, 32), np.float32), np.zeros(8, np.int32)
tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.sgd(0.1))
ts = nj.sharding.shard_train_state(
    tr.init(model.init(jax.random.key(0), x)[0]), mesh, nj.sharding.data_parallel_rules()
)
batch = nj.sharding.shard_batch((x, y), mesh)
for _ in range(600):  # no host work between calls: all queued at once without the guard
    ts, m = tr.step(ts, batch)
    values = tr.evaluate(ts, batch)
print("steps", int(ts.step), "loss", float(m["loss"]), float(values["loss"]))
"""


def _on_two_cpu_devices(script: str) -> str:
    """``script``'s stdout, run by a fresh interpreter with two XLA host devices."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_many_queued_steps_over_two_cpu_devices_finish():
    """600 steps and evaluations of a small model, dispatched back to back over two host
    devices, finish: unguarded, XLA:CPU's in-process all-reduce deadlocked with ~128
    queued and aborted the process after its 40 s rendezvous timeout."""
    assert "steps 600" in _on_two_cpu_devices(_QUEUED_STEPS)


_REPLICAS_OVER_DEVICES = """
import json, re
import jax, numpy as np, optax
import nnjax as nj
mesh = nj.sharding.mesh({"data": 2})
config = nj.models.hf.config_from_hf(dict(
    model_type="gpt2", vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16))
model = nj.models.CausalLM(config)
ids = np.random.default_rng(0).integers(0, 50, (4, 17)).astype(np.int32)
params, _ = model.init(jax.random.key(0), ids[:, :-1])
batch = nj.sharding.shard_batch((ids[:, :-1], ids[:, 1:]), mesh)
out = {"params": nj.count_params(params)}
for replicas in (1, 2):
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.sgd(0.5), replicas=replicas)
    ts = nj.sharding.shard_train_state(tr.init(params), mesh, nj.sharding.data_parallel_rules())
    hlo = tr.step.lower(ts, batch, jax.random.key(1)).compile().as_text()
    reduces = [l for l in hlo.splitlines() if " all-reduce(" in l]
    sizes = [[int(np.prod([int(d) for d in dims.split(",") if d])) for dims in
              re.findall(r"f32\\[([0-9,]*)\\]", l.split("all-reduce(")[0])] for l in reduces]
    losses = []
    for _ in range(3):
        ts, m = tr.step(ts, batch, jax.random.key(1))
        losses.append(float(m["loss"]))
    leaves = [np.asarray(x).tolist() for x in jax.tree.leaves(ts.params)]
    out[replicas] = {"all_reduce_sizes": sizes, "losses": losses, "params": leaves}
print(json.dumps(out))
"""


def test_replicas_over_two_cpu_devices_sum_one_buffer():
    """Over two host devices a step with ``replicas=2`` sums the gradients in one
    all-reduce of one buffer of every param (plus the loss's scalars), where the plain
    step sums one buffer per gradient; both give the same losses and params."""
    import json

    out = json.loads(_on_two_cpu_devices(_REPLICAS_OVER_DEVICES).strip().splitlines()[-1])
    plain, replicated = out["1"], out["2"]
    (one,) = replicated["all_reduce_sizes"]  # one all-reduce op
    assert max(one) == out["params"] and sum(size > 1 for size in one) == 1
    assert sum(size > 1 for sizes in plain["all_reduce_sizes"] for size in sizes) > 10
    np.testing.assert_allclose(replicated["losses"], plain["losses"], rtol=1e-5)
    for a, b in zip(replicated["params"], plain["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
