"""The auxiliary-loss channel: how a layer hands a quantity the objective needs to the trainer.

A layer that produces an auxiliary loss (a mixture of experts' load-balancing loss, a
router z-loss) writes *statistics* into the state its ``apply`` returns, under the
reserved key :data:`AUX`::

    state = {"aux": {"load_balance": {"tokens": (E,), "probs": (E,), "weight": ()},
                     "router_z": {"value": (), "weight": ()}}}

The channel is output only: ``init`` does not create it and ``apply`` ignores what comes
in under it. Combinators carry it like any state (``serial`` and ``residual`` nest it
under the child's name, ``repeat`` stacks one copy per layer on its scan axis), and
whoever keeps state between calls drops it with :func:`strip` (the trainer does).

The objective side, :func:`losses`: each leaf of a *kind* (``load_balance``) is averaged
over every layer that reported it (every occurrence in the tree, every stacked copy:
the statistic of all layers' tokens together, as Hugging Face concatenates the layers'
router logits), the kind's loss is computed from the averages (:data:`KINDS`; a kind
not in the table reports its ``value`` leaf), and multiplied by its averaged ``weight``.
The trainer adds the weighted sum to the loss it differentiates and reports each kind's
unweighted loss as the metric ``aux/{kind}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import LayerError
from nnjax.core.paths import STACKED, flatten, unflatten

__all__ = ["AUX", "KINDS", "strip", "statistics", "losses"]

AUX = "aux"
"""The reserved state key under which a layer reports auxiliary-loss statistics."""


def _load_balance(stats: Mapping[str, jax.Array]) -> jax.Array:
    # Switch Transformer eq. 4-6 as transformers' load_balancing_loss_func: E * sum_e f_e * P_e,
    # f_e the fraction of routed (token, slot) pairs per token that chose e, P_e the mean
    # router probability of e.
    tokens, probs = stats["tokens"], stats["probs"]
    return tokens.shape[-1] * jnp.sum(tokens * probs)


KINDS: Mapping[str, Callable[[Mapping[str, jax.Array]], jax.Array]] = {
    "load_balance": _load_balance,
}
"""``{kind: loss(averaged statistics)}``; any other kind's loss is its ``value`` leaf."""


def _is_stack_key(key: str) -> bool:
    return key == STACKED or key.startswith(f"{STACKED}[")


def strip(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without its :data:`AUX` entries (and without dicts left empty by that).

    A dict that was empty before stripping stays: a layer whose state is ``{}`` keeps
    the structure its ``init`` gave, so the trainer's state keeps one structure.

    Example:
        >>> from nnjax.core import aux
        >>> aux.strip({"blocks": {"moe": {"aux": {"router_z": {"value": 1.0}}}}, "n": 2})
        {'n': 2}
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == AUX:
            continue
        if isinstance(value, Mapping) and value:
            value = strip(value)
            if not value:
                continue
        out[key] = value
    return out


def statistics(state: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """``{kind: {leaf: mean over every layer that reported it}}`` from a returned state."""
    gathered: dict[tuple[str, str], list[jax.Array]] = {}
    for path, value in flatten(state).items():
        segs = path.split("/")
        if AUX not in segs:
            continue
        at = len(segs) - 1 - segs[::-1].index(AUX)
        if len(segs) - at != 3:
            raise LayerError(
                f"{path}: an auxiliary statistic goes at .../{AUX}/{{kind}}/{{leaf}}, "
                f"got {len(segs) - at - 1} segments after {AUX!r}"
            )
        depth = sum(_is_stack_key(s) for s in segs[:at])
        shape = np.shape(value)
        per_layer = jnp.reshape(jnp.asarray(value, jnp.float32), (-1, *shape[depth:]))
        gathered.setdefault((segs[at + 1], segs[at + 2]), []).append(per_layer)
    flat = {
        f"{kind}/{leaf}": jnp.mean(jnp.concatenate(arrays, axis=0), axis=0)
        for (kind, leaf), arrays in gathered.items()
    }
    return unflatten(flat)


def losses(state: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(sum of weight * loss over kinds, {"aux/{kind}": unweighted loss})``.

    ``(0.0, {})`` when no layer reported anything.

    Raises:
        LayerError: a kind without its ``weight`` leaf, or not in :data:`KINDS` and
            without a ``value`` leaf.
    """
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for kind, stats in statistics(state).items():
        fn = KINDS.get(kind)
        needed = ["weight"] + (["value"] if fn is None else [])
        missing = [n for n in needed if n not in stats]
        if missing:
            raise LayerError(
                f"auxiliary statistic {kind!r} lacks the leaf(s) {missing}; got {sorted(stats)}"
            )
        loss = stats["value"] if fn is None else fn(stats)
        metrics[f"{AUX}/{kind}"] = loss
        total = total + stats["weight"] * loss
    return total, metrics
