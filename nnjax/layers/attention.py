"""Multi-head dot-product attention: grouped-query heads, rotary positions, KV cache, masks.

Inputs other than a plain array come in through ``x`` (the apply signature is fixed):

- ``x``: ``(..., T, d)``, self-attention.
- ``(x_q, x_kv)``: cross-attention, ``x_q (..., T_q, d_q)``, ``x_kv (..., T_kv, d_kv)``.
- ``{"query": x_q, "key_value": x_kv, "mask": mask, "positions": p, "segment_ids": s}``:
  every key but ``query`` optional. ``mask (..., T_kv)`` is a bool key-padding mask,
  True = attend. ``positions (..., T_q)`` int are the rotary positions of the queries
  (and of the keys, in self-attention); default ``0 .. T - 1`` (after the cache's
  tokens when decoding). ``segment_ids (..., T_q)`` int pack several sequences in one
  row: a token attends only to tokens of its own segment; segment 0 is padding
  (attended by nobody).

The apply is a pipeline of named steps: read and check the input; project (q, k, v
heads, q/k norms, rotation); write the cache (decode); mask (padding, causal, window,
segments); attend (einsum, blockwise or ``jax.nn.dot_product_attention``); the output
projection.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.core  # for type checkers: jax's __init__ loads jax.core only under a private name
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_float, check_keys, check_rank, shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Initializer, as_layer, call_child
from nnjax.layers.base import accumulating_einsum, compute_dtype
from nnjax.layers.blockwise_attention import blockwise_attention
from nnjax.layers.cache_attention import filled_cache_attention
from nnjax.layers.dense import Dense
from nnjax.layers.rope import Rotary, apply_rotary

__all__ = ["MultiHeadAttention", "Logits", "QKNorm"]


class Logits(NamedTuple):
    """How the attention logits are made from ``q . k``: ``cap * tanh(scale * q . k / cap)``.

    Attributes:
        scale: the query scale; ``None``: ``1 / sqrt(head_dim)`` (Gemma 2/3:
            ``query_pre_attn_scalar ** -0.5``).
        softcap: soft-capping of the logits (Gemma 2's ``attn_logit_softcapping``);
            ``None``: none. Computed by the einsum path (``jax.nn.dot_product_attention``
            has no cap).
    """

    scale: float | None = None
    softcap: float | None = None


class QKNorm(NamedTuple):
    """A norm on q and k before the rotation: per head (Qwen3, Gemma 3) or over the
    whole projection (OLMo 2: ``RMSNorm(num_heads * head_dim)`` on q, ``KV * head_dim`` on k).

    Attributes:
        layer: the norm layer (``nj.RMSNorm(epsilon=...)``); q and k get their own params.
        per_head: ``True``: over each head's ``head_dim``; ``False``: over the projection.
    """

    layer: Any
    per_head: bool = True


CACHE_KEYS = ("cached_key", "cached_value", "cached_segment_ids", "cache_index")
"""State leaves of a ``decode=True`` attention: the KV cache, each slot's segment id
(0: empty or padding) and the next write position."""

IMPLEMENTATIONS = (None, "einsum", "blockwise", "xla", "cudnn")
"""``None``: on CPU ``blockwise`` from :data:`BLOCKWISE_FROM` keys on (``einsum`` below it
and for decode steps), ``jax.nn.dot_product_attention`` elsewhere. ``einsum`` is an
explicit float32 softmax over the whole ``(T_q, T_kv)`` scores; ``blockwise``
(:func:`~nnjax.layers.blockwise_attention.blockwise_attention`) the same softmax one
block of scores at a time, never holding them all; ``xla``/``cudnn`` are passed to
``jax.nn.dot_product_attention``."""

BLOCKWISE_FROM = 256
"""Key length from which ``implementation=None`` takes the blockwise path on CPU: the
einsum path's ``(T, T)`` mask, select and softmax cost more than the blocks' loop
from here on (docs/benchmarks.md, "Attention on the CPU")."""

_INPUT_KEYS = ("key_value", "mask", "positions", "segment_ids")


class _Input(NamedTuple):
    x_q: Any
    x_kv: Any  # x_q itself for self-attention
    mask: Any
    positions: Any
    segment_ids: Any
    cross: bool


def _read_input(x: Any, decode: bool) -> _Input:
    """``x`` (array, tuple or dict; see the module docstring) split and checked."""
    if isinstance(x, Mapping):
        check_keys(x, ["query"], _INPUT_KEYS, kind="input key")
        x_q, x_kv = x["query"], x.get("key_value")
        extra = (x.get("mask"), x.get("positions"), x.get("segment_ids"))
    elif isinstance(x, tuple):
        if len(x) != 2:
            raise LayerError(f"expected x == (x_q, x_kv), got a tuple of {len(x)} items")
        x_q, x_kv, extra = x[0], x[1], (None, None, None)
    else:
        x_q, x_kv, extra = x, None, (None, None, None)
    check_rank(x_q, 2, "(..., T, d)")
    check_float(x_q)
    cross = x_kv is not None
    if cross:
        if decode:
            raise LayerError("decode=True is for self-attention; got a separate key_value input")
        check_rank(x_kv, 2, "(..., T_kv, d_kv)")
        check_float(x_kv)
        if np.shape(x_kv)[:-2] != np.shape(x_q)[:-2]:
            raise LayerError(
                f"expected key_value.shape[:-2] == {shape_str(np.shape(x_q)[:-2])} (the "
                f"query's batch axes), got key_value.shape == {shape_str(np.shape(x_kv))}"
            )
    for what, ids in (("positions", extra[1]), ("segment_ids", extra[2])):
        if ids is None:
            continue
        if tuple(np.shape(ids)) != tuple(np.shape(x_q)[:-1]):
            raise LayerError(
                f"expected {what}.shape == {shape_str(np.shape(x_q)[:-1])} (the query's batch "
                f"axes, T), got {what}.shape == {shape_str(np.shape(ids))}"
            )
        if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise LayerError(f"expected integer {what}, got {what}.dtype == {jnp.result_type(ids)}")
        if cross:
            raise LayerError(f"{what} are for self-attention; got a separate key_value input")
    return _Input(x_q, x_kv if cross else x_q, *extra, cross)


def _check_mask(mask: Any, batch: tuple[int, ...], t_kv: int) -> jax.Array:
    expected = (*batch, t_kv)
    if tuple(np.shape(mask)) != expected:
        raise LayerError(
            f"expected mask.shape == {shape_str(expected)} (batch axes, T_kv), "
            f"got mask.shape == {shape_str(np.shape(mask))}"
        )
    if jnp.result_type(mask) != jnp.bool_:
        raise LayerError(
            f"expected a bool mask (True = attend), got mask.dtype == {jnp.result_type(mask)}"
        )
    return jnp.reshape(mask, (-1, t_kv))


def _resolve(implementation: str | None, *, t_q: int, t_kv: int, decode: bool, drop: bool):
    """The path to take: ``"einsum"``, ``"blockwise"``, or what to pass to
    ``jax.nn.dot_product_attention``. Decode steps (the cache's traced offset) and
    dropout on the weights always take the einsum path when blockwise is asked."""
    if implementation is None:
        if jax.default_backend() != "cpu":
            return None
        implementation = "blockwise" if t_q > 1 and t_kv >= BLOCKWISE_FROM else "einsum"
    if implementation == "blockwise" and (decode or drop):
        return "einsum"
    return implementation


class _Mask(NamedTuple):
    """Which keys each query attends: the pieces, so each backend takes what it can fuse."""

    pad: Any  # (N, 1, 1, T_kv) bool or None: key padding
    rest: Any  # (N or 1, 1, T_q, T_kv) bool or None: causal, window, segments
    plain_causal: bool  # ``rest`` is just the causal triangle with offset 0


def _mask(
    *,
    pad: Any,
    q_index: jax.Array,
    kv_index: jax.Array,
    q_segments: Any,
    kv_segments: Any,
    causal: bool,
    window: int | None,
    offset_zero: bool,
) -> _Mask:
    """Combine key padding, causality, a sliding window and segment ids.

    ``q_index (T_q,)`` and ``kv_index (T_kv,)`` are slot indices in one frame (the cache's
    when decoding). The window is Hugging Face's: key ``j`` is seen from query ``i`` when
    ``i - window < j <= i``. Segments: equal and nonzero.
    """
    rest = None
    if causal:
        rest = kv_index[None, :] <= q_index[:, None]
    if window is not None:
        near = kv_index[None, :] > q_index[:, None] - window
        rest = near if rest is None else rest & near
    if rest is not None:
        rest = rest[None, None]  # (1, 1, T_q, T_kv)
    if q_segments is not None:
        same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
        same = same[:, None]  # (N, 1, T_q, T_kv)
        rest = same if rest is None else rest & same
    plain = causal and window is None and q_segments is None and offset_zero
    return _Mask(None if pad is None else pad[:, None, None, :], rest, plain)


def _full(mask: _Mask) -> Any:
    if mask.rest is None:
        return mask.pad
    return mask.rest if mask.pad is None else mask.pad & mask.rest


def _einsum_attention(q, k, v, mask, dtype, drop_rng, rate, logits_=Logits()):
    """``softmax(q k^T / sqrt(hd) | mask) v`` with float32 logits (``logits_``: their scale and cap).

    ``q (N, Tq, H, hd)``, ``k, v (N, Tk, KV, hd)``: each group of ``H // KV`` query heads
    shares a key/value head by broadcasting (the k/v heads are never repeated in memory).
    """
    n, t_q, h, hd = q.shape
    kv = k.shape[2]
    acc = jnp.promote_types(dtype, jnp.float32)
    scale = 1.0 / np.sqrt(hd) if logits_.scale is None else logits_.scale
    qg = jnp.reshape(q, (n, t_q, kv, h // kv, hd))
    logits = accumulating_einsum("nqkgd,nskd->nkgqs", qg, k).astype(acc) * scale
    if logits_.softcap is not None:
        logits = logits_.softcap * jnp.tanh(logits / logits_.softcap)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(acc).min)  # (N, 1, 1, Tq, Tk)
    weights = jax.nn.softmax(logits, axis=-1)
    if drop_rng is not None:
        keep = jax.random.bernoulli(drop_rng, 1.0 - rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - rate), 0.0)
    y = accumulating_einsum("nkgqs,nskd->nqkgd", weights.astype(dtype), v.astype(dtype))
    y = y.astype(dtype)
    return jnp.reshape(y, (n, t_q, h, hd))


def _attend(q, k, v, mask: _Mask, dtype, impl, drop_rng, rate, logits_=Logits()):
    """Dispatch: the explicit softmax (CPU, dropout, a soft cap) or ``jax.nn.dot_product_attention``."""
    if impl == "einsum" or drop_rng is not None or logits_.softcap is not None:
        return _einsum_attention(q, k, v, _full(mask), dtype, drop_rng, rate, logits_)
    return jax.nn.dot_product_attention(
        q,
        k.astype(dtype),
        v.astype(dtype),
        mask=mask.pad if mask.plain_causal else _full(mask),
        is_causal=mask.plain_causal,
        scale=logits_.scale,
        implementation=impl,
    )


def _read_cache(state, x_shape, kv_heads, ring=False):
    """The KV cache and ``cache_index`` from ``state``, checked against ``x (..., k, d)``
    (``ring``: a sliding window's ring buffer, which never overflows)."""
    if not all(k in state for k in CACHE_KEYS):
        raise LayerError(
            f"decode=True needs the KV cache in state: keys {sorted(CACHE_KEYS)}, made by "
            f"init(key, x) with x of shape (B, max_len, d); got state keys {sorted(state)}"
        )
    cache_shape = tuple(np.shape(state["cached_key"]))
    t_q = x_shape[-2]
    if cache_shape[:-3] != x_shape[:-2]:
        raise LayerError(
            f"expected x.shape[:-2] == {shape_str(cache_shape[:-3])} (the KV cache's batch, "
            f"cached_key {shape_str(cache_shape)}), got x.shape == {shape_str(x_shape)}"
        )
    if cache_shape[-2:] != kv_heads:
        raise LayerError(
            f"expected cached_key.shape[-2:] == {shape_str(kv_heads)} (num_kv_heads, head_dim), "
            f"got cached_key.shape == {shape_str(cache_shape)}"
        )
    max_len = cache_shape[-3]
    index = state["cache_index"]
    traced = isinstance(index, jax.core.Tracer)
    if not ring and (t_q > max_len or (not traced and int(index) + t_q > max_len)):
        raise LayerError(
            f"decode cache overflow: expected cache_index + x.shape[-2] <= max_len == "
            f"{max_len}, got cache_index == {'?' if traced else int(index)} and x.shape[-2] == {t_q}"
        )
    return index, max_len


def _write_cache(state, k, v, segments, index):
    """Write ``k, v (N, t, KV, hd)`` and their segment ids ``(N, t)`` at ``index``.

    Returns the whole cache ``(k, v, segment ids)`` flattened to ``N`` and the new state.
    """
    shape_k = state["cached_key"].shape
    n_shape = (-1, *shape_k[-3:])
    cached_k = jnp.reshape(state["cached_key"], n_shape)
    cached_v = jnp.reshape(state["cached_value"], n_shape)
    cached_s = jnp.reshape(state["cached_segment_ids"], (-1, shape_k[-3]))
    k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, index, 0, 0))
    s = jax.lax.dynamic_update_slice(cached_s, segments.astype(jnp.int32), (0, index))
    new_state = {
        "cached_key": jnp.reshape(k, shape_k),
        "cached_value": jnp.reshape(v, shape_k),
        "cached_segment_ids": jnp.reshape(s, state["cached_segment_ids"].shape),
        "cache_index": (index + segments.shape[1]).astype(jnp.int32),
    }
    return k, v, s, new_state


def _ring_keys(state, k, v, segments, index, size):
    """A sliding window's ring buffer: the cached slots, then the new ``k, v (N, t, KV, hd)``.

    Slot ``s`` holds the latest token ``j < index`` with ``j % size == s``. Returns the
    keys, values, segment ids and absolute indices ``(size + t,)`` to attend, and the new
    state (the last ``min(t, size)`` new tokens written over their slots).
    """
    shape_k = state["cached_key"].shape
    n_shape = (-1, *shape_k[-3:])
    cached_k = jnp.reshape(state["cached_key"], n_shape)
    cached_v = jnp.reshape(state["cached_value"], n_shape)
    cached_s = jnp.reshape(state["cached_segment_ids"], (-1, size))
    t = segments.shape[1]
    slots = jnp.arange(size)
    slot_index = index - 1 - jnp.mod(index - 1 - slots, size)  # < 0: never written (segment 0)
    kv_index = jnp.concatenate([slot_index, index + jnp.arange(t)])
    keys = jnp.concatenate([cached_k, k.astype(cached_k.dtype)], axis=1)
    values = jnp.concatenate([cached_v, v.astype(cached_v.dtype)], axis=1)
    kv_segments = jnp.concatenate([cached_s, segments.astype(jnp.int32)], axis=1)
    m = min(t, size)  # only the last `size` new tokens can be needed later
    where = jnp.mod(index + t - m + jnp.arange(m), size)
    new_state = {
        "cached_key": jnp.reshape(cached_k.at[:, where].set(keys[:, -m:]), shape_k),
        "cached_value": jnp.reshape(cached_v.at[:, where].set(values[:, -m:]), shape_k),
        "cached_segment_ids": jnp.reshape(
            cached_s.at[:, where].set(kv_segments[:, -m:]), state["cached_segment_ids"].shape
        ),
        "cache_index": (index + t).astype(jnp.int32),
    }
    return keys, values, kv_segments, kv_index, new_state


def MultiHeadAttention(
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    qkv_features: int | None = None,
    out_features: int | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    use_bias: bool = True,
    qkv_bias: bool | None = None,
    out_bias: bool | None = None,
    rotary: Rotary | None = None,
    qk_norm: Layer | QKNorm | None = None,
    sliding_window: int | None = None,
    logits: Logits = Logits(),
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    decode: bool = False,
    implementation: str | None = None,
    name: str = "attn",
) -> Layer:
    """Multi-head scaled dot-product attention with Dense projections ``query/key/value/out``.

    ``x`` is an array ``(..., T, d)`` (self-attention), a tuple ``(x_q, x_kv)`` or a
    dict ``{"query", "key_value", "mask", "positions", "segment_ids"}`` (see the module
    docstring). Leading batch axes of ``x_q`` and ``x_kv`` must agree. A query whose
    keys are all masked gets the mean of all values.

    ``num_kv_heads < num_heads`` is grouped-query attention (``1``: multi-query): each
    group of ``num_heads // num_kv_heads`` query heads shares one key/value head, by
    broadcasting (k and v are never repeated in memory).

    ``causal``: query ``i`` attends keys ``j <= i`` (with ``T_q != T_kv`` aligned at the
    first position, as torch and ``jax.nn.dot_product_attention``). ``sliding_window=w``
    (self-attention): also ``j > i - w``, as Hugging Face's Mistral.

    ``rotary`` (a :class:`~nnjax.layers.rope.Rotary`) rotates q and k by their positions
    after ``qk_norm`` (a norm layer applied to each head's q and k, Qwen3; a
    :class:`QKNorm` part says whether per head or over the whole projection, OLMo 2).
    ``logits`` (a :class:`Logits` part) sets the query scale and a soft cap (Gemma 2).

    ``dropout_rate`` drops attention *weights* in train mode (needs ``rng``).
    ``jax.nn.dot_product_attention`` cannot, so training with ``dropout_rate > 0``
    always takes the explicit-softmax (einsum) path.

    ``decode=True`` keeps a KV cache for autoregressive generation (self-attention
    only, always causal): ``init(key, x)`` with ``x (B, max_len, d)`` creates the
    state; each apply with ``x (B, k, d)`` writes k/v (rotated) and the tokens' segment
    ids (1 when none are given) at ``cache_index``, lets each query attend to the cached
    positions up to its own, and advances ``cache_index`` by ``k``. A ``mask``, if given,
    is ``(B, max_len)``. Writing past ``max_len`` is a LayerError when the index is
    concrete (eager); under ``jit`` it cannot be detected at trace time and the output is
    NaN instead. With a ``sliding_window`` shorter than ``max_len`` the cache is a
    ring buffer of ``sliding_window`` slots (each token overwrites the one ``window``
    positions before it): its memory does not grow with the context, it never
    overflows, and a ``mask`` is indexed by absolute position (``(B, M)``, any ``M``
    past the last position).

    Args:
        num_heads: query heads ``H``; ``qkv_features`` must be divisible by it.
        num_kv_heads: key/value heads ``KV`` (``H % KV == 0``); ``None``: ``H``.
        qkv_features: width of q (``H * head_dim``); default ``d_q``. k and v are
            ``KV * head_dim`` wide.
        out_features: output width; default ``d_q``.
        causal: mask future keys.
        dropout_rate: attention-weights dropout probability.
        use_bias: biases in the four projections ...
        qkv_bias, out_bias: ... unless set here for q/k/v (Qwen2: True) or out.
        rotary: rotary position embedding settings; ``None``: none.
        qk_norm: a norm layer (``nj.RMSNorm()``) for each head's q and k, or a
            :class:`QKNorm` (the layer and where it normalizes); ``None``: none.
        sliding_window: keys at most this many positions back (itself included).
        logits: the logits' scale and soft cap (:class:`Logits`).
        kernel_init, bias_init: ``jax.nn.initializers`` for the projections.
        dtype: computation dtype; ``None`` keeps a float input's dtype.
        param_dtype: dtype of the params.
        decode: keep a KV cache in ``state`` (see above).
        implementation: one of ``IMPLEMENTATIONS``; ``None`` picks, by
            ``jax.default_backend()`` at trace time, ``jax.nn.dot_product_attention`` on
            GPU/TPU and on CPU ``blockwise`` (scores one block at a time, never
            ``(T_q, T_kv)``) from ``BLOCKWISE_FROM`` keys, ``einsum`` below and for
            decode steps. ``blockwise`` takes the einsum path for decode steps and for
            dropout on the weights.
        name: default name in a combinator.

    Returns:
        A Layer: ``(..., T_q, out_features)`` from the inputs above.

    Raises:
        LayerError: bad ranks, batch axes, mask / positions / segment ids, ``d_q`` not
            divisible by ``num_heads``, a missing KV cache, a cache overflow, train-mode
            dropout without ``rng``.

    Params:
        query: Dense ``kernel (d, qkv_features)``, ``bias (qkv_features,)``;
            adapters beside the kernels (``lora_a``, ...) are used.
        key, value: Dense ``kernel (d_kv, KV * head_dim)``, ``bias``.
        out: Dense ``kernel (qkv_features, out_features)``, ``bias (out_features,)``.
        q_norm, k_norm: the ``qk_norm`` layer's params (``scale (head_dim,)``; over the
            projection ``(qkv_features,)`` and ``(KV * head_dim,)``), if given.

    State (``decode=True``):
        cached_key, cached_value: ``(B, max_len, KV, head_dim)``; cached_segment_ids:
        int32 ``(B, max_len)``; cache_index: int32 ``()``.

    Example:
        >>> attn = nj.MultiHeadAttention(4, num_kv_heads=2, causal=True)
        >>> x = jnp.zeros((2, 16, 32))
        >>> params, state = attn.init(key, x)
        >>> jax.tree.map(jnp.shape, params["key"])
        {'bias': (16,), 'kernel': (32, 16)}
        >>> mask = jnp.arange(16)[None, :] < jnp.array([[16], [9]])  # right padding
        >>> attn.apply(params, state, {"query": x, "mask": mask})[0].shape
        (2, 16, 32)
    """
    # Over 80 lines only through the closures it returns (dense_of, widths, init, project,
    # dropout_rng, apply; the longest is 45 lines): a layer's functions close over its
    # constructor's arguments.
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or kv_heads < 1 or num_heads % kv_heads:
        raise ArgumentError(
            f"MultiHeadAttention: num_heads ({num_heads}) must be >= 1 and divisible by "
            f"num_kv_heads ({kv_heads})"
        )
    if qkv_features is not None and qkv_features % num_heads:
        raise ArgumentError(
            f"MultiHeadAttention: qkv_features ({qkv_features}) must be divisible by "
            f"num_heads ({num_heads})"
        )
    if implementation not in IMPLEMENTATIONS:
        raise ArgumentError(f"MultiHeadAttention: implementation must be one of {IMPLEMENTATIONS}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ArgumentError(
            f"MultiHeadAttention: dropout_rate must be in [0, 1), got {dropout_rate}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ArgumentError(
            f"MultiHeadAttention: sliding_window must be >= 1, got {sliding_window}"
        )
    use_causal = causal or decode
    qk = QKNorm(qk_norm) if qk_norm is not None and not isinstance(qk_norm, QKNorm) else qk_norm
    norm = None if qk is None else as_layer(qk.layer)
    norm_per_head = qk is None or qk.per_head

    def dense_of(features: int, bias: bool | None) -> Layer:
        return Dense(
            features,
            use_bias=use_bias if bias is None else bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    # The widths default to the input's, known at init: one Dense per width, built once.
    qkv_dense = functools.cache(lambda features: dense_of(features, qkv_bias))
    out_dense = functools.cache(lambda features: dense_of(features, out_bias))
    param_keys = ("query", "key", "value", "out", *(("q_norm", "k_norm") if norm else ()))

    def widths(x_q):
        """``(qkv, kv, out, head_dim)`` for this input."""
        d_q = np.shape(x_q)[-1]
        qkv = qkv_features or d_q
        if qkv % num_heads:
            raise LayerError(
                f"expected x.shape[-1] divisible by num_heads == {num_heads} (qkv_features "
                f"defaults to it), got x.shape == {shape_str(np.shape(x_q))}"
            )
        head_dim = qkv // num_heads
        if rotary is not None and rotary.rotary_dim > head_dim:
            raise LayerError(f"rotary_dim {rotary.rotary_dim} > head_dim {head_dim}")
        return qkv, kv_heads * head_dim, out_features or d_q, head_dim

    def init(key, x):
        inp = _read_input(x, decode)
        qkv, kv, out, head_dim = widths(inp.x_q)
        dtype_ = compute_dtype(inp.x_q, dtype, param_dtype)
        k_q, k_k, k_v, k_o, k_qn, k_kn = jax.random.split(key, 6)
        params = {
            "query": qkv_dense(qkv).init(k_q, inp.x_q)[0],
            "key": qkv_dense(kv).init(k_k, inp.x_kv)[0],
            "value": qkv_dense(kv).init(k_v, inp.x_kv)[0],
            "out": out_dense(out).init(k_o, jax.ShapeDtypeStruct((qkv,), dtype_))[0],
        }
        if norm is not None:
            q_w, k_w = (head_dim, head_dim) if norm_per_head else (qkv, kv)
            q_in, k_in = (jax.ShapeDtypeStruct((w,), dtype_) for w in (q_w, k_w))
            params["q_norm"] = call_child("q_norm", norm.init, k_qn, q_in)[0]
            params["k_norm"] = call_child("k_norm", norm.init, k_kn, k_in)[0]
        if not decode:
            return params, {}
        lead = np.shape(inp.x_q)[:-1]
        if sliding_window is not None and sliding_window < lead[-1]:  # a ring buffer
            lead = (*lead[:-1], sliding_window)
        cache = jnp.zeros((*lead, kv_heads, head_dim), dtype_)
        state = {
            "cached_key": cache,
            "cached_value": cache,
            "cached_segment_ids": jnp.zeros(lead, jnp.int32),
            "cache_index": jnp.array(0, jnp.int32),
        }
        return params, state

    def project(params, inp, positions, dtype_, head_dim):
        """q ``(N, T_q, H, hd)``, k, v ``(N, T_kv, KV, hd)``: projected, normed, rotated."""

        def heads_of(name_, x_in, heads, norm_name=None):
            dense = (qkv_dense if name_ != "out" else out_dense)(heads * head_dim)
            y, _ = call_child(name_, dense.apply, params[name_], {}, jnp.asarray(x_in, dtype_))
            if norm is not None and norm_name is not None:  # over the whole projection
                y = call_child(norm_name, norm.apply, params[norm_name], {}, y)[0]
            return jnp.reshape(y, (-1, y.shape[-2], heads, head_dim))

        whole = None if norm_per_head else ("q_norm", "k_norm")
        q = heads_of("query", inp.x_q, num_heads, whole and whole[0])
        k = heads_of("key", inp.x_kv, kv_heads, whole and whole[1])
        v = heads_of("value", inp.x_kv, kv_heads)
        if norm is not None and norm_per_head:
            q = call_child("q_norm", norm.apply, params["q_norm"], {}, q)[0]
            k = call_child("k_norm", norm.apply, params["k_norm"], {}, k)[0]
        if rotary is not None:
            q = apply_rotary(q, positions, rotary)
            k = apply_rotary(k, positions, rotary)
        return q, k, v

    def dropout_rng(rng, train):
        if not (train and dropout_rate > 0.0):
            return None
        if rng is None:
            raise LayerError(
                f"MultiHeadAttention(dropout_rate={dropout_rate}) in train mode needs an "
                "rng: apply(..., train=True, rng=jax.random.key(...))"
            )
        return rng

    def apply(params, state, x, *, rng=None, train=False):
        inp = _read_input(x, decode)
        qkv, _, out, head_dim = widths(inp.x_q)
        check_keys(params, param_keys)
        if inp.cross and rotary is not None:
            raise LayerError(
                "rotary embeddings are for self-attention; got a separate key_value input"
            )
        dtype_ = compute_dtype(inp.x_q, dtype, param_dtype)
        batch, t_q = tuple(np.shape(inp.x_q)[:-2]), np.shape(inp.x_q)[-2]
        t_kv = np.shape(inp.x_kv)[-2]
        index, max_len = 0, t_kv
        ring = decode and sliding_window is not None
        ring = ring and np.shape(state.get("cached_key", ()))[-3:-2] >= (sliding_window,)
        if decode:
            index, max_len = _read_cache(state, np.shape(inp.x_q), (kv_heads, head_dim), ring)
        q_index = index + jnp.arange(t_q)
        positions = inp.positions
        positions = (
            jnp.broadcast_to(q_index, (*batch, t_q)) if positions is None else positions
        ).reshape(-1, t_q)
        segments = None if inp.segment_ids is None else jnp.reshape(inp.segment_ids, (-1, t_q))
        q, k, v = project(params, inp, positions, dtype_, head_dim)
        kv_segments, new_state = segments, state
        kv_index, pad = jnp.arange(max_len), inp.mask
        if decode:
            written = jnp.ones(positions.shape, jnp.int32) if segments is None else segments
            if ring:
                k, v, kv_segments, kv_index, new_state = _ring_keys(
                    state, k, v, written, index, max_len
                )
                if pad is not None:  # by absolute position
                    m = np.shape(pad)[-1]
                    pad = jnp.take(pad, jnp.clip(kv_index, 0, m - 1), axis=-1)
                    max_len = kv_index.shape[0]
            else:
                k, v, kv_segments, new_state = _write_cache(state, k, v, written, index)
            segments = written  # the cache's empty slots are segment 0: never attended
        pad = None if pad is None else _check_mask(pad, batch, max_len)
        drop = dropout_rng(rng, train)
        impl = _resolve(implementation, t_q=t_q, t_kv=t_kv, decode=decode, drop=drop is not None)
        if impl == "blockwise":
            y = blockwise_attention(
                q,
                k,
                v,
                pad=pad,
                segments=segments,
                kv_segments=kv_segments,
                causal=use_causal,
                window=sliding_window,
                scale=logits.scale,
                softcap=logits.softcap,
            ).astype(dtype_)
        elif decode and not ring and t_q == 1 and impl == "einsum" and drop is None:
            y = filled_cache_attention(  # a decode step reads the written slots only
                q,
                k,
                v,
                filled=index + t_q,
                q_index=q_index,
                q_segments=segments,
                kv_segments=kv_segments,
                pad=pad,
                causal=use_causal,
                window=sliding_window,
                scale=logits.scale,
                softcap=logits.softcap,
                dtype=dtype_,
            )
        else:
            mask = _mask(
                pad=pad,
                q_index=q_index,
                kv_index=kv_index,
                q_segments=segments,
                kv_segments=kv_segments,
                causal=use_causal,
                window=sliding_window,
                offset_zero=not decode,
            )
            y = _attend(q, k, v, mask, dtype_, impl, drop, dropout_rate, logits)
        y, _ = call_child(
            "out", out_dense(out).apply, params["out"], {}, jnp.reshape(y, (*batch, t_q, qkv))
        )
        if decode and not ring:
            # Past the end of the cache under jit: poison the output rather than wrap.
            y = jnp.where(index + t_q > max_len, jnp.nan, y).astype(y.dtype)
        return y, new_state

    return Layer(init, apply, name)
