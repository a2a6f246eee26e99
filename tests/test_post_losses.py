"""Sequence log-probabilities against transformers; preference losses against NumPy
transcriptions of the papers' formulas, TRL's own loss code, and finite differences."""

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from tests import hf_reference

IGNORE = nj.data.IGNORE_INDEX


# ---------------------------------------------------------------- sequence log-probs


@pytest.fixture(scope="module")
def tiny_qwen2():
    pytest.importorskip("transformers")
    model = hf_reference.hf_model("qwen2")
    cfg = hf_reference.nnjax_config(model)
    params = jax.tree.map(jnp.asarray, hf_reference.nnjax_params(model))
    return model, cfg, params


def _torch_logprobs(model, ids, prompt_len):
    """Summed log p of ids[prompt_len:] given the prefix, by transformers (float64 sum)."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(ids)[None]).long()).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1]
    picked = logp.gather(-1, torch.from_numpy(np.asarray(ids[1:])).long()[:, None])[:, 0]
    picked = picked[prompt_len - 1 :]  # position t predicts ids[t + 1]
    return float(picked.sum()), float(picked.mean())


def test_sequence_logprobs_match_transformers_prompt_masked(tiny_qwen2):
    model, cfg, params = tiny_qwen2
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(3, 10)).astype(np.int32)
    prompt_lens = [3, 5, 7]
    targets = np.full((3, 9), IGNORE, np.int32)
    for b, p in enumerate(prompt_lens):
        targets[b, p - 1 :] = ids[b, p:]
    logits, _ = nj.models.CausalLM(cfg).apply(params, {}, jnp.asarray(ids[:, :-1]))
    got = nj.post.sequence_logprobs(logits, jnp.asarray(targets))
    for b, p in enumerate(prompt_lens):
        want_sum, want_mean = _torch_logprobs(model, ids[b], p)
        np.testing.assert_allclose(float(got.sum[b]), want_sum, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(got.mean[b]), want_mean, rtol=1e-4, atol=1e-4)
        assert int(got.count[b]) == 10 - p


def test_packed_rows_give_one_value_per_example(tiny_qwen2):
    model, cfg, params = tiny_qwen2
    rng = np.random.default_rng(1)
    examples = [rng.integers(3, cfg.vocab_size, size=n).astype(np.int32) for n in (6, 5, 7)]
    prompts = [2, 3, 4]
    learn = [np.arange(len(e)) >= p for e, p in zip(examples, prompts, strict=True)]
    inputs, targets = nj.data.pack(list(zip(examples, learn, strict=True)), 12)
    assert inputs["ids"].shape[0] == 2  # 5 + 4 positions in row 0, 6 in row 1
    logits, _ = nj.models.CausalLM(cfg).apply(params, {}, jax.tree.map(jnp.asarray, inputs))
    got = nj.post.sequence_logprobs(
        logits, jnp.asarray(targets), segment_ids=jnp.asarray(inputs["segment_ids"]), num_segments=2
    )
    where = [(0, 0), (0, 1), (1, 0)]
    for (row, col), e, p in zip(where, examples, prompts, strict=True):
        want_sum, want_mean = _torch_logprobs(model, e, p)
        np.testing.assert_allclose(float(got.sum[row, col]), want_sum, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(got.mean[row, col]), want_mean, rtol=1e-4, atol=1e-4)
    assert got.count.tolist() == [[4, 2], [3, 0]]  # the empty second segment of row 1 counts 0


def test_sequence_logprobs_errors():
    with pytest.raises(nj.ShapeError, match=r"targets\.shape"):
        nj.post.sequence_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(nj.ShapeError, match="num_segments"):
        nj.post.sequence_logprobs(
            jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), segment_ids=jnp.ones((2, 3), int)
        )
    with pytest.raises(nj.ShapeError, match=r"mask\.shape"):
        nj.post.sequence_logprobs(
            jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), mask=jnp.ones((2, 2), bool)
        )


# ---------------------------------------------------------------- losses vs NumPy


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _np_dpo(c, r, rc, rr, beta, eps):  # Rafailov et al. eq. 7; cDPO's flipped-label mix
    h = (c - r) - (rc - rr)
    return np.mean(-(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h))


def _np_ipo(c, r, rc, rr, beta):  # Azar et al. eq. 17
    return np.mean(((c - r) - (rc - rr) - 1 / (2 * beta)) ** 2)


def _np_hinge(c, r, rc, rr, beta):  # SLiC's calibration loss on the DPO margin
    return np.mean(np.maximum(0.0, 1 - beta * ((c - r) - (rc - rr))))


def _np_simpo(c, r, beta, gamma):  # Meng et al. eq. 6 on mean log-probs
    return np.mean(-_logsig(beta * c - beta * r - gamma))


def _np_orpo(c, r, nll, lam):  # Hong et al. eq. 4-7: odds(y) = p / (1 - p)
    pc, pr = np.exp(c), np.exp(r)
    log_or = np.log(pc / (1 - pc)) - np.log(pr / (1 - pr))
    return nll - lam * np.mean(_logsig(log_or))


def _logps(seed, n=6, scale=20.0):
    rng = np.random.default_rng(seed)
    return [-rng.uniform(0.5, scale, n) for _ in range(4)]


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_against_numpy(eps):
    c, r, rc, rr = _logps(0)
    loss, m = nj.post.dpo_loss(c, r, rc, rr, beta=0.3, label_smoothing=eps)
    np.testing.assert_allclose(float(loss), _np_dpo(c, r, rc, rr, 0.3, eps), rtol=1e-5)
    cr, rr_ = 0.3 * (c - rc), 0.3 * (r - rr)
    np.testing.assert_allclose(float(m["rewards/chosen"]), cr.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), rr_.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/margins"]), (cr - rr_).mean(), rtol=1e-5, atol=1e-6)
    assert float(m["rewards/accuracies"]) == pytest.approx(np.mean(cr > rr_))
    np.testing.assert_allclose(float(m["logps/chosen"]), c.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["logps/rejected"]), r.mean(), rtol=1e-6)


def test_ipo_hinge_simpo_orpo_against_numpy():
    c, r, rc, rr = _logps(1)
    np.testing.assert_allclose(
        float(nj.post.ipo_loss(c / 10, r / 10, rc / 10, rr / 10, beta=0.5)[0]),
        _np_ipo(c / 10, r / 10, rc / 10, rr / 10, 0.5),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        float(nj.post.hinge_loss(c, r, rc, rr, beta=0.05)[0]),
        _np_hinge(c, r, rc, rr, 0.05),
        rtol=1e-5,
    )
    cm, rm = c / 10, r / 10  # per-token means
    np.testing.assert_allclose(
        float(nj.post.simpo_loss(cm, rm, beta=2.5, gamma=1.2)[0]),
        _np_simpo(cm, rm, 2.5, 1.2),
        rtol=1e-5,
    )
    loss, m = nj.post.orpo_loss(cm, rm, jnp.asarray(1.7), beta=0.25)
    np.testing.assert_allclose(float(loss), _np_orpo(cm, rm, 1.7, 0.25), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/chosen"]), 0.25 * cm.mean(), rtol=1e-5)


def test_orpo_is_accurate_near_probability_one():
    # log(1 - e^x) for x -> 0: expm1 keeps digits that 1 - exp(x) loses
    c, r = np.array([-1e-6]), np.array([-2.0])
    _, m = nj.post.orpo_loss(c, r, jnp.asarray(0.0), beta=1.0)
    want = (c - r) - (np.log(-np.expm1(c)) - np.log(-np.expm1(r)))
    np.testing.assert_allclose(float(m["log_odds_chosen"]), want[0], rtol=1e-5)


# ---------------------------------------------------------------- losses vs TRL


def _trl_dpo(loss_type, c, r, rc, rr, lengths, beta):
    """TRL's DPOTrainer._compute_loss on given log-probs (a model stub returning them)."""
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    b, t = len(c), int(max(lengths.max(), 1)) + 1
    mask = torch.zeros(2 * b, t)
    for i, n in enumerate(lengths):
        mask[i, 1 : n + 1] = 1
    per_token = torch.zeros(2 * b, t - 1, dtype=torch.float64)
    per_token[:, 0] = torch.from_numpy(np.concatenate([c, r]))  # the summed logps, one slot

    def model(**kw):
        z = torch.zeros(2 * b, t - 1)
        return types.SimpleNamespace(
            log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None
        )

    model.training = True  # type: ignore[attr-defined]
    ident = types.SimpleNamespace(
        device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
    )
    stub = types.SimpleNamespace(
        model=model,
        accelerator=ident,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": torch.cat([mask[:b], mask[:b]]),
        "ref_chosen_logps": torch.from_numpy(rc),
        "ref_rejected_logps": torch.from_numpy(rr),
    }
    loss = trl.DPOTrainer._compute_loss(stub, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_family_against_trl(loss_type):
    c, r, rc, rr = _logps(2)
    lengths = np.array([3, 7, 1, 4, 9, 2])
    trl_loss, trl_m = _trl_dpo(loss_type, c, r, rc, rr, lengths, beta=0.2)
    if loss_type == "ipo":  # TRL divides by the completion lengths: the per-token means
        ours, m = nj.post.ipo_loss(c / lengths, r / lengths, rc / lengths, rr / lengths, beta=0.2)
    else:
        fn = {"sigmoid": nj.post.dpo_loss, "hinge": nj.post.hinge_loss}[loss_type]
        ours, m = fn(c, r, rc, rr, beta=0.2)
    np.testing.assert_allclose(float(ours), trl_loss, rtol=1e-5)
    if loss_type != "ipo":  # TRL logs the summed-logps rewards for every loss type
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            np.testing.assert_allclose(float(m[name]), trl_m[name], rtol=1e-5, atol=1e-6)
        for name in ("logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(float(m[name]), trl_m[name], rtol=1e-5)


def test_simpo_and_orpo_against_trl():
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    c, r, _, _ = _logps(3)
    cm, rm = c / 10, r / 10
    acc = types.SimpleNamespace(device="cpu")
    cpo = types.SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.7,
        beta=2.0,
        label_smoothing=0.1,
        accelerator=acc,
    )
    losses, cr, rr = CPOTrainer.cpo_loss(cpo, torch.from_numpy(cm), torch.from_numpy(rm))
    loss, m = nj.post.simpo_loss(cm, rm, beta=2.0, gamma=0.7, label_smoothing=0.1)
    np.testing.assert_allclose(float(loss), float(losses.mean()), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/chosen"]), float(cr.mean()), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), float(rr.mean()), rtol=1e-5)

    orpo = types.SimpleNamespace(beta=0.3, accelerator=acc)
    losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        orpo, torch.from_numpy(cm), torch.from_numpy(rm)
    )
    loss, m = nj.post.orpo_loss(cm, rm, jnp.asarray(1.25), beta=0.3)
    np.testing.assert_allclose(
        float(loss), 1.25 - float(losses.mean()), rtol=1e-5
    )  # TRL: nll - mean
    np.testing.assert_allclose(float(m["log_odds_ratio"]), float(ratio), rtol=1e-5)
    np.testing.assert_allclose(float(m["log_odds_chosen"]), float(log_odds), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/chosen"]), float(cr.mean()), rtol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_gradients_by_finite_differences_on_a_tiny_model(name):
    """d loss / d params through a tiny language model and sequence_logprobs, in float64."""
    with jax.enable_x64(True):
        cfg = nj.models.CausalLMConfig(
            vocab_size=11, hidden_size=8, num_heads=2, mlp_hidden=12, num_layers=1, max_position=16
        )
        model = nj.models.CausalLM(cfg)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(4, 6)))
        params, _ = model.init(jax.random.key(0), ids)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        ref = jax.tree.map(lambda x: x + 0.05, params)
        targets = jnp.where(jnp.arange(6)[None, :] >= 2, jnp.roll(ids, -1, axis=1), IGNORE)
        entry = nj.post.PREFERENCE_LOSSES[name]

        def logps(p):
            lp = nj.post.sequence_logprobs(model.apply(p, {}, ids)[0], targets)
            v = lp.sum if entry.logps == "sum" else lp.mean
            return v[0::2], v[1::2], lp

        def loss(p):
            c, r, lp = logps(p)
            args = [c, r]
            if entry.reference:
                rc, rr, _ = logps(ref)
                args += [rc, rr]
            if entry.nll:
                args.append(-jnp.sum(lp.sum[0::2]) / jnp.sum(lp.count[0::2]))
            return entry.fn(*args, beta=0.5)[0]

        flat, unravel = jax.flatten_util.ravel_pytree(params)
        flat_loss = jax.jit(lambda f: loss(unravel(f)))
        g = jax.jit(jax.grad(flat_loss))(flat)
        picks = np.random.default_rng(1).choice(flat.size, 10, replace=False)
        steps = jnp.zeros((len(picks), flat.size)).at[np.arange(len(picks)), picks].set(1e-6)
        fd = (
            jax.vmap(flat_loss)(flat[None] + steps) - jax.vmap(flat_loss)(flat[None] - steps)
        ) / 2e-6
        assert np.abs(np.asarray(g)[picks]).max() > 1e-4  # the picks are not all dead params
        np.testing.assert_allclose(np.asarray(g)[picks], np.asarray(fd), rtol=1e-4, atol=1e-9)
