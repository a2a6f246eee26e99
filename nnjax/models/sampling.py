"""Next-token sampling filters: temperature, top-k, top-p (nucleus), min-p, as transformers applies them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nnjax.core.errors import ArgumentError

__all__ = ["filter_logits", "sample"]


def filter_logits(
    logits: jax.Array,
    *,
    temperature: Any = 1.0,
    top_k: int | None = None,
    top_p: Any = None,
    min_p: Any = None,
) -> jax.Array:
    """``logits / temperature`` with the tokens the filters drop set to ``-inf`` (float32).

    Applied in transformers' order, each on what the previous one kept:

    - ``top_k``: keep the ``k`` largest logits (ties with the ``k``-th kept too).
    - ``top_p``: keep the smallest set of most likely tokens whose probability reaches
      ``top_p``: a token stays when the tokens more likely than it hold less than ``top_p``.
    - ``min_p``: keep tokens with probability ``>= min_p * max probability``.

    ``softmax`` of the result is the renormalised distribution over the kept tokens.

    Args:
        logits: ``(..., V)``.
        temperature: ``> 0`` (a traced scalar is fine).
        top_k: a static int ``>= 1`` or ``None``.
        top_p: in ``(0, 1]`` or ``None``.
        min_p: in ``[0, 1]`` or ``None``.

    Returns:
        float32 ``(..., V)``.

    Example:
        >>> logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
        >>> jnp.isfinite(nj.models.filter_logits(logits, top_p=0.8)).tolist()
        [True, True, False, False]
        >>> jnp.isfinite(nj.models.filter_logits(logits, min_p=0.2)).tolist()
        [True, True, True, False]
    """
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        kept = jnp.where(before < top_p, desc, jnp.inf)
        x = jnp.where(x < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, x)
    if min_p is not None:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, x)
    return x


def sample(
    logits: jax.Array,
    rng: jax.Array | None,
    *,
    greedy: bool,
    temperature: Any = 1.0,
    top_k: int | None = None,
    top_p: Any = None,
    min_p: Any = None,
) -> jax.Array:
    """One int32 token id per row of ``logits (..., V)``: the argmax, or a draw from :func:`filter_logits`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ArgumentError("rng: sampling (greedy=False) needs a PRNG key, got None")
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
