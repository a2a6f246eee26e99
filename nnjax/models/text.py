"""A recurrent text classifier: embedding, LSTM/GRU encoder over a padded batch, pooling, head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, shape_str
from nnjax.core.combinators import Layer, output_shape
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import call_child
from nnjax.layers import GRU, LSTM, Bidirectional, Dense, Dropout, Embedding

__all__ = ["TextClassifierConfig", "TextClassifier"]

_CELLS = {"lstm": LSTM, "gru": GRU}
_POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class TextClassifierConfig:
    """Configuration of :func:`TextClassifier`.

    Attributes:
        vocab_size: number of token ids (ids lie in ``[0, vocab_size)``; 0 may be padding).
        embed_dim: embedding width ``E``.
        hidden: recurrent hidden size ``H`` (per direction).
        cell: ``"lstm"`` or ``"gru"``.
        bidirectional: also read each sequence backwards (within its length) and
            concatenate: the pooled features are ``2H`` wide.
        pooling: ``"last"``: the encoder's state after each sequence's last valid
            token (for a bidirectional encoder, the backward state after reading back
            to the first token); ``"mean"``: the mean of the outputs over valid steps.
        num_classes: width of the head.
        dropout_rate: dropout on the pooled features in train mode (0: none).
    """

    vocab_size: int
    embed_dim: int = 64
    hidden: int = 64
    cell: str = "lstm"
    bidirectional: bool = False
    pooling: str = "last"
    num_classes: int = 2
    dropout_rate: float = 0.0


def _split_input(x: Any) -> tuple[Any, Any]:
    """``(ids (B, T), lengths (B,) or None)`` from ids or ``{"inputs", "lengths"}``, checked."""
    if isinstance(x, Mapping):
        key = "ids" if "ids" in x else "inputs"  # "ids": the form before padded batches
        check_keys(x, [key], ["lengths"], kind="input key")
        ids, lengths, what = x[key], x.get("lengths"), f'x["{key}"]'
    else:
        ids, lengths, what = x, None, "x"
    if np.ndim(ids) != 2:
        raise LayerError(
            f"expected {what} with 2 axes (B, T), got {what}.shape == {shape_str(np.shape(ids))}"
        )
    if lengths is not None and tuple(np.shape(lengths)) != tuple(np.shape(ids)[:1]):
        raise LayerError(
            f"expected lengths.shape == {shape_str(np.shape(ids)[:1])} ({what}.shape[:1]), "
            f"got lengths.shape == {shape_str(np.shape(lengths))}"
        )
    return ids, lengths


def TextClassifier(config: TextClassifierConfig) -> Layer:
    """Classify token sequences: embed, run an LSTM/GRU over the padded batch, pool, a Dense head.

    Input: token ids ``(B, T)`` int (every sequence ``T`` long), or a padded batch
    ``{"inputs": (B, T) int, "lengths": (B,) int}`` (as
    :meth:`nnjax.data.Vocabulary.encode` makes it; ``"ids"`` is accepted for
    ``"inputs"``) for a right-padded batch:
    sequence ``b`` is ``ids[b, :lengths[b]]`` and the padding after it does not
    change the output. Output: logits ``(B, num_classes)``.

    Shapes inside: embeddings ``(B, T, E)``; encoder outputs ``(B, T, D)`` with
    ``D = H`` (``2H`` bidirectional); pooled features ``(B, D)``; logits.

    Params:
        embed/embedding: ``(vocab_size, E)``.
        encoder/{kernel, recurrent_kernel, bias[, recurrent_bias]}: the LSTM/GRU
            (see :func:`nnjax.LSTM`); bidirectional: ``encoder/forward/...`` and
            ``encoder/backward/...``.
        head/kernel: ``(D, num_classes)``, head/bias: ``(num_classes,)``.

    Raises:
        LayerError: ids not ``(B, T)`` integers, lengths not ``(B,)``, an unknown input key.

    Example:
        >>> model = nj.models.TextClassifier(nj.models.TextClassifierConfig(vocab_size=100, embed_dim=8, hidden=16))
        >>> x = {"inputs": jnp.zeros((4, 12), jnp.int32), "lengths": jnp.array([12, 5, 3, 9])}
        >>> params, state = model.init(key, x)
        >>> jax.tree.map(jnp.shape, params)
        {'embed': {'embedding': (100, 8)}, 'encoder': {'bias': (64,), 'kernel': (8, 64), 'recurrent_kernel': (16, 64)}, 'head': {'bias': (2,), 'kernel': (16, 2)}}
        >>> model.apply(params, state, x)[0].shape
        (4, 2)
    """
    c = config
    if c.cell not in _CELLS:
        raise ArgumentError(f"TextClassifier: cell must be one of {list(_CELLS)}, got {c.cell!r}")
    if c.pooling not in _POOLINGS:
        raise ArgumentError(
            f"TextClassifier: pooling must be one of {_POOLINGS}, got {c.pooling!r}"
        )
    embed = Embedding(c.vocab_size, c.embed_dim)
    rnn = _CELLS[c.cell](c.hidden, return_sequences=c.pooling == "mean")
    encoder = Bidirectional(rnn) if c.bidirectional else rnn
    dropout = Dropout(c.dropout_rate)
    head = Dense(c.num_classes)

    def features(params, ids, lengths):
        """Pooled features ``(B, D)``."""
        e, _ = call_child("embed", embed.apply, params["embed"], {}, ids)  # (B, T, E)
        enc_in = e if lengths is None else {"inputs": e, "lengths": lengths}
        h, _ = call_child("encoder", encoder.apply, params["encoder"], {}, enc_in)
        if c.pooling == "last":
            return h  # (B, D)
        # h: (B, T, D), zero after each sequence's end
        T = np.shape(ids)[1]
        n = jnp.full(np.shape(ids)[:1], T) if lengths is None else jnp.clip(lengths, 1, T)
        valid = jnp.arange(T)[None, :] < n[:, None]  # (B, T)
        return jnp.sum(jnp.where(valid[..., None], h, 0), axis=1) / n[:, None].astype(h.dtype)

    def init(key, x):
        ids, lengths = _split_input(x)
        k_embed, k_encoder, k_head = jax.random.split(key, 3)
        p_embed, _ = call_child("embed", embed.init, k_embed, ids)
        e = output_shape(embed, p_embed, {}, ids)  # (B, T, E)
        p_encoder, _ = call_child("encoder", encoder.init, k_encoder, e)
        params = {"embed": p_embed, "encoder": p_encoder}
        pooled = jax.eval_shape(features, params, ids, lengths)  # (B, D)
        p_head, _ = call_child("head", head.init, k_head, pooled)
        return {**params, "head": p_head}, {}

    def apply(params, state, x, *, rng=None, train=False):
        ids, lengths = _split_input(x)
        check_keys(params, ["embed", "encoder", "head"])
        h = features(params, ids, lengths)
        h, _ = call_child("dropout", dropout.apply, {}, {}, h, rng=rng, train=train)
        y, _ = call_child("head", head.apply, params["head"], {}, h)
        return y, state

    return Layer(init, apply, "text_classifier")
