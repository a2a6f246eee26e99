"""GRPO: group advantages and the clipped objective against NumPy; on a toy task the
held-out reward rises; generation and update alternate without compiling again."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj

# ---------------------------------------------------------------- pure parts vs NumPy


def test_group_advantages_against_numpy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=12)
    got = nj.post.group_advantages(r, 4)
    for k in range(3):
        grp = list(r[4 * k : 4 * k + 4])
        mean, std = statistics.mean(grp), statistics.stdev(grp)  # sample std, as torch.std
        want = [(x - mean) / (std + 1e-4) for x in grp]
        np.testing.assert_allclose(got[4 * k : 4 * k + 4], want, rtol=1e-5)
    np.testing.assert_allclose(
        nj.post.group_advantages(r, 4, scale=False), r - np.repeat(r.reshape(3, 4).mean(1), 4), 1e-6
    )
    with pytest.raises(nj.ArgumentError, match=r"shape \(B \* 5,\)"):
        nj.post.group_advantages(r, 5)


def _np_grpo(logps, old, ref, adv, mask, eps_lo, eps_hi, beta):
    """The GRPO paper's eq. 3 with the k3 KL estimator, written per token in loops."""
    b, t = logps.shape
    per_seq, kls, clipped, n = [], [], 0, 0
    for i in range(b):
        terms = []
        for j in range(t):
            if not mask[i, j]:
                continue
            ratio = np.exp(logps[i, j] - old[i, j])
            surrogate = min(ratio * adv[i], np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * adv[i])
            kl = np.exp(ref[i, j] - logps[i, j]) - (ref[i, j] - logps[i, j]) - 1
            terms.append(-surrogate + beta * kl)
            kls.append(kl)
            n += 1
            clipped += (ratio < 1 - eps_lo and adv[i] < 0) or (ratio > 1 + eps_hi and adv[i] > 0)
        per_seq.append(sum(terms) / max(len(terms), 1))
    return np.mean(per_seq), np.mean(kls), clipped / n


def test_grpo_loss_against_numpy():
    rng = np.random.default_rng(1)
    b, t = 6, 7
    logps = -rng.uniform(0.1, 3, (b, t))
    old = logps + rng.normal(0, 0.3, (b, t))  # ratios well outside [0.8, 1.3] for some
    ref = logps + rng.normal(0, 0.5, (b, t))
    adv = rng.normal(size=b)
    mask = rng.uniform(size=(b, t)) > 0.3
    loss, m = nj.post.grpo_loss(logps, old, ref, adv, mask, epsilon=0.2, epsilon_high=0.3, beta=0.1)
    want, kl, clip = _np_grpo(logps, old, ref, adv, mask, 0.2, 0.3, 0.1)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_ratio"]), clip, rtol=1e-6)
    assert 0 < clip < 1
    # the gradient: d/d logps of the unclipped, KL-free objective is -A * ratio / len
    g = jax.grad(lambda x: nj.post.grpo_loss(x, old, None, adv, mask, epsilon=1e9, beta=0.0)[0])(
        jnp.asarray(logps)
    )
    want_g = -adv[:, None] * np.exp(logps - old) * mask / mask.sum(1, keepdims=True) / b
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-8)


def test_completion_mask_counts_through_the_first_end_token():
    c = np.array([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert nj.post.completion_mask(c, (2,)).astype(int).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]


# ---------------------------------------------------------------- the toy task


class Letters:
    """A 4-token tokenizer: 'a'..'d'."""

    def encode(self, text):
        return ["abcd".index(ch) for ch in text]

    def decode(self, ids):
        return "".join("abcd"[i] for i in ids)


def repeat_last(prompts, completions):
    """The fraction of the completion's letters that repeat the prompt's last letter."""
    return [c.count(p[-1]) / max(len(c), 1) for p, c in zip(prompts, completions, strict=True)]


def length_bonus(prompts, completions):
    return [0.0 for _ in completions]


def test_grpo_raises_the_held_out_reward_without_recompiling():
    tok = Letters()
    cfg = nj.models.CausalLMConfig(
        vocab_size=4, hidden_size=16, num_heads=2, mlp_hidden=32, num_layers=1, max_position=16
    )
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcd"), 3)) for _ in range(40)]
    train, held_out = words[:32], words[32:]
    base, _ = nj.models.CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    g = nj.post.grpo_trainer(
        cfg,
        optax.adam(5e-2),
        [repeat_last, length_bonus],
        tok,
        group_size=8,
        max_new_tokens=4,
        temperature=1.0,
        top_p=0.95,
        reward_weights=[1.0, 0.5],
        beta=0.02,
        reference=base,  # full fine-tuning: the KL is to the initial params, kept apart
        updates_per_rollout=2,
    )
    ids_h, len_h = nj.post.encode_prompts(held_out, tok, 3)

    def held_out_reward(ts):
        _, m, _ = g.rollout(ts.params, ids_h, len_h, jax.random.key(123))
        return m["rewards/repeat_last/mean"]

    ts = g.init(base)
    before = held_out_reward(ts)
    ids, lengths = nj.post.encode_prompts(train, tok, 3)
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)
    for i in range(14):
        if i == 2:  # the first steps compiled generation, the update and the old log-probs
            jax.monitoring.register_event_duration_secs_listener(listener)
        batch = (ids[8 * (i % 4) : 8 * (i % 4) + 8], lengths[8 * (i % 4) : 8 * (i % 4) + 8])
        ts, m = g.step(ts, batch, jax.random.key(i))
    jax.monitoring.unregister_event_duration_listener(listener)
    assert [e for e in compiles if e == "/jax/core/compile/backend_compile_duration"] == []
    after = held_out_reward(ts)
    assert before < 0.35 and after > before + 0.3, (before, after)
    for name in ("kl", "clip_ratio", "reward_std", "completions/mean_length", "loss"):
        assert np.isfinite(m[name])
    assert m["rewards/length_bonus/mean"] == 0.0 and m["completions/mean_length"] == 4.0


def test_bad_arguments():
    cfg = nj.models.CausalLMConfig(vocab_size=4, hidden_size=8, num_heads=2, mlp_hidden=8)
    with pytest.raises(nj.ArgumentError, match="unique __name__"):
        nj.post.grpo_trainer(cfg, optax.sgd(0.1), [lambda p, c: c], Letters())
    with pytest.raises(nj.ArgumentError, match="one per reward function"):
        nj.post.grpo_trainer(cfg, optax.sgd(0.1), [repeat_last], Letters(), reward_weights=[1, 2])
    with pytest.raises(nj.ArgumentError, match="group_size"):
        nj.post.grpo_trainer(cfg, optax.sgd(0.1), [repeat_last], Letters(), group_size=1)
