"""Attention: multi-head dot-product attention (with a KV cache) and a pre-LN transformer block.

Inputs other than a plain array come in through ``x`` (the apply signature is fixed):

- ``x``: ``(..., T, d)``, self-attention.
- ``(x_q, x_kv)``: cross-attention, ``x_q (..., T_q, d_q)``, ``x_kv (..., T_kv, d_kv)``.
- ``{"query": x_q, "key_value": x_kv, "mask": mask}``: ``key_value`` and ``mask``
  optional; ``mask`` is a bool key-padding mask ``(..., T_kv)``, True = attend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_float, check_keys, check_rank, shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import LayerError
from nnjax.core.layer import call_child
from nnjax.layers.base import compute_dtype
from nnjax.layers.dense import Dense
from nnjax.layers.dropout import Dropout
from nnjax.layers.norm import LayerNorm

__all__ = ["MultiHeadAttention", "TransformerBlock", "CACHE_KEYS", "IMPLEMENTATIONS"]

Initializer = Any

CACHE_KEYS = ("cached_key", "cached_value", "cache_index")
"""State leaves of a ``decode=True`` attention: the KV cache and the next write position."""

IMPLEMENTATIONS = (None, "einsum", "xla", "cudnn")
"""``None``: ``einsum`` on CPU, ``jax.nn.dot_product_attention`` elsewhere. ``xla``/``cudnn``
are passed to ``jax.nn.dot_product_attention``; ``einsum`` is an explicit float32 softmax."""

_PROJECTIONS = ("query", "key", "value", "out")


def _split_input(x: Any) -> tuple[Any, Any, Any]:
    """``x`` -> ``(x_q, x_kv or None, mask or None)``; see the module docstring."""
    if isinstance(x, Mapping):
        check_keys(x, ["query"], ["key_value", "mask"], kind="input key")
        return x["query"], x.get("key_value"), x.get("mask")
    if isinstance(x, tuple):
        if len(x) != 2:
            raise LayerError(f"expected x == (x_q, x_kv), got a tuple of {len(x)} items")
        return x[0], x[1], None
    return x, None, None


def _spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


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


def _resolve(implementation: str | None) -> str | None:
    """The path to take: ``"einsum"``, or what to pass to ``jax.nn.dot_product_attention``."""
    if implementation is None:
        return "einsum" if jax.default_backend() == "cpu" else None
    return implementation


def _einsum_attention(q, k, v, mask, dtype, drop_rng, rate):
    """``softmax(q k^T / sqrt(hd) | mask) v`` with float32 logits; q ``(N, Tq, H, hd)``."""
    acc = jnp.promote_types(dtype, jnp.float32)
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=acc) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if drop_rng is not None:
        keep = jax.random.bernoulli(drop_rng, 1.0 - rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - rate), 0.0)
    return jnp.einsum("nhqk,nkhd->nqhd", weights.astype(dtype), v.astype(dtype))


def MultiHeadAttention(
    num_heads: int,
    *,
    qkv_features: int | None = None,
    out_features: int | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    use_bias: bool = True,
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
    dict ``{"query": x_q, "key_value": x_kv, "mask": mask}`` (``key_value`` and
    ``mask`` optional). ``mask (..., T_kv)`` is a bool key-padding mask, True =
    attend, combined with the causal mask. Leading batch axes of ``x_q`` and
    ``x_kv`` must agree. A query whose keys are all masked gets the mean of all values.

    ``causal``: query ``i`` attends keys ``j <= i`` (with ``T_q != T_kv`` aligned at the
    first position, as torch and ``jax.nn.dot_product_attention``).

    ``dropout_rate`` drops attention *weights* in train mode (needs ``rng``).
    ``jax.nn.dot_product_attention`` cannot, so training with ``dropout_rate > 0``
    always takes the explicit-softmax (einsum) path.

    ``decode=True`` keeps a KV cache for autoregressive generation (self-attention
    only, always causal): ``init(key, x)`` with ``x (B, max_len, d)`` creates the
    state; each apply with ``x (B, k, d)`` writes k/v at ``cache_index``, lets each query
    attend to the cached positions up to its own, and advances ``cache_index`` by ``k``. A mask,
    if given, is ``(B, max_len)``. Writing past ``max_len`` is a LayerError when the
    index is concrete (eager); under ``jit`` it cannot be detected at trace time and
    the output is NaN instead.

    Args:
        num_heads: number of heads ``H``; ``qkv_features`` must be divisible by it.
        qkv_features: width of q, k, v (``H * head_dim``); default ``d_q``.
        out_features: output width; default ``d_q``.
        causal: mask future keys.
        dropout_rate: attention-weights dropout probability.
        use_bias: biases in the four projections.
        kernel_init, bias_init: ``jax.nn.initializers`` for the projections.
        dtype: computation dtype; ``None`` keeps a float input's dtype.
        param_dtype: dtype of the params.
        decode: keep a KV cache in ``state`` (see above).
        implementation: one of ``IMPLEMENTATIONS``; ``None`` picks ``einsum`` on CPU
            (faster there) and ``jax.nn.dot_product_attention`` on GPU/TPU, by
            ``jax.default_backend()`` at trace time.
        name: default name in a combinator.

    Returns:
        A Layer: ``(..., T_q, out_features)`` from the inputs above.

    Raises:
        LayerError: bad ranks, batch axes or mask shape, ``d_q`` not divisible by
            ``num_heads``, a missing KV cache, a cache overflow, train-mode dropout
            without ``rng``.

    Params:
        query, key, value: Dense ``kernel (d, qkv_features)``, ``bias (qkv_features,)``;
            adapters beside the kernels (``lora_a``, ...) are used.
        out: Dense ``kernel (qkv_features, out_features)``, ``bias (out_features,)``.

    State (``decode=True``):
        cached_key, cached_value: ``(B, max_len, H, head_dim)``; cache_index: int32 ``()``.

    Example:
        >>> attn = nj.MultiHeadAttention(4, causal=True)
        >>> params, state = attn.init(key, jnp.zeros((2, 16, 32)))
        >>> jax.tree.map(jnp.shape, params["query"])
        {'bias': (32,), 'kernel': (32, 32)}
        >>> x = jnp.ones((2, 16, 32))
        >>> mask = jnp.arange(16)[None, :] < jnp.array([[16], [9]])  # (2, 16): 16 and 9 tokens
        >>> y, _ = attn.apply(params, state, {"query": x, "mask": mask})
        >>> y.shape
        (2, 16, 32)
    """
    if num_heads < 1:
        raise ValueError(f"MultiHeadAttention: num_heads must be >= 1, got {num_heads}")
    if qkv_features is not None and qkv_features % num_heads:
        raise ValueError(
            f"MultiHeadAttention: qkv_features ({qkv_features}) must be divisible by "
            f"num_heads ({num_heads})"
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"MultiHeadAttention: implementation must be one of {IMPLEMENTATIONS}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"MultiHeadAttention: dropout_rate must be in [0, 1), got {dropout_rate}")
    dense_kw = dict(
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
    )

    def inputs(x):
        """Checked ``(x_q, x_kv, mask, qkv, out)``."""
        x_q, x_kv, mask = _split_input(x)
        check_rank(x_q, 2, "(..., T, d)")
        check_float(x_q)
        if x_kv is None:
            x_kv = x_q
        elif decode:
            raise LayerError("decode=True is for self-attention; got a separate key_value input")
        else:
            check_rank(x_kv, 2, "(..., T_kv, d_kv)")
            check_float(x_kv)
            if np.shape(x_kv)[:-2] != np.shape(x_q)[:-2]:
                raise LayerError(
                    f"expected key_value.shape[:-2] == {shape_str(np.shape(x_q)[:-2])} (the "
                    f"query's batch axes), got key_value.shape == {shape_str(np.shape(x_kv))}"
                )
        d_q = np.shape(x_q)[-1]
        qkv = qkv_features or d_q
        if qkv % num_heads:
            raise LayerError(
                f"expected x.shape[-1] divisible by num_heads == {num_heads} (qkv_features "
                f"defaults to it), got x.shape == {shape_str(np.shape(x_q))}"
            )
        return x_q, x_kv, mask, qkv, out_features or d_q

    def init(key, x):
        x_q, x_kv, _, qkv, out = inputs(x)
        dtype_ = compute_dtype(x_q, dtype, param_dtype)
        keys = jax.random.split(key, 4)
        params = {}
        for name_, k, x_in in zip(_PROJECTIONS[:3], keys, (x_q, x_kv, x_kv), strict=False):
            params[name_] = Dense(qkv, **dense_kw).init(k, x_in)[0]
        params["out"] = Dense(out, **dense_kw).init(keys[3], _spec((qkv,), dtype_))[0]
        if not decode:
            return params, {}
        cache = jnp.zeros((*np.shape(x_q)[:-1], num_heads, qkv // num_heads), dtype_)
        state = {"cached_key": cache, "cached_value": cache, "cache_index": jnp.array(0, jnp.int32)}
        return params, state

    def read_cache(state, x_shape, head_shape):
        """The KV cache and ``cache_index`` from ``state``, checked against ``x (..., k, d)``."""
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
        if cache_shape[-2:] != head_shape:
            raise LayerError(
                f"expected cached_key.shape[-2:] == {shape_str(head_shape)} (num_heads, head_dim), "
                f"got cached_key.shape == {shape_str(cache_shape)}"
            )
        max_len = cache_shape[-3]
        index = state["cache_index"]
        if t_q > max_len or (not isinstance(index, jax.core.Tracer) and int(index) + t_q > max_len):
            at = "?" if isinstance(index, jax.core.Tracer) else int(index)
            raise LayerError(
                f"decode cache overflow: expected cache_index + x.shape[-2] <= max_len == "
                f"{max_len}, got cache_index == {at} and x.shape[-2] == {t_q}"
            )
        return state["cached_key"], state["cached_value"], index, max_len

    def apply(params, state, x, *, rng=None, train=False):
        x_q, x_kv, mask, qkv, out = inputs(x)
        check_keys(params, _PROJECTIONS)
        dtype_ = compute_dtype(x_q, dtype, param_dtype)
        batch, t_q = tuple(np.shape(x_q)[:-2]), np.shape(x_q)[-2]
        t_kv = np.shape(x_kv)[-2]
        heads = (num_heads, qkv // num_heads)

        def project(name_, x_in, features):
            dense = Dense(features, **dense_kw)
            y, _ = call_child(name_, dense.apply, params[name_], {}, jnp.asarray(x_in, dtype_))
            return y

        def heads_of(y):  # (..., T, H * hd) -> (N, T, H, hd)
            return jnp.reshape(y, (-1, y.shape[-2], *heads))

        q = heads_of(project("query", x_q, qkv))
        k = heads_of(project("key", x_kv, qkv))
        v = heads_of(project("value", x_kv, qkv))
        new_state = state
        q_offset = 0
        if decode:
            cached_key, cached_value, index, t_kv = read_cache(state, np.shape(x_q), heads)
            n_shape = (-1, t_kv, *heads)
            start = (0, index, 0, 0)
            cached_key = jnp.reshape(cached_key, n_shape)
            cached_value = jnp.reshape(cached_value, n_shape)
            k = jax.lax.dynamic_update_slice(cached_key, k.astype(cached_key.dtype), start)
            v = jax.lax.dynamic_update_slice(cached_value, v.astype(cached_value.dtype), start)
            new_state = {
                "cached_key": jnp.reshape(k, state["cached_key"].shape),
                "cached_value": jnp.reshape(v, state["cached_value"].shape),
                "cache_index": (index + t_q).astype(jnp.int32),
            }
            q_offset = index
        pad = None if mask is None else _check_mask(mask, batch, t_kv)[:, None, None, :]
        use_causal = causal or decode
        full = pad
        if use_causal:
            allowed = jnp.arange(t_kv)[None, :] <= (q_offset + jnp.arange(t_q))[:, None]
            full = allowed[None, None] if pad is None else pad & allowed
        drop_rng = None
        if train and dropout_rate > 0.0:
            if rng is None:
                raise LayerError(
                    f"MultiHeadAttention(dropout_rate={dropout_rate}) in train mode needs an "
                    "rng: apply(..., train=True, rng=jax.random.key(...))"
                )
            drop_rng = rng
        impl = _resolve(implementation)
        if impl == "einsum" or drop_rng is not None:
            y = _einsum_attention(q, k, v, full, dtype_, drop_rng, dropout_rate)
        else:
            plain_causal = use_causal and not decode
            y = jax.nn.dot_product_attention(
                q,
                k.astype(dtype_),
                v.astype(dtype_),
                mask=pad if plain_causal else full,
                is_causal=plain_causal,
                implementation=impl,
            )
        y = project("out", jnp.reshape(y, (*batch, t_q, qkv)), out)
        if decode:
            # Past the end of the cache under jit: poison the output rather than wrap.
            y = jnp.where(q_offset + t_q > t_kv, jnp.nan, y).astype(y.dtype)
        return y, new_state

    return Layer(init, apply, name)


def TransformerBlock(
    num_heads: int,
    *,
    mlp_ratio: int = 4,
    mlp_features: int | None = None,
    dropout_rate: float = 0.0,
    causal: bool = True,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
    epsilon: float = 1e-5,
    decode: bool = False,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    implementation: str | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "block",
) -> Layer:
    """A pre-LayerNorm transformer block (GPT-2 layout); keeps its input's shape.

    ``x = x + Dropout(Attn(LN1(x)))``, then ``x = x + Dropout(MLP(LN2(x)))`` with
    ``MLP = Dense(mlp) -> activation -> Dense(d)``. ``dropout_rate`` is used for the
    attention weights and both residual branches (as nanoGPT).

    ``x`` is ``(..., T, d)`` or ``{"query": x, "mask": mask}`` with a bool key-padding
    mask ``(..., T)`` (True = attend, ``mask`` optional); a dict input gives the same
    dict back with ``query`` replaced by the output, so masks flow through
    ``nj.repeat(block, n)``.

    Args:
        num_heads: attention heads; ``d`` must be divisible by it.
        mlp_ratio: hidden width of the MLP is ``mlp_ratio * d`` ...
        mlp_features: ... unless given here.
        dropout_rate: attention-weights and residual dropout probability.
        causal: causal self-attention.
        activation: the MLP's nonlinearity (``jax.nn.gelu``: tanh approximation).
        epsilon: LayerNorm epsilon.
        decode: KV cache in the attention (see :func:`MultiHeadAttention`).
        use_bias: biases in every Dense and LayerNorm (``False``: none, as nanoGPT's ``bias=False``).
        kernel_init, bias_init: for every Dense (GPT-2: ``normal(0.02)``).
        implementation: the attention's (see :func:`MultiHeadAttention`).
        dtype, param_dtype: computation and param dtypes.
        name: default name in a combinator.

    Params:
        ln_1, ln_2: LayerNorm ``scale (d,)``, ``bias (d,)`` (if ``use_bias``).
        attn: ``query``, ``key``, ``value``, ``out`` Dense ``(d, d)``.
        mlp: ``fc`` Dense ``(d, mlp)``, ``proj`` Dense ``(mlp, d)``.

    State: ``{"attn": KV cache}`` if ``decode``, else ``{}``.

    Example:
        >>> gpt_blocks = nj.repeat(nj.TransformerBlock(4), 6)
        >>> params, state = nj.TransformerBlock(4).init(key, jnp.zeros((2, 16, 32)))
        >>> jax.tree.map(jnp.shape, params["mlp"])
        {'fc': {'bias': (128,), 'kernel': (32, 128)}, 'proj': {'bias': (32,), 'kernel': (128, 32)}}
    """
    norm_kw = dict(epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    dense_kw = dict(
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    ln_1 = LayerNorm(**norm_kw, name="ln_1")
    ln_2 = LayerNorm(**norm_kw, name="ln_2")
    attn = MultiHeadAttention(
        num_heads,
        causal=causal,
        dropout_rate=dropout_rate,
        decode=decode,
        implementation=implementation,
        **dense_kw,
    )
    drop = Dropout(dropout_rate)

    def split(x):
        if isinstance(x, Mapping):
            check_keys(x, ["query"], ["mask"], kind="input key")
            x_in, mask = x["query"], x.get("mask")
        elif isinstance(x, tuple):
            raise LayerError(
                "TransformerBlock is self-attention: expected x or a dict, got a tuple"
            )
        else:
            x_in, mask = x, None
        check_rank(x_in, 2, "(..., T, d)")
        d = np.shape(x_in)[-1]
        return x_in, mask, d, mlp_features or mlp_ratio * d

    def init(key, x):
        x_in, _, d, hidden = split(x)
        k_ln1, k_attn, k_ln2, k_fc, k_proj = jax.random.split(key, 5)
        dtype_ = compute_dtype(x_in, dtype, param_dtype)
        p_attn, s_attn = call_child("attn", attn.init, k_attn, x_in)
        params = {
            "ln_1": ln_1.init(k_ln1, x_in)[0],
            "attn": p_attn,
            "ln_2": ln_2.init(k_ln2, x_in)[0],
            "mlp": {
                "fc": Dense(hidden, **dense_kw).init(k_fc, x_in)[0],
                "proj": Dense(d, **dense_kw).init(k_proj, _spec((hidden,), dtype_))[0],
            },
        }
        return params, ({"attn": s_attn} if s_attn else {})

    def apply(params, state, x, *, rng=None, train=False):
        x_in, mask, d, hidden = split(x)
        check_keys(params, ["ln_1", "attn", "ln_2", "mlp"])
        check_keys(state, [], ["attn"], kind="state")
        mlp = params["mlp"]
        r_attn, r_1, r_2 = (None,) * 3 if rng is None else tuple(jax.random.split(rng, 3))

        h, _ = call_child("ln_1", ln_1.apply, params["ln_1"], {}, x_in)
        a_in = h if mask is None else {"query": h, "mask": mask}
        a, s_attn = call_child(
            "attn", attn.apply, params["attn"], state.get("attn", {}), a_in, rng=r_attn, train=train
        )
        y = x_in + drop.apply({}, {}, a, rng=r_1, train=train)[0]
        h, _ = call_child("ln_2", ln_2.apply, params["ln_2"], {}, y)
        h, _ = call_child("mlp/fc", Dense(hidden, **dense_kw).apply, mlp.get("fc", {}), {}, h)
        h = activation(h)
        h, _ = call_child("mlp/proj", Dense(d, **dense_kw).apply, mlp.get("proj", {}), {}, h)
        y = y + drop.apply({}, {}, h, rng=r_2, train=train)[0]
        new_state = {"attn": s_attn} if s_attn else {}
        if not isinstance(x, Mapping):
            return y, new_state
        return ({"query": y} if mask is None else {"query": y, "mask": mask}), new_state

    return Layer(init, apply, name)
