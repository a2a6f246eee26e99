"""Preference losses: pure functions of sequence log-probabilities.

Each takes the policy's log-probabilities of the chosen and the rejected response of
``B`` pairs (float ``(B,)``; and the reference policy's, where the loss has one) and
returns ``(loss, metrics)``: the mean loss over pairs and the metrics TRL reports,
under TRL's names:

- ``rewards/chosen``, ``rewards/rejected``: the mean implicit reward of each side
  (DPO: ``beta * (log pi - log pi_ref)``; SimPO and ORPO: ``beta * log pi``);
- ``rewards/margins``: the mean of ``chosen - rejected`` rewards;
- ``rewards/accuracies``: the fraction of pairs whose chosen reward is the higher;
- ``logps/chosen``, ``logps/rejected``: the mean of the log-probabilities passed in.

:data:`PREFERENCE_LOSSES` says, per loss, whether it needs a reference and which
log-probabilities it takes, as TRL computes them: the summed ones (DPO, hinge) or the
per-token mean (IPO, SimPO, ORPO).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "simpo_loss",
    "orpo_loss",
    "PreferenceLoss",
    "PREFERENCE_LOSSES",
]

Metrics = dict[str, jax.Array]


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> Metrics:
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(chosen_logps),
        "logps/rejected": jnp.mean(rejected_logps),
    }


def _f32(*xs: Any) -> list[jax.Array]:
    """At least float32 (float64 stays, for gradient checks)."""
    arrays = [jnp.asarray(x) for x in xs]
    return [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in arrays]


def _referenced(chosen, rejected, ref_chosen, ref_rejected, beta, losses_of):
    """The DPO family: a loss of ``h = (chosen - rejected) - (ref_chosen - ref_rejected)``."""
    chosen, rejected, ref_chosen, ref_rejected = _f32(chosen, rejected, ref_chosen, ref_rejected)
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    c_rewards = beta * jax.lax.stop_gradient(chosen - ref_chosen)
    r_rewards = beta * jax.lax.stop_gradient(rejected - ref_rejected)
    metrics = _metrics(c_rewards, r_rewards, *jax.lax.stop_gradient((chosen, rejected)))
    return jnp.mean(losses_of(h)), metrics


def dpo_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization (Rafailov et al. 2023), with conservative DPO's smoothing.

    With ``h = (chosen - rejected) - (ref_chosen - ref_rejected)`` (summed log-probs),
    the loss per pair is ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
    (``eps = label_smoothing``: the chance a label is flipped, cDPO; 0 is plain DPO).

    Args:
        chosen, rejected: the policy's log-probabilities of the two responses, ``(B,)``.
        ref_chosen, ref_rejected: the reference policy's, ``(B,)``.
        beta: the inverse temperature (the KL penalty's strength).
        label_smoothing: ``eps`` in ``[0, 0.5)``.

    Returns:
        ``(loss, metrics)``: the mean over pairs and TRL's metrics (module doc).

    Example:
        >>> loss, m = nj.post.dpo_loss(jnp.array([-5.0]), jnp.array([-9.0]),
        ...                            jnp.array([-6.0]), jnp.array([-8.0]))
        >>> round(float(loss), 4), round(float(m["rewards/margins"]), 4)
        (0.5981, 0.2)
    """
    smooth = float(label_smoothing)

    def losses(h):
        return -(1 - smooth) * jax.nn.log_sigmoid(beta * h) - smooth * jax.nn.log_sigmoid(-beta * h)

    return _referenced(chosen, rejected, ref_chosen, ref_rejected, beta, losses)


def ipo_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """Identity Preference Optimisation (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` per pair.

    ``h`` as in :func:`dpo_loss`; TRL passes per-token mean log-probabilities (the
    preference trainer does too, see :data:`PREFERENCE_LOSSES`).

    Example:
        >>> loss, _ = nj.post.ipo_loss(jnp.array([-1.0]), jnp.array([-2.0]),
        ...                            jnp.array([-1.0]), jnp.array([-1.5]), beta=0.5)
        >>> float(loss)
        0.25
    """
    return _referenced(
        chosen, rejected, ref_chosen, ref_rejected, beta, lambda h: (h - 1 / (2 * beta)) ** 2
    )


def hinge_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """The hinge (SLiC) loss: ``max(0, 1 - beta h)`` per pair, ``h`` as in :func:`dpo_loss`.

    Example:
        >>> loss, _ = nj.post.hinge_loss(jnp.array([-5.0]), jnp.array([-9.0]),
        ...                              jnp.array([-6.0]), jnp.array([-8.0]), beta=0.25)
        >>> float(loss)
        0.5
    """
    return _referenced(
        chosen, rejected, ref_chosen, ref_rejected, beta, lambda h: jax.nn.relu(1 - beta * h)
    )


def simpo_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """SimPO (Meng et al. 2024): reference-free, on length-normalised log-probabilities.

    ``-(1 - eps) log sigmoid(beta (chosen - rejected) - gamma) - eps log sigmoid(-(...))``
    per pair, ``chosen`` and ``rejected`` the per-token *mean* log-probabilities; the
    rewards are ``beta * chosen`` and ``beta * rejected``.

    Args:
        chosen, rejected: ``(B,)`` mean log-probabilities of the two responses.
        beta: the reward scale.
        gamma: the target margin (TRL's ``simpo_gamma``).
        label_smoothing: ``eps``, as in :func:`dpo_loss`.

    Example:
        >>> loss, _ = nj.post.simpo_loss(jnp.array([-1.0]), jnp.array([-1.25]))
        >>> round(float(loss), 6)  # -log sigmoid(2 * 0.25 - 0.5)
        0.693147
    """
    chosen, rejected = _f32(chosen, rejected)
    z = beta * (chosen - rejected) - gamma
    eps = float(label_smoothing)
    losses = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    c, r = jax.lax.stop_gradient((chosen, rejected))
    return jnp.mean(losses), _metrics(beta * c, beta * r, c, r)


def _log1m_exp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 (``expm1``)."""
    return jnp.log(-jnp.expm1(x))


def orpo_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    nll: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """ORPO (Hong et al. 2024): the SFT loss on chosen plus an odds-ratio term, no reference.

    ``log_odds = (chosen - rejected) - (log(1 - e^chosen) - log(1 - e^rejected))`` on
    per-token *mean* log-probabilities; the loss is ``nll - beta * mean(log sigmoid(log_odds))``
    with ``nll`` the SFT loss (cross-entropy) on the chosen responses; rewards
    ``beta * chosen``, ``beta * rejected``. Extra metrics: ``nll_loss``,
    ``log_odds_ratio`` (mean ``log sigmoid(log_odds)``), ``log_odds_chosen`` (mean ``log_odds``).

    Args:
        chosen, rejected: ``(B,)`` mean log-probabilities (each ``< 0``).
        nll: scalar, the cross-entropy of the chosen responses.
        beta: ``lambda`` in the paper, the odds-ratio term's weight.

    Example:
        >>> loss, m = nj.post.orpo_loss(jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.2])),
        ...                             jnp.array(1.0), beta=1.0)
        >>> round(float(m["log_odds_chosen"]), 4)  # log(odds 1) - log(odds 0.25)
        1.3863
    """
    chosen, rejected = _f32(chosen, rejected)
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    ratio = jax.nn.log_sigmoid(log_odds)
    (nll,) = _f32(nll)
    loss = nll - beta * jnp.mean(ratio)
    c, r = jax.lax.stop_gradient((chosen, rejected))
    metrics = _metrics(beta * c, beta * r, c, r)
    metrics.update(
        nll_loss=jax.lax.stop_gradient(nll),
        log_odds_ratio=jax.lax.stop_gradient(jnp.mean(ratio)),
        log_odds_chosen=jax.lax.stop_gradient(jnp.mean(log_odds)),
    )
    return loss, metrics


class PreferenceLoss(NamedTuple):
    """How the preference trainer calls one loss.

    Attributes:
        fn: the loss function.
        reference: whether it takes the reference policy's log-probabilities.
        logps: ``"sum"`` or ``"mean"`` (per token) log-probabilities, as TRL passes them.
        nll: whether it takes the chosen responses' cross-entropy (ORPO).
    """

    fn: Callable[..., tuple[jax.Array, Metrics]]
    reference: bool
    logps: str
    nll: bool = False


PREFERENCE_LOSSES: Mapping[str, PreferenceLoss] = MappingProxyType(
    {
        "dpo": PreferenceLoss(dpo_loss, True, "sum"),
        "ipo": PreferenceLoss(ipo_loss, True, "mean"),
        "hinge": PreferenceLoss(hinge_loss, True, "sum"),
        "simpo": PreferenceLoss(simpo_loss, False, "mean"),
        "orpo": PreferenceLoss(orpo_loss, False, "mean", nll=True),
    }
)
"""The losses by name: ``preference_trainer(..., loss="dpo")``."""
