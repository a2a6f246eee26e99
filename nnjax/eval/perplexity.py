"""Perplexity of a causal language model over a file: a quick check without a harness.

:func:`perplexity` cuts the tokens into windows of ``seq_len`` predictions (each
window restarts its context, as nanoGPT's evaluation does) and averages the
negative log-likelihood of every token after the first. :func:`token_scorer` is the
jitted scoring both it and :class:`nnjax.eval.NNJaxLM` use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import DataError
from nnjax.models.causal_lm import CausalLM

__all__ = ["perplexity", "token_scorer"]


def token_scorer(config: Any) -> Callable:
    """A jitted ``score(params, ids, targets, mask) -> (log-prob sums (B,), all greedy (B,))``.

    ``ids``, ``targets`` int32 and ``mask`` bool, all ``(B, L)``: row ``b`` sums
    ``log p(targets[b, t] | ids[b, :t + 1])`` over the ``t`` where ``mask[b, t]``, and says
    whether each of those targets is the argmax.
    """
    model = CausalLM(config)

    @jax.jit
    def score(params, ids, targets, mask):
        logits, _ = model.apply(params, {}, ids)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, L, V)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logp, axis=-1) == targets
        return jnp.sum(jnp.where(mask, picked, 0.0), axis=1), jnp.all(greedy | ~mask, axis=1)

    return score


def _tokens(source: Any, tokenizer: Any) -> np.ndarray:
    if not isinstance(source, str | os.PathLike):
        return np.asarray(source)
    path = os.fspath(source)
    if os.path.isdir(path):  # a folder nnjax tokenize wrote: its validation split
        from nnjax.data.corpus import read_token_meta
        from nnjax.data.tokens import open_tokens

        return open_tokens(os.path.join(path, "val.bin"), read_token_meta(path)["dtype"])
    if path.endswith(".bin"):
        raise DataError(f"{path}: pass the token folder (its meta.json gives the dtype)")
    if tokenizer is None:
        raise DataError(f"{path}: a text file needs tokenizer= (or pass a token folder)")
    with open(path, encoding="utf-8") as f:
        return np.asarray(tokenizer.encode(f.read(), add_special_tokens=False))


def perplexity(
    config: Any,
    params: Any,
    source: Any,
    *,
    tokenizer: Any = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Mean negative log-likelihood per token, and its exponential, over ``source``.

    Args:
        config, params: a :class:`~nnjax.models.CausalLMConfig` and its params.
        source: token ids ``(N,)``, a folder ``nnjax tokenize`` wrote (its ``val.bin``),
            or a text file (with ``tokenizer``, no special tokens added).
        tokenizer: for a text file: anything with ``encode(text, add_special_tokens=False)``.
        seq_len: predictions per window; default ``config.max_position``.
        batch_size: windows per model call.
        max_tokens: read at most this many tokens (the first ones).

    Returns:
        ``{"loss": mean NLL (nats), "perplexity": exp(loss), "tokens": predictions}``.

    Raises:
        DataError: fewer than two tokens, a text file without a tokenizer.

    Example:
        >>> cfg = nj.models.CausalLMConfig(vocab_size=50, hidden_size=16, num_heads=2,
        ...                                mlp_hidden=32, max_position=16)
        >>> params, _ = nj.models.CausalLM(cfg).init(key, jnp.zeros((1, 16), jnp.int32))
        >>> from nnjax.eval import perplexity
        >>> r = perplexity(cfg, params, np.arange(100) % 50)
        >>> r["tokens"], 40 < r["perplexity"] < 60   # an untrained model: about the vocabulary
        (99, True)
    """
    ids = _tokens(source, tokenizer)
    ids = np.asarray(ids[:max_tokens] if max_tokens else ids, np.int32)
    if ids.ndim != 1 or len(ids) < 2:
        raise DataError(f"expected at least two tokens (N,), got shape {ids.shape}")
    s = int(seq_len or config.max_position)
    starts = list(range(0, len(ids) - 1, s))
    score = token_scorer(config)
    total, count = 0.0, 0
    for lo in range(0, len(starts), batch_size):
        x = np.zeros((batch_size, s), np.int32)
        y = np.zeros((batch_size, s), np.int32)
        mask = np.zeros((batch_size, s), bool)
        for r, start in enumerate(starts[lo : lo + batch_size]):
            window = ids[start : start + s + 1]
            n = len(window) - 1
            x[r, :n], y[r, :n], mask[r, :n] = window[:-1], window[1:], True
        sums, _ = jax.device_get(score(params, x, y, mask))
        total -= float(np.sum(sums))
        count += int(mask.sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
