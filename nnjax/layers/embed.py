"""Embeddings: token tables, the tied output projection, positional embeddings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.core  # for type checkers: jax's __init__ loads jax.core only under a private name
import jax.numpy as jnp
import numpy as np

from nnjax.core import padded
from nnjax.core.checks import check_float, check_keys, check_rank, get_param, shape_str
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import (
    Initializer,
    Layer,
    as_layer,
    call_child,
    checked_apply,
    checked_init,
    non_empty,
    output_shape,
)
from nnjax.kernels import small_matmul
from nnjax.layers import quantized
from nnjax.layers.base import compute_dtype, matmul_last

__all__ = [
    "Embedding",
    "attend",
    "tied_embedding",
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEmbedding",
]


default_embed_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
"""Flax's ``default_embed_init``: a (truncated) normal with variance ``1 / features``."""


def _check_ids(ids: Any, num_embeddings: int) -> None:
    """Integer dtype always; the range ``[0, num_embeddings)`` only where ``ids`` are concrete."""
    dtype = jnp.result_type(ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise LayerError(
            f"expected integer ids, got x.dtype == {dtype} (x.shape == {shape_str(np.shape(ids))})"
        )
    if isinstance(ids, (jax.core.Tracer, jax.ShapeDtypeStruct)) or np.size(ids) == 0:
        return
    # NumPy, not jnp: concrete ids may meet a trace (a closure), where jnp.min would trace.
    ids = np.asarray(ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_embeddings:
        raise LayerError(
            f"expected ids in [0, {num_embeddings}) (num_embeddings == {num_embeddings}), "
            f"got min(x) == {lo}, max(x) == {hi} (x.shape == {shape_str(np.shape(ids))})"
        )


def Embedding(
    num_embeddings: int,
    features: int,
    *,
    embedding_init: Initializer = default_embed_init,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "embedding",
) -> Layer:
    """A lookup table: integer ids ``(...)`` -> vectors ``(..., features)``.

    A padded batch ``{"inputs": ids (B, T), "lengths": (B,)}`` gives
    ``{"inputs": vectors (B, T, features), "lengths": ...}``: the lengths (and any
    ``initial_carry``) pass on to the recurrent layer after it, so
    ``serial(Embedding(...), LSTM(...))`` reads a padded batch of token ids
    (:mod:`nnjax.core.padded`).

    Ids must lie in ``[0, num_embeddings)``. Eagerly (concrete ids) an id outside
    is a LayerError. Under ``jax.jit`` the ids cannot be checked; a lookup of an
    id outside the range (negative ids included) returns NaN (``jnp.take``
    with ``mode="fill"``), so a bad id shows up as a NaN loss, never as a
    silently clipped or wrapped row; its gradient is dropped.

    Args:
        num_embeddings: vocabulary size.
        features: embedding size.
        embedding_init: ``jax.nn.initializers`` function; the default is Flax's
            ``variance_scaling(1.0, "fan_in", "normal", out_axis=0)``.
        dtype: output dtype; ``None`` means ``param_dtype``.
        param_dtype: dtype of the table.

    Params:
        embedding: ``(num_embeddings, features)``; int8 with ``embedding_scale``
            beside it when stored quantized (``nj.finetune.quantize(...,
            embeddings=...)``): row ``i`` is ``embedding[i] * embedding_scale[i]``.
        embedding_scale: ``(num_embeddings,)`` float32, present only with an int8 table.

    Raises:
        LayerError: non-integer ids; eagerly, ids out of range.

    Example:
        >>> params, _ = nj.Embedding(1000, 64).init(key, jnp.zeros((8, 128), jnp.int32))
        >>> jax.tree.map(jnp.shape, params)
        {'embedding': (1000, 64)}
    """
    if num_embeddings < 1 or features < 1:
        raise ArgumentError(
            f"Embedding: num_embeddings and features must be >= 1, got {num_embeddings}, {features}"
        )
    table_shape = (num_embeddings, features)

    def init(key, x):
        _check_ids(padded.split(x)[0], num_embeddings)
        return {"embedding": embedding_init(key, table_shape, param_dtype)}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        x, rest = padded.split(x)
        _check_ids(x, num_embeddings)
        check_keys(params, ["embedding"], [quantized.ROW_SCALE])
        table = get_param(params, "embedding", table_shape)
        dtype_ = compute_dtype(x, dtype, param_dtype)
        ids = jnp.asarray(x)
        if jnp.issubdtype(ids.dtype, jnp.signedinteger):
            # negative ids are out of range (NaN), not wrapped around as in NumPy
            ids = ids.astype(jnp.promote_types(ids.dtype, jnp.int32))
            ids = jnp.where(ids < 0, num_embeddings, ids)
        if quantized.ROW_SCALE in params:
            # int8 rows: only the looked-up rows become float; a bad id takes a NaN scale
            scale = get_param(params, quantized.ROW_SCALE, (num_embeddings,))
            rows = jnp.take(table, jnp.minimum(ids, num_embeddings - 1), axis=0).astype(dtype_)
            y = rows * jnp.take(scale.astype(dtype_), ids, axis=0, mode="fill")[..., None]
        else:
            y = jnp.take(table.astype(dtype_), ids, axis=0, mode="fill")
        return padded.join(y, rest), state

    return Layer(init, apply, name)


def attend(embedding_params: dict[str, Any], x: Any, *, dtype: Any = None) -> jax.Array:
    """Logits over the vocabulary from an Embedding's table: ``x @ embedding.T``.

    An int8 table (``embedding_scale`` beside it, per row) gives ``(x @ embedding.T) *
    embedding_scale``: the product runs on the int8 values converted to ``dtype`` (a
    float temporary of the table's size while it runs), the scales applied to the
    ``(..., vocab)`` result. Training a ``CausalLM`` with a tied int8 table never
    forms that temporary: its loss reads the head one vocabulary chunk at a time
    (:class:`nnjax.losses.LazyLogits`).

    Args:
        embedding_params: an Embedding's params, ``{"embedding": (vocab, d)}`` (and
            ``"embedding_scale": (vocab,)`` with an int8 table).
        x: ``(..., d)`` float.
        dtype: computation dtype; ``None`` keeps ``x``'s float dtype.

    Returns:
        ``(..., vocab)``.

    Example:
        >>> table = {"embedding": jnp.array([[2, -1], [1, 3]], jnp.int8),
        ...          "embedding_scale": jnp.array([0.5, 0.25])}
        >>> nj.attend(table, jnp.array([[1.0, 2.0]])).tolist()
        [[0.0, 1.75]]
    """
    table = get_param(embedding_params, "embedding")
    scale = embedding_params.get(quantized.ROW_SCALE)
    check_rank(x, 1, "(..., features)")
    check_float(x)
    if np.ndim(table) != 2 or np.shape(table)[1] != np.shape(x)[-1]:
        raise LayerError(
            f"expected x.shape[-1] == {np.shape(table)[-1] if np.ndim(table) else '?'} "
            f"(embedding {shape_str(np.shape(table))}), got x.shape == {shape_str(np.shape(x))}"
        )
    dtype_ = compute_dtype(x, dtype)
    if dtype_ == jnp.float32 and small_matmul.takes(x, table, scale, transposed=True):
        # few rows (decoding): each stored row read once, dequantized in registers
        return small_matmul.small_matmul(x, table, scale, transposed=True)
    logits = matmul_last(jnp.asarray(x, dtype_), table.astype(dtype_).T)
    if scale is None:
        return logits
    return logits * jax.lax.broadcast_to_rank(jnp.asarray(scale).astype(dtype_), logits.ndim)


def tied_embedding(embedding_layer: Layer, body: Layer | Callable, *, name: str = "tied") -> Layer:
    """A model whose output projection is its token table: ``attend(embed, body(embed(ids)))``.

    This is how a GPT ties its head to its token embedding: the gradient of the
    table sums both uses. ``body`` is any Layer or callable (a ``serial`` of blocks
    and a final LayerNorm) that maps ``(..., d)`` to ``(..., d)``.

    Input integer ids ``(...)``, output logits ``(..., num_embeddings)``.

    Params:
        embed: the Embedding's params, ``{"embedding": (vocab, d)}``.
        body: the body's params (absent if it has none).

    State is ``{"embed": ..., "body": ...}`` likewise (each only if non-empty).
    The rng is split in two: one for the embedding, one for the body.

    Example:
        >>> model = nj.tied_embedding(nj.Embedding(100, 16), nj.LayerNorm())
        >>> params, _ = model.init(key, jnp.zeros((2, 8), jnp.int32))
        >>> jax.tree.map(jnp.shape, params)
        {'body': {'bias': (16,), 'scale': (16,)}, 'embed': {'embedding': (100, 16)}}
    """
    embed = as_layer(embedding_layer)
    body = as_layer(body)

    def init(key, x):
        k_embed, k_body = jax.random.split(key)
        p_embed, s_embed = call_child("embed", checked_init, embed, k_embed, x)
        h = call_child("embed", output_shape, embed, p_embed, s_embed, x)
        p_body, s_body = call_child("body", checked_init, body, k_body, h)
        return {"embed": p_embed, **non_empty(body=p_body)}, non_empty(embed=s_embed, body=s_body)

    def apply(params, state, x, *, rng=None, train=False):
        check_keys(params, ["embed"], ["body"])
        check_keys(state, [], ["embed", "body"], kind="state")
        r_embed, r_body = (None, None) if rng is None else tuple(jax.random.split(rng))
        p_embed = params["embed"]
        h, s_embed = call_child(
            "embed",
            checked_apply,
            embed,
            p_embed,
            state.get("embed", {}),
            x,
            rng=r_embed,
            train=train,
        )
        h, s_body = call_child(
            "body",
            checked_apply,
            body,
            params.get("body", {}),
            state.get("body", {}),
            h,
            rng=r_body,
            train=train,
        )
        logits = call_child("embed", attend, p_embed, h)
        return logits, non_empty(embed=s_embed, body=s_body)

    return Layer(init, apply, name)


def sinusoidal_table(length: int, d: int, *, base: float = 10000.0) -> jax.Array:
    """The Transformer paper's positional encodings, ``(length, d)`` float32.

    ``table[p, 2i] = sin(p / base**(2i / d))``, ``table[p, 2i + 1] = cos(p / base**(2i / d))``
    (sines and cosines interleaved; an odd ``d`` ends with a sine).
    """
    j = jnp.arange(d)
    inv_freq = jnp.power(base, -(2 * (j // 2)).astype(jnp.float32) / d)
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.where(j % 2 == 0, jnp.sin(angle), jnp.cos(angle))


def _check_sequence(x: Any) -> tuple[int, int]:
    check_rank(x, 2, "(..., T, d)")
    check_float(x)
    return np.shape(x)[-2], np.shape(x)[-1]


def LearnedPositionalEmbedding(
    max_length: int,
    *,
    embedding_init: Initializer = jax.nn.initializers.normal(stddev=0.02),
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "pos_embedding",
) -> Layer:
    """Add a learned vector per position: ``x + embedding[:T]`` for ``x (..., T, d)``.

    Params:
        embedding: ``(max_length, d)``.

    Raises:
        LayerError: ``T > max_length``.

    Example:
        >>> params, _ = nj.LearnedPositionalEmbedding(512).init(key, jnp.zeros((8, 128, 64)))
        >>> jax.tree.map(jnp.shape, params)
        {'embedding': (512, 64)}
    """
    if max_length < 1:
        raise ArgumentError(
            f"LearnedPositionalEmbedding: max_length must be >= 1, got {max_length}"
        )

    def check_length(x):
        t, d = _check_sequence(x)
        if t > max_length:
            raise LayerError(
                f"expected x.shape[-2] <= max_length == {max_length}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )
        return t, d

    def init(key, x):
        _, d = check_length(x)
        return {"embedding": embedding_init(key, (max_length, d), param_dtype)}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        t, d = check_length(x)
        check_keys(params, ["embedding"])
        table = get_param(params, "embedding", (max_length, d))
        dtype_ = compute_dtype(x, dtype, param_dtype)
        return x.astype(dtype_) + jax.lax.broadcast_to_rank(table[:t].astype(dtype_), x.ndim), state

    return Layer(init, apply, name)


def SinusoidalPositionalEmbedding(*, base: float = 10000.0, name: str = "sinusoidal") -> Layer:
    """Add the fixed sinusoidal encodings of :func:`sinusoidal_table`: ``x + table[:T]``.

    ``x (..., T, d)``, any ``T``. No params. The table is computed in float32
    and added in ``x``'s dtype.
    """

    def init(key, x):
        del key
        _check_sequence(x)
        return {}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        t, d = _check_sequence(x)
        check_keys(params, [])
        return x + jax.lax.broadcast_to_rank(
            sinusoidal_table(t, d, base=base).astype(x.dtype), x.ndim
        ), state

    return Layer(init, apply, name)
