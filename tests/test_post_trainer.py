"""The preference trainer: the reference by adapters off equals a kept copy of the base
params to the bit and costs no parameter memory; the three reference sources agree; the
loss matches the pure function on log-probs computed apart; fit, accumulation, errors."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.core.report import param_bytes

TOK = nj.data.ByteTokenizer()
MODEL_KEYS = ("ids", "positions", "segment_ids")  # the model's own inputs of a preference batch

CFG = nj.models.CausalLMConfig(
    vocab_size=256, hidden_size=16, num_heads=2, mlp_hidden=32, num_layers=1, max_position=32
)
RECORDS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
    for a in range(4)
    for b in range(3)
]


def _setup(batch_size=4, seq_len=10):
    model = nj.models.CausalLM(CFG)
    data = nj.data.load_preference(RECORDS, TOK, seq_len, eos_id=0)
    batch = jax.tree.map(lambda x: x[:batch_size], (data.inputs, data.targets))
    base, _ = model.init(jax.random.key(0), batch[0]["ids"][:, 0])
    params, mask = nj.finetune.add_lora(base, jax.random.key(1), "**/kernel", rank=4)
    # lora_b away from 0, so the policy differs from the reference from the first step
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if path[-1].key == "lora_b" else x, params
    )
    return types.SimpleNamespace(
        model=model, data=data, batch=batch, base=base, params=params, mask=mask
    )


def _unpack(s):
    return s.model, s.data, s.batch, s.base, s.params, s.mask


def _run(tr, params, batches):
    ts = tr.init(params)
    out = []
    for b in batches:
        ts, m = tr.step(ts, b)
        out.append(jax.device_get(m))
    return ts, out


def test_adapters_off_reference_equals_a_kept_copy_of_the_base_to_the_bit():
    model, _data, batch, base, params, mask = _unpack(_setup())
    kept = jax.tree.map(lambda x: jnp.array(x, copy=True), base)
    batches = [batch] * 3
    tr_a = nj.post.preference_trainer(model, optax.adam(1e-2), trainable=mask)
    tr_b = nj.post.preference_trainer(model, optax.adam(1e-2), reference=kept, trainable=mask)
    ts_a, m_a = _run(tr_a, params, batches)
    ts_b, m_b = _run(tr_b, params, batches)
    jax.tree.map(np.testing.assert_array_equal, ts_a.params, ts_b.params)
    jax.tree.map(np.testing.assert_array_equal, m_a, m_b)
    assert m_a[0]["rewards/margins"] != 0  # lora_b != 0: policy and reference differ
    assert m_a[-1]["loss"] < m_a[0]["loss"]


def test_adapters_off_reference_costs_no_parameter_memory():
    model, _data, batch, base, params, mask = _unpack(_setup(batch_size=1, seq_len=4))
    tr_a = nj.post.preference_trainer(model, optax.sgd(1e-2), trainable=mask)
    tr_b = nj.post.preference_trainer(model, optax.sgd(1e-2), reference=base, trainable=mask)
    cost_a = nj.finetune.step_cost(tr_a.step, tr_a.init(params), batch)
    cost_b = nj.finetune.step_cost(tr_b.step, tr_b.init(params), batch)
    # the step's inputs: the kept copy adds exactly the base params' bytes, adapters-off nothing
    assert cost_b.argument_bytes - cost_a.argument_bytes == param_bytes(base)
    ts_a = tr_a.init(params)
    batch_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(batch))
    assert cost_a.argument_bytes == param_bytes(ts_a) + batch_bytes
    # and its temporaries hold no copy of the base weights: the reference forward adds
    # less than a tenth of them over a step with no reference at all (SimPO)
    tr_none = nj.post.preference_trainer(
        model, optax.sgd(1e-2), loss="simpo", reference=None, trainable=mask
    )
    cost_none = nj.finetune.step_cost(tr_none.step, tr_none.init(params), batch)
    assert cost_a.temp_bytes - cost_none.temp_bytes < 0.1 * param_bytes(base)


def test_reference_sources_agree_and_the_loss_is_the_pure_function():
    model, data, batch, base, params, mask = _unpack(_setup())
    inputs = nj.post.precompute_reference(model, base, data.inputs, data.targets, batch_size=5)
    assert inputs["reference_logps"].shape == (len(RECORDS), 2)
    pre_batch = ({k: v[:4] for k, v in inputs.items()}, data.targets[:4])
    loss_options = {"beta": 0.3, "label_smoothing": 0.1}
    tr_a = nj.post.preference_trainer(
        model, optax.sgd(0.0), trainable=mask, loss_options=loss_options
    )
    tr_c = nj.post.preference_trainer(
        model, optax.sgd(0.0), reference="precomputed", trainable=mask, loss_options=loss_options
    )
    _, (m_a,) = _run(tr_a, params, [batch])
    _, (m_c,) = _run(tr_c, params, [pre_batch])
    for name in m_a:
        np.testing.assert_allclose(m_c[name], m_a[name], rtol=1e-5, atol=1e-6)
    # the same loss from log-probs computed apart: per side, a row of its own
    seq = lambda p, side: (
        nj.post.sequence_logprobs(
            model.apply(p, {}, {k: batch[0][k][:, side] for k in MODEL_KEYS})[0], batch[1][:, side]
        ).sum
    )
    want, metrics = nj.post.dpo_loss(
        seq(params, 0), seq(params, 1), seq(base, 0), seq(base, 1), **loss_options
    )
    np.testing.assert_allclose(m_a["loss"], float(want), rtol=1e-5)
    np.testing.assert_allclose(
        m_a["rewards/margins"], float(metrics["rewards/margins"]), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo", "orpo"])
def test_every_loss_trains_through_the_trainer(loss):
    model, _data, batch, _base, params, mask = _unpack(_setup())
    reference = "adapters" if nj.post.PREFERENCE_LOSSES[loss].reference else None
    tr = nj.post.preference_trainer(
        model, optax.adam(3e-2), loss=loss, reference=reference, trainable=mask
    )
    _, ms = _run(tr, params, [batch] * 4)
    assert ms[-1]["loss"] < ms[0]["loss"]
    assert {"rewards/chosen", "rewards/accuracies", "logps/rejected"} <= set(ms[0])


def test_quantized_reference_tree():
    model, _data, batch, base, params, mask = _unpack(_setup())
    q = nj.finetune.quantize(base)  # int8 kernels (the embedding stays float here)
    assert param_bytes(q) < 0.6 * param_bytes(base)
    tr_q = nj.post.preference_trainer(model, optax.sgd(0.0), reference=q, trainable=mask)
    tr_a = nj.post.preference_trainer(model, optax.sgd(0.0), trainable=mask)
    _, (m_q,) = _run(tr_q, params, [batch])
    _, (m_a,) = _run(tr_a, params, [batch])
    np.testing.assert_allclose(m_q["loss"], m_a["loss"], rtol=0.05)
    assert m_q["loss"] != m_a["loss"]  # it did use the quantized weights


def test_accumulation_keeps_pairs_whole_and_fit_logs_the_metrics(tmp_path):
    model, _data, batch, _base, params, mask = _unpack(_setup())
    tr1 = nj.post.preference_trainer(model, optax.sgd(0.1), trainable=mask)
    tr2 = nj.post.preference_trainer(model, optax.sgd(0.1), trainable=mask, accumulate=2)
    ts1, _ = _run(tr1, params, [batch])
    ts2, _ = _run(tr2, params, [batch])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ts1.params, ts2.params
    )
    it = nj.data.preference_batches(RECORDS, TOK, 10, 4, eos_id=0, epochs=2)
    ts, history = nj.fit(
        tr1, tr1.init(params), it, log_every=2, checkpoint_dir=str(tmp_path), checkpoint_every=3
    )
    assert int(ts.step) == 6 and "rewards/accuracies" in history["train"][-1]
    assert nj.checkpoint.latest(str(tmp_path)) is not None


def test_bad_arguments():
    model = nj.models.CausalLM(CFG)
    opt = optax.sgd(0.1)
    with pytest.raises(nj.ArgumentError, match="loss: expected one of"):
        nj.post.preference_trainer(model, opt, loss="kto")
    with pytest.raises(nj.ArgumentError, match=r"\['gamma'\] are not options of the 'dpo' loss"):
        nj.post.preference_trainer(model, opt, loss_options={"gamma": 1.0})
    with pytest.raises(nj.ArgumentError, match="needs a reference, got None"):
        nj.post.preference_trainer(model, opt, reference=None)
    with pytest.raises(nj.ArgumentError, match="takes no reference"):
        nj.post.preference_trainer(model, opt, loss="simpo", reference="precomputed")
    with pytest.raises(nj.ArgumentError, match="reference: expected"):
        nj.post.preference_trainer(model, opt, reference="copy")
    s = _setup()
    batch, params, mask = s.batch, s.params, s.mask
    tr = nj.post.preference_trainer(model, opt, reference="precomputed", trainable=mask)
    with pytest.raises(nj.DataError, match="reference_logps"):
        tr.step(tr.init(params), batch)
    tr = nj.post.preference_trainer(model, opt, trainable=mask)
    flat = ({k: v[:, 0] for k, v in batch[0].items()}, batch[1][:, 0])
    with pytest.raises(nj.DataError, match=r"shape \(B, 2, T\)"):
        tr.step(tr.init(params), flat)


def test_lazy_logits_keep_both_passes_chunked_and_change_nothing():
    """A model whose training outputs are LazyLogits: the policy's and the reference's
    log-probs stay lazy (never (B, 2, T, V)), and the steps equal the plain logits' ones."""
    import dataclasses

    _model, _data, batch, base, _params, _mask = _unpack(_setup())
    # adapters in the blocks only: a head with adapters always gives the logits
    params, mask = nj.finetune.add_lora(base, jax.random.key(1), "blocks/**/kernel", rank=4)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if path[-1].key == "lora_b" else x, params
    )
    lazy_model = nj.models.CausalLM(dataclasses.replace(CFG, lazy_logits_from=1))
    plain_model = nj.models.CausalLM(dataclasses.replace(CFG, lazy_logits_from=None))
    out, _ = nj.post.preference_model(lazy_model).apply(params, {}, batch[0], train=True)
    assert isinstance(out["logits"], nj.losses.LazyLogits)
    assert isinstance(out["reference_logits"], nj.losses.LazyLogits)
    # the head runs over the response positions only: R of the T = 10
    r = batch[0]["response_index"].shape[-1]
    assert r < 10 and out["reference_logits"].shape == (4, 2, r, CFG.vocab_size)
    lazy = _dpo_run(lazy_model, params, mask, batch)
    _assert_runs_agree(lazy, _dpo_run(plain_model, params, mask, batch))
    assert lazy[1][0]["rewards/margins"] != 0  # lora_b != 0: policy and reference differ


def _dpo_run(model, params, mask, batch):
    """Two DPO steps (adapters-off reference) on ``batch``: ``(train state, metrics)``."""
    return _run(
        nj.post.preference_trainer(model, optax.adam(1e-2), trainable=mask), params, [batch] * 2
    )


def _assert_runs_agree(a, b):
    """Two ``(train state, metrics)`` runs: the same metrics and params (1e-5)."""
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, a[1], b[1])
    jax.tree.map(close, a[0].params, b[0].params)


def test_response_index_computes_the_head_over_responses_only_and_changes_nothing():
    """With inputs["response_index"] (load_preference's) the logits are gathered at the
    response positions before the head; the losses, metrics and updates equal those of
    the same batch without the index (every position's logits, prompt ones masked)."""
    model, _data, batch, _base, params, mask = _unpack(_setup())
    full = ({k: batch[0][k] for k in MODEL_KEYS}, batch[1])
    index = batch[0]["response_index"]
    assert index.shape[-1] < batch[1].shape[-1]
    out, _ = nj.post.preference_model(model).apply(params, {}, batch[0])
    out_full, _ = nj.post.preference_model(model).apply(params, {}, full[0])
    got = np.asarray(out["logits"])
    want = np.take_along_axis(np.asarray(out_full["logits"]), np.maximum(index, 0)[..., None], 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    _assert_runs_agree(_dpo_run(model, params, mask, batch), _dpo_run(model, params, mask, full))
