"""GRPO (Shao et al. 2024): sample a group of completions per prompt, reward them, and push
the policy toward the better-than-its-group ones, with a clipped ratio and a KL penalty.

One GRPO step, :func:`grpo_trainer`'s ``step(ts, (prompt_ids, prompt_lengths), rng)``:

1. sample ``G`` completions of each prompt with :func:`nnjax.models.make_generate`
   (temperature, top-p; one compiled program for the run's prompt shape);
2. decode them and score them with the user's reward functions (plain Python over
   text, several summed with weights);
3. normalise each reward within its group: :func:`group_advantages`;
4. update with :func:`grpo_loss`, the clipped policy-ratio objective with a KL
   penalty to the reference (the params with the adapters off, as the preference
   trainer's ``reference="adapters"``; or a params tree), ``updates_per_rollout``
   times on the same samples (the ratio's "old" policy is the one that sampled).

Generation and the update are each compiled once; ``step`` alternates them without
recompiling (the prompt batch keeps its shape). ``step`` has ``nj.fit``'s signature,
so ``nj.fit`` drives it over batches of prompts (:func:`encode_prompts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnjax.core.checks import check_int
from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError, DataError
from nnjax.finetune.adapters import remove_adapters
from nnjax.models.causal_lm import CausalLM
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.generate import make_generate
from nnjax.post.logprobs import token_logprobs
from nnjax.post.trainer import reference_inputs, wrapper_state
from nnjax.training.trainer import TrainerFunctions, TrainState, trainer

__all__ = [
    "group_advantages",
    "grpo_loss",
    "encode_prompts",
    "completion_mask",
    "GRPOFunctions",
    "grpo_trainer",
]

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def group_advantages(
    rewards: Any, group_size: int, *, scale: bool = True, eps: float = 1e-4
) -> np.ndarray:
    """``(r - mean of its group) / (std of its group + eps)``, groups of ``group_size`` in a row.

    The std is the sample one (``ddof=1``, as TRL's ``torch.std``); ``scale=False``
    leaves it out (Dr. GRPO: only the mean is subtracted).

    Args:
        rewards: ``(B * G,)``, the ``G`` completions of each prompt next to each other.
        group_size: ``G >= 2``.

    Returns:
        float32 ``(B * G,)``.

    Example:
        >>> [round(float(a), 3) for a in nj.post.group_advantages(np.array([1.0, 0, 0, 0]), 2)]
        [0.707, -0.707, 0.0, 0.0]
    """
    g = check_int(group_size, "group_size", minimum=2)
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or len(r) % g:
        raise ArgumentError(f"rewards: expected shape (B * {g},), got {r.shape}")
    groups = r.reshape(-1, g)
    out = groups - groups.mean(axis=1, keepdims=True)
    if scale:
        out = out / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    return out.reshape(-1).astype(np.float32)


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective (the paper's eq. 3), per token, averaged per completion then over them.

    With ``ratio = exp(logps - old_logps)`` and ``A`` the completion's advantage, each
    counted token costs ``-min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A)
    + beta KL`` where ``KL = exp(ref - logps) - (ref - logps) - 1`` (the k3 estimator,
    unbiased and >= 0).

    Args:
        logps, old_logps, ref_logps: float ``(B, L)`` per-token log-probabilities of
            the sampled tokens under the policy, the policy that sampled (no gradient)
            and the reference (``None`` with ``beta == 0``).
        advantages: ``(B,)``.
        mask: bool ``(B, L)``, the completion tokens.
        epsilon, epsilon_high: the clip range (``epsilon_high`` defaults to ``epsilon``).
        beta: the KL penalty's weight.

    Returns:
        ``(loss, metrics)`` with ``kl`` (mean per-token KL over counted tokens) and
        ``clip_ratio`` (the fraction of counted tokens whose clipped term is the min,
        i.e. whose gradient the clip stops).

    Example:
        >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
        >>> loss, m = nj.post.grpo_loss(lp, lp, lp, jnp.array([1.0]), jnp.ones((1, 2), bool))
        >>> float(loss), float(m["kl"])
        (-1.0, 0.0)
    """
    hi = epsilon if epsilon_high is None else epsilon_high
    mask = jnp.asarray(mask, bool)
    m = mask.astype(jnp.float32)
    a = jnp.asarray(advantages, jnp.float32)[:, None]
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + hi)
    per_token = -jnp.minimum(ratio * a, clipped * a)
    if ref_logps is not None and beta:
        d = jax.lax.stop_gradient(ref_logps) - logps
        kl = jnp.exp(d) - d - 1
        per_token = per_token + beta * kl
    else:
        kl = jnp.zeros_like(per_token)
    lengths = jnp.maximum(jnp.sum(m, axis=1), 1)
    loss = jnp.mean(jnp.sum(per_token * m, axis=1) / lengths)
    is_clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + hi) & (a > 0))
    tokens = jnp.maximum(jnp.sum(m), 1)
    metrics = {
        "kl": jax.lax.stop_gradient(jnp.sum(kl * m) / tokens),
        "clip_ratio": jnp.sum(is_clipped * m) / tokens,
    }
    return loss, metrics


def encode_prompts(
    prompts: Sequence[str], tokenizer: Any, max_prompt_length: int, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as left-padded ids ``(N, P)`` and lengths ``(N,)`` (longer ones keep their end).

    Example:
        >>> ids, lengths = nj.post.encode_prompts(["ab", "c"], nj.data.ByteTokenizer(), 3)
        >>> ids.tolist(), lengths.tolist()
        ([[0, 97, 98], [0, 0, 99]], [2, 1])
    """
    p = check_int(max_prompt_length, "max_prompt_length")
    ids = np.full((len(prompts), p), pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, text in enumerate(prompts):
        enc = list(tokenizer.encode(text))[-p:]
        if not enc:
            raise DataError(f"prompts[{i}]: encodes to no token")
        ids[i, p - len(enc) :] = enc
        lengths[i] = len(enc)
    return ids, lengths


def completion_mask(completions: Any, eos: Sequence[int]) -> np.ndarray:
    """bool ``(B, N)``: each completion's tokens up to and including its first end token."""
    c = np.asarray(completions)
    is_eos = np.isin(c, np.asarray(list(eos) or [-1]))
    before = np.cumsum(is_eos, axis=1) - is_eos  # end tokens strictly before t
    return before == 0


class GRPOFunctions(NamedTuple):
    """What :func:`grpo_trainer` builds.

    Attributes:
        init: ``init(params) -> TrainState`` (copies, as ``nj.trainer``'s).
        step: ``step(ts, (prompt_ids (B, P), prompt_lengths (B,)), rng) -> (ts, metrics)``:
            one rollout and ``updates_per_rollout`` updates; ``nj.fit`` can drive it.
        rollout: ``rollout(params, prompt_ids, prompt_lengths, rng) -> (batch, metrics,
            texts)``: the sampled, scored batch the update trains on.
        generate: the compiled sampler, ``generate(params, prompt_ids, rng, lengths)``.
        trainer: the update's :class:`~nnjax.TrainerFunctions` (its ``step`` takes a
            rollout's batch).
        steps_per_call: 1 (for ``nj.fit``).
    """

    init: Callable[..., TrainState]
    step: Callable[..., tuple[TrainState, dict[str, Any]]]
    rollout: Callable[..., tuple[Any, dict[str, Any], list[str]]]
    generate: Callable[..., jax.Array]
    trainer: TrainerFunctions
    steps_per_call: int = 1


def _policy_model(model: Layer, reference: Any) -> Layer:
    """``apply`` gives per-token log-probs of ``inputs["targets"]``: the policy's and the reference's."""

    def split(inputs):
        x = {k: inputs[k] for k in ("ids", "positions", "segment_ids")}
        return x, inputs["targets"]

    def init(key, inputs):
        params, state = model.init(key, split(inputs)[0])
        return params, wrapper_state(state, {})

    def apply(params, state, inputs, *, rng=None, train=False):
        x, t = split(inputs)
        logits, model_state = model.apply(params, state.get("model", {}), x, rng=rng, train=train)
        out = {"logps": token_logprobs(logits, t, ignore_index=None)}
        if reference is not None:
            ref = remove_adapters(params) if reference == "adapters" else state.get("reference", {})
            ref_x = reference_inputs(x, logits)
            ref_logits, _ = model.apply(jax.lax.stop_gradient(ref), state.get("model", {}), ref_x)
            out["ref_logps"] = jax.lax.stop_gradient(
                token_logprobs(ref_logits, t, ignore_index=None)
            )
        return out, wrapper_state(model_state, state.get("reference", {}))

    return Layer(init, apply, getattr(model, "name", "grpo"))


def _reward_names(reward_fns: Sequence[RewardFn]) -> list[str]:
    names = [getattr(fn, "__name__", "") for fn in reward_fns]
    if any(not n or n.startswith("<") for n in names) or len(set(names)) != len(names):
        raise ArgumentError(
            f"reward_fns: each needs a unique __name__ (its metric's name), got {names}"
        )
    return names


def grpo_trainer(
    config: CausalLMConfig,
    optimizer: optax.GradientTransformation,
    reward_fns: Sequence[RewardFn],
    tokenizer: Any,
    *,
    group_size: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float | None = None,
    reward_weights: Sequence[float] | None = None,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    scale_rewards: bool = True,
    updates_per_rollout: int = 1,
    reference: Any = "adapters",
    eos_token_id: int | Sequence[int] | None = None,
    **trainer_options: Any,
) -> GRPOFunctions:
    """GRPO on a :class:`~nnjax.models.CausalLM`: sampling, rewards, and the clipped update.

    Args:
        config: the model's config (the sampler and the update build the model from it).
        optimizer: an optax ``GradientTransformation``.
        reward_fns: ``fn(prompts: list[str], completions: list[str]) -> floats``, one
            per completion; each is reported as ``rewards/<name>/mean``.
        tokenizer: ``decode(ids) -> str`` (the completions, without end and padding).
        group_size: ``G`` completions per prompt.
        max_new_tokens, temperature, top_p: the sampler's (see :func:`~nnjax.models.generate`).
        reward_weights: one weight per reward function (default all 1).
        beta: the KL penalty's weight (0: no reference forward).
        epsilon, epsilon_high: the clip range.
        scale_rewards: divide by the group's std (see :func:`group_advantages`).
        updates_per_rollout: optimizer steps on each sampled batch (``mu``).
        reference: ``"adapters"`` (the params without adapters) or a params tree.
        eos_token_id: what ends a completion (default ``config.eos_token_id``).
        **trainer_options: for :func:`nnjax.trainer` (``trainable``, ``compute_dtype``, ...).

    Returns:
        A :class:`GRPOFunctions`. Metrics: ``loss``, ``kl``, ``clip_ratio``, ``reward``,
        ``reward_std`` (mean within-group std), ``rewards/<name>/mean``,
        ``completions/mean_length``, ``frac_reward_zero_std``.
    """
    names = _reward_names(reward_fns)
    weights = np.ones(len(names)) if reward_weights is None else np.asarray(reward_weights, float)
    if weights.shape != (len(names),):
        raise ArgumentError(
            f"reward_weights: expected {len(names)} weights (one per reward function), got {weights.shape}"
        )
    g = check_int(group_size, "group_size", minimum=2)
    mu = check_int(updates_per_rollout, "updates_per_rollout")
    if not callable(getattr(tokenizer, "decode", None)):
        raise ArgumentError("tokenizer: expected an object with decode(ids) -> str")
    if not (reference == "adapters" or isinstance(reference, Mapping)):
        raise ArgumentError(f"reference: expected 'adapters' or a params dict, got {reference!r}")
    eos_value = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos_value is None else tuple(np.atleast_1d(eos_value).tolist())
    sampler = make_generate(
        config, max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos_value
    )
    wrapped = _policy_model(CausalLM(config), reference if beta else None)

    def loss_fn(outputs, targets):
        old = targets.get("old_logps", outputs["logps"])
        return grpo_loss(
            outputs["logps"],
            old,
            outputs.get("ref_logps"),
            targets["advantages"],
            targets["mask"],
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            beta=beta,
        )

    fns = trainer(wrapped, loss_fn, optimizer, **trainer_options)
    tree = reference if isinstance(reference, Mapping) and beta else {}

    def init(params: Any, state: Any = None) -> TrainState:
        return fns.init(params, wrapper_state({} if state is None else state, tree))

    def rollout(params, prompt_ids, prompt_lengths, rng):
        prompt_ids, prompt_lengths = np.asarray(prompt_ids), np.asarray(prompt_lengths)
        b, p = prompt_ids.shape
        ids_g = np.repeat(prompt_ids, g, axis=0)
        len_g = np.repeat(prompt_lengths, g, axis=0)
        out = np.asarray(sampler(params, ids_g, rng, len_g))
        comp = out[:, p:]
        cmask = completion_mask(comp, eos)
        decode = lambda row, keep: tokenizer.decode([int(i) for i in row[keep]])
        prompts = [decode(r, np.arange(p) >= p - n) for r, n in zip(ids_g, len_g, strict=True)]
        completions = [
            decode(c, m & ~np.isin(c, np.asarray(list(eos) or [-1])))
            for c, m in zip(comp, cmask, strict=True)
        ]
        scores = np.zeros((len(names), b * g))
        for k, fn in enumerate(reward_fns):
            got = np.asarray(fn(prompts, completions), np.float64)
            if got.shape != (b * g,):
                raise DataError(
                    f"reward function {names[k]!r} returned shape {got.shape}, expected "
                    f"({b * g},) (one reward per completion)"
                )
            scores[k] = got
        total = weights @ scores
        advantages = group_advantages(total, g, scale=scale_rewards)
        t = out.shape[1] - 1
        start = (p - len_g)[:, None]
        index = np.arange(t)[None, :]
        inputs = {
            "ids": out[:, :-1].astype(np.int32),
            "positions": np.maximum(index - start, 0).astype(np.int32),
            "segment_ids": (index >= start).astype(np.int32),
            "targets": out[:, 1:].astype(np.int32),
        }
        mask = np.zeros((b * g, t), bool)
        mask[:, p - 1 :] = cmask  # position t predicts token t + 1: the completion from p - 1
        metrics: dict[str, Any] = {
            f"rewards/{n}/mean": float(scores[k].mean()) for k, n in enumerate(names)
        }
        stds = total.reshape(-1, g).std(axis=1, ddof=1)
        metrics.update(
            reward=float(total.mean()),
            reward_std=float(stds.mean()),
            frac_reward_zero_std=float(np.mean(stds == 0)),
        )
        metrics["completions/mean_length"] = float(cmask.sum(axis=1).mean())
        return (inputs, {"advantages": advantages, "mask": mask}), metrics, completions

    def step(ts: TrainState, batch: Any, rng: jax.Array | None = None):
        prompt_ids, prompt_lengths = batch
        rng = jax.random.key(0) if rng is None else rng
        t0 = time.perf_counter()
        data, metrics, _ = rollout(ts.params, prompt_ids, prompt_lengths, rng)
        metrics["time/rollout_s"] = time.perf_counter() - t0
        if mu > 1:
            data[1]["old_logps"] = np.asarray(fns.predict(ts, data[0])["logps"])
        for _ in range(mu):
            ts, update = fns.step(ts, data)
            metrics.update(update)
        return ts, metrics

    return GRPOFunctions(init, step, rollout, sampler, fns._replace(init=init))
