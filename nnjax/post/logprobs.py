"""Sequence log-probabilities: what a policy assigns to each response, from its logits.

Preference losses and GRPO compare how likely a policy and a reference make whole
responses. :func:`token_logprobs` gives ``log p(target_t | prefix)`` per position;
:func:`sequence_logprobs` sums (and averages) them over the positions a loss mask
counts (the response tokens, not the prompt), one value per row, or one per example
of a packed row when ``segment_ids`` are given.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_int, shape_str
from nnjax.core.errors import ShapeError
from nnjax.training.chunked import token_log_probs

__all__ = ["SequenceLogprobs", "token_logprobs", "sequence_logprobs"]

IGNORE_INDEX = -100  # as nnjax.data.IGNORE_INDEX (torch's label for "no loss here")


class SequenceLogprobs(NamedTuple):
    """Per-sequence log-probabilities of the counted tokens.

    Attributes:
        sum: float32 ``(B,)`` (or ``(B, S)`` per segment): the summed log-probability.
        mean: float32, same shape: ``sum / count`` (0 where nothing counts).
        count: int32, same shape: how many tokens counted.
    """

    sum: jax.Array
    mean: jax.Array
    count: jax.Array


def _check(logits: Any, targets: Any) -> None:
    if len(np.shape(logits)) < 2 or np.shape(targets) != tuple(np.shape(logits)[:-1]):
        raise ShapeError(
            f"expected targets.shape == logits.shape[:-1] == "
            f"{shape_str(np.shape(logits)[:-1])}, got targets.shape == "
            f"{shape_str(np.shape(targets))}"
        )
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ShapeError(
            f"expected integer targets, got targets.dtype == {jnp.result_type(targets)}"
        )


def token_logprobs(
    logits: jax.Array, targets: jax.Array, *, ignore_index: int | None = IGNORE_INDEX
) -> jax.Array:
    """``log softmax(logits)[target]`` at every position; 0 where the target is ``ignore_index``.

    Computed in float32 by :func:`nnjax.losses.token_log_probs`: from
    :class:`~nnjax.losses.LazyLogits` (what ``nj.models.CausalLM`` returns in training)
    a vocabulary chunk at a time, never holding the ``(..., V)`` logits.

    Args:
        logits: ``(..., V)``, the model's outputs (position ``t`` predicts ``targets[t]``),
            an array or :class:`~nnjax.losses.LazyLogits`.
        targets: int ``(...)``, ``logits.shape[:-1]``: the next token, or ``ignore_index``.
        ignore_index: the id that marks an uncounted position (``None``: all count).

    Returns:
        float32 ``(...)``.

    Example:
        >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
        >>> np.asarray(nj.post.token_logprobs(logits, jnp.array([[0, -100]])), float).round(4).tolist()
        [[-0.6931, 0.0]]
    """
    _check(logits, targets)
    counted = jnp.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    out = token_log_probs(logits, jnp.where(counted, targets, 0))
    return jnp.where(counted, out, 0.0)


def sequence_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    *,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_segments: int | None = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> SequenceLogprobs:
    """Each sequence's summed and mean log-probability of its counted (response) tokens.

    A position counts where its target is not ``ignore_index`` and ``mask`` (if given)
    is True: the targets :func:`nnjax.data.pack` and the preference reader make mark the
    prompt with ``ignore_index`` already.

    Args:
        logits: ``(B, T, V)``, an array or :class:`~nnjax.losses.LazyLogits`.
        targets: int ``(B, T)``.
        mask: optional bool ``(B, T)``.
        segment_ids: optional int ``(B, T)`` of packed rows (``1, 2, ...`` per example,
            0 for padding): the values are then per segment.
        num_segments: ``S``, the most segments a row holds (static; needed with
            ``segment_ids``): segment ``k`` lands in column ``k - 1``.
        ignore_index: the target id of an uncounted position.

    Returns:
        A :class:`SequenceLogprobs` of ``(B,)`` arrays, or ``(B, S)`` with
        ``segment_ids``; ``mean`` is 0 for a sequence with no counted token.

    Example:
        >>> logits = jnp.zeros((1, 4, 8))  # uniform over 8 tokens
        >>> targets = jnp.array([[-100, 3, 5, 1]])
        >>> lp = nj.post.sequence_logprobs(logits, targets,
        ...     segment_ids=jnp.array([[1, 1, 2, 2]]), num_segments=2)
        >>> lp.count.tolist(), np.asarray(lp.mean, float).round(4).tolist()
        ([[1, 2]], [[-2.0794, -2.0794]])
    """
    per_token = token_logprobs(logits, targets, ignore_index=ignore_index)
    counted = jnp.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    if mask is not None:
        if np.shape(mask) != np.shape(targets):
            raise ShapeError(
                f"expected mask.shape == targets.shape == {shape_str(np.shape(targets))}, "
                f"got {shape_str(np.shape(mask))}"
            )
        counted = counted & jnp.asarray(mask, bool)
    per_token = jnp.where(counted, per_token, 0.0)
    if segment_ids is None:
        total = jnp.sum(per_token, axis=-1)
        count = jnp.sum(counted, axis=-1, dtype=jnp.int32)
    else:
        if np.shape(segment_ids) != np.shape(targets):
            raise ShapeError(
                f"expected segment_ids.shape == targets.shape == {shape_str(np.shape(targets))}, "
                f"got {shape_str(np.shape(segment_ids))}"
            )
        if num_segments is None:
            raise ShapeError(
                "segment_ids given without num_segments (the most segments a row holds)"
            )
        s = check_int(num_segments, "num_segments")
        onehot = jax.nn.one_hot(jnp.asarray(segment_ids) - 1, s, dtype=per_token.dtype)  # 0: none
        total = jnp.einsum("bt,bts->bs", per_token, onehot, precision="highest")
        count = jnp.einsum("bt,bts->bs", counted.astype(onehot.dtype), onehot).astype(jnp.int32)
    mean = total / jnp.maximum(count, 1).astype(total.dtype)
    return SequenceLogprobs(total, mean, count)
