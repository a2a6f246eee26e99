"""CausalLM: the one decoder-only language model every family (GPT-2, Llama, Qwen, Mistral, Gemma) is.

A family is a :class:`~nnjax.models.causal_lm_config.CausalLMConfig`; the model is
``tok_embed`` (+ ``pos_embed``), ``num_layers`` :func:`~nnjax.layers.transformer.pre_norm_block` s
stacked by :func:`~nnjax.core.repeat` (one ``lax.scan``: compile time flat in depth),
``ln_f`` and the head (tied to ``tok_embed`` or ``lm_head``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank, shape_str
from nnjax.core.combinators import Layer, remat, repeat
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import call_child
from nnjax.layers.attention import Logits, MultiHeadAttention, QKNorm
from nnjax.layers.dense import Dense
from nnjax.layers.dropout import Dropout
from nnjax.layers.embed import Embedding, attend
from nnjax.layers.moe import MoE
from nnjax.layers.norm import LayerNorm, RMSNorm
from nnjax.layers.rope import rotary
from nnjax.layers.transformer import (
    ACTIVATIONS,
    MLP,
    NORM_PLACEMENTS,
    pre_norm_block,
    scale_plus_one,
)
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.training.chunked import LazyLogits

__all__ = ["CausalLM"]

_INPUT_KEYS = ("positions", "segment_ids", "lazy_logits")
# Scaled by 1 / sqrt(2 * num_layers) at init (GPT-2): the projections into the residual stream.
_RESIDUAL_KERNELS = (("attn", "out"), ("mlp", "proj"), ("mlp", "down"))


def _activation(name: str | Callable) -> Callable:
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ArgumentError(
            f"CausalLM: activation must be one of {sorted(ACTIVATIONS)} or a callable"
        )
    return ACTIVATIONS[name]


def _check_config(c: CausalLMConfig) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)``, after refusing what cannot be built."""
    kv = c.num_kv_heads or c.num_heads
    if c.head_dim is None and c.hidden_size % c.num_heads:
        raise ArgumentError(
            f"CausalLM: hidden_size ({c.hidden_size}) must be divisible by num_heads "
            f"({c.num_heads}) when head_dim is None"
        )
    if c.num_heads % kv:
        raise ArgumentError(
            f"CausalLM: num_heads ({c.num_heads}) must be divisible by num_kv_heads ({kv})"
        )
    for field, value, allowed in (
        ("norm", c.norm, ("rms", "layer")),
        ("position", c.position, ("rope", "learned", "none")),
        ("norm_placement", c.norm_placement, NORM_PLACEMENTS),
        ("mlp", c.mlp, ("gated", "plain")),
    ):
        if value not in allowed:
            raise ArgumentError(f"CausalLM: {field} must be one of {allowed}, got {value!r}")
    return kv, c.head_dim or c.hidden_size // c.num_heads


# fields a layer kind may not override: they shape the whole model, not one block
_MODEL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "tie_embeddings",
    "embed_scale",
    "final_logit_softcap",
    "initializer_range",
    "dtype",
    "param_dtype",
    "scan_unroll",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "layer_types",
    "layer_kinds",
    "family",
    "extra",
)


def _check_kinds(c: CausalLMConfig) -> None:
    if c.layer_types is not None and len(c.layer_types) != c.num_layers:
        raise ArgumentError(
            f"CausalLM: layer_types must name num_layers ({c.num_layers}) kinds, got "
            f"{len(c.layer_types)}"
        )
    fields = {f.name for f in dataclasses.fields(CausalLMConfig)}
    for kind, overrides in c.layer_kinds or ():
        bad = [k for k, _ in overrides if k not in fields or k in _MODEL_FIELDS]
        if bad:
            raise ArgumentError(
                f"CausalLM: layer_kinds[{kind!r}] overrides {bad}: a kind may override only "
                f"per-block fields (not {', '.join(_MODEL_FIELDS)})"
            )


def _blocks(c: CausalLMConfig, decode: bool) -> Layer:
    """The stack: ``repeat`` of one block, or of one block per layer kind (a mixed stack)."""
    _check_kinds(c)
    kinds = c.kinds()
    names = list(dict.fromkeys(kinds))
    built = [_block(c.kind_config(k), decode) for k in names]
    built = [remat(b) if c.remat else b for b in built]
    # remat keeps only each block's input; repeat's CPU policy would keep every large
    # matmul output besides (at 4,096 tokens of a Qwen2-0.5B shape, ~200 MB per layer).
    if len(built) == 1:
        return repeat(built[0], c.num_layers, unroll=c.scan_unroll, cpu_remat=not c.remat)
    layout = [names.index(k) for k in kinds]
    return repeat(built, c.num_layers, layout=layout, unroll=c.scan_unroll, cpu_remat=not c.remat)


def _norm(c: CausalLMConfig, param_dtype: Any, *, rms: bool = False) -> Layer:
    """The config's norm (``rms``: an RMSNorm whatever ``c.norm``, for q/k norms)."""
    init = jax.nn.initializers.zeros if c.norm_scale_plus_one else jax.nn.initializers.ones
    kw: dict[str, Any] = dict(
        epsilon=c.norm_eps, scale_init=init, dtype=c.dtype, param_dtype=param_dtype
    )
    layer_norm = c.norm == "layer" and not rms
    norm = LayerNorm(use_bias=c.norm_bias, **kw) if layer_norm else RMSNorm(**kw)
    return scale_plus_one(norm) if c.norm_scale_plus_one else norm


def _block(c: CausalLMConfig, decode: bool) -> Layer:
    kv, head_dim = _check_config(c)
    param_dtype = c.param_dtype or jnp.float32
    dense_kw: dict[str, Any] = dict(
        kernel_init=jax.nn.initializers.normal(c.initializer_range),
        dtype=c.dtype,
        param_dtype=param_dtype,
    )
    attn = MultiHeadAttention(
        c.num_heads,
        num_kv_heads=kv,
        qkv_features=c.num_heads * head_dim,
        out_features=c.hidden_size,
        causal=True,
        dropout_rate=c.dropout,
        qkv_bias=c.qkv_bias,
        out_bias=c.out_bias,
        rotary=rotary(c),
        qk_norm=QKNorm(_norm(c, param_dtype, rms=True), per_head=c.qk_norm_per_head)
        if c.qk_norm
        else None,
        sliding_window=c.sliding_window,
        logits=Logits(
            scale=None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5,
            softcap=c.attn_logit_softcap,
        ),
        decode=decode,
        implementation=c.attention_implementation,
        **dense_kw,
    )
    mlp = _mlp(c, dense_kw)
    return pre_norm_block(
        attn, mlp, _norm(c, param_dtype), dropout_rate=c.dropout, norms=c.norm_placement
    )


def _mlp(c: CausalLMConfig, dense_kw: dict[str, Any]) -> Layer:
    """The block's MLP: dense, or a mixture of experts when ``num_experts > 0``."""
    if c.num_experts <= 0:
        return MLP(
            c.mlp_hidden,
            gated=c.mlp == "gated",
            activation=_activation(c.activation),
            use_bias=c.mlp_bias,
            **dense_kw,
        )
    if c.mlp != "gated" or c.mlp_bias:
        raise ArgumentError("CausalLM: experts are gated MLPs without biases (mlp='gated')")
    return MoE(
        c.num_experts,
        c.num_experts_per_tok,
        c.moe_hidden or c.mlp_hidden,
        normalize_top_k=c.normalize_top_k,
        shared_features=c.shared_expert_hidden,
        activation=_activation(c.activation),
        dispatch=c.moe_dispatch,
        aux_loss_weight=c.router_aux_loss_coef,
        **dense_kw,
        name="mlp",
    )


def _read_ids(x: Any) -> tuple[Any, Any, Any]:
    """``(ids, positions or None, segment_ids or None)`` from ids or the input dict, checked."""
    if isinstance(x, Mapping):
        check_keys(x, ["ids"], _INPUT_KEYS, kind="input key")
        ids, positions, segments = x["ids"], x.get("positions"), x.get("segment_ids")
    else:
        ids, positions, segments = x, None, None
    check_rank(ids, 1, "(..., T)")
    for what, a in (("ids", ids), ("positions", positions), ("segment_ids", segments)):
        if a is None:
            continue
        if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
            raise LayerError(
                f"expected integer {'token ids' if what == 'ids' else what}, got "
                f"{'x' if what == 'ids' else what}.dtype == {jnp.result_type(a)} "
                f"(x.shape == {shape_str(np.shape(ids))})"
            )
        if np.shape(a) != np.shape(ids):
            raise LayerError(
                f"expected {what}.shape == ids.shape == {shape_str(np.shape(ids))}, got "
                f"{shape_str(np.shape(a))}"
            )
    return ids, positions, segments


def _lazy_request(x: Any) -> bool | None:
    """The input's ``lazy_logits`` flag: a Python bool, or ``None`` (the train-mode rule)."""
    flag = x.get("lazy_logits") if isinstance(x, Mapping) else None
    if flag is not None and not isinstance(flag, bool):
        raise LayerError(
            f"expected lazy_logits to be a Python bool (it chooses the output's type, so it "
            f"cannot be traced), got {type(flag).__name__}"
        )
    return flag


def CausalLM(config: CausalLMConfig, *, decode: bool = False, name: str = "causal_lm") -> Layer:
    """A decoder-only language model: token ids ``(..., T)`` -> logits ``(..., T, vocab_size)``.

    ``h = tok_embed[ids]`` (times ``sqrt(hidden_size)`` with ``embed_scale``, plus
    ``pos_embed[positions]`` with learned positions), dropout, ``num_layers`` pre-norm
    blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``), ``ln_f``, and the head
    (``h @ tok_embed.T`` when tied, else ``lm_head``). Every option (norm, rotary or
    learned positions, grouped-query heads, gated MLP, q/k norms, sliding window, biases)
    comes from the config; see :class:`~nnjax.models.CausalLMConfig`.

    ``x`` is int ids ``(..., T)`` or a dict ``{"ids": (..., T), "positions": (..., T),
    "segment_ids": (..., T)}`` (both optional):

    - ``positions``: each token's position (rotary angle or learned-table row); default
      ``0 .. T - 1`` (after the tokens already cached, when decoding). Give them for
      packed sequences (restarting at 0 in each) and left-padded batches.
    - ``segment_ids``: packed sequences; a token attends only to earlier tokens of its
      own segment; 0 marks padding (attended by nobody; its logits are meaningless).
    - ``lazy_logits`` (a Python bool, not an array): ``True`` returns
      :class:`~nnjax.losses.LazyLogits` (the head's input and weight; losses read them a
      vocabulary chunk at a time) in any mode, ``False`` always the logits. Absent:
      LazyLogits in training (``train=True``) once ``B * T * vocab_size`` reaches the
      config's ``lazy_logits_from``. An eval-mode pass that only feeds a loss (a
      preference reference, perplexity) asks for them. A head with adapters or
      quantized leaves always gives the logits.

    Init follows GPT-2: kernels and tables ``normal(initializer_range)``, biases 0,
    norms 1 (Gemma's stored ``scale`` 0), the projections into the residual stream
    (``attn/out``, ``mlp/proj`` or ``mlp/down``) ``normal(initializer_range / sqrt(2 *
    num_layers))``.

    With ``decode=True`` the same params are used; ``init(key, ids)`` with ``ids (B,
    max_len)`` makes the state: every block's KV cache (stacked) and ``position``, the
    number of tokens already seen. Each apply with ``ids (B, k)`` writes its keys and
    values after the cached ones (see :func:`nnjax.models.generate`).

    Parameter paths (globs for masks, LoRA targets and sharding rules, the same for every
    family; logical paths ``blocks/3/...`` name one layer, ``blocks/*/...`` every layer):
    ``tok_embed/embedding``, ``pos_embed/embedding`` (learned positions),
    ``blocks/*/ln_1/scale``, ``blocks/*/attn/{query,key,value,out}/kernel`` (+ ``bias``),
    ``blocks/*/attn/{q_norm,k_norm}/scale`` (Qwen3), ``blocks/*/ln_2/scale``,
    ``blocks/*/mlp/{gate,up,down}/kernel`` (gated) or ``blocks/*/mlp/{fc,proj}/kernel``
    (plain), ``ln_f/scale``, ``lm_head/kernel`` (untied). So LoRA on every attention
    projection is ``nj.finetune.add_lora(params, key, "blocks/*/attn/*/kernel")`` and its
    mask ``nj.finetune.mask(params, "blocks/*/attn/*/lora_*")`` for GPT-2 and Llama
    alike. Tensor parallelism: ``nj.sharding.tensor_parallel_rules()`` for the plain MLP
    (GPT-2), ``tensor_parallel_rules(column=nj.sharding.GATED_COLUMN,
    row=nj.sharding.GATED_ROW, kv_heads=num_kv_heads)`` for the gated ones (grouped-query
    k/v heads split when the model axis divides them, else replicated). The
    table with shapes is in :mod:`nnjax.models.causal_lm_config`.

    Args:
        config: a :class:`~nnjax.models.CausalLMConfig`.
        decode: keep a KV cache in ``state`` (see above).
        name: default name in a combinator.

    Returns:
        A Layer.

    Raises:
        ArgumentError: an inconsistent config.
        LayerError: non-integer ids, positions or segment ids of another shape, ``T >
            max_position`` with learned positions, an unknown input key, a decode cache
            overflow.

    State (``decode=True``):
        blocks/stacked/attn: ``cached_key``, ``cached_value`` ``(num_layers, B, max_len,
        KV, head_dim)``, ``cached_segment_ids`` ``(num_layers, B, max_len)``,
        ``cache_index`` ``(num_layers,)``; position: int32 ``()``.

    Example:
        >>> cfg = nj.models.CausalLMConfig(vocab_size=100, hidden_size=32, num_heads=4,
        ...                                num_kv_heads=2, mlp_hidden=64)
        >>> model = nj.models.CausalLM(cfg)
        >>> params, state = model.init(key, jnp.zeros((2, 16), jnp.int32))
        >>> jax.tree.map(jnp.shape, params["blocks"]["stacked"]["attn"]["key"])
        {'kernel': (2, 32, 16)}
        >>> packed = {"ids": jnp.ones((1, 6), jnp.int32),
        ...           "positions": jnp.array([[0, 1, 2, 0, 1, 0]]),
        ...           "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]])}
        >>> model.apply(params, state, packed)[0].shape
        (1, 6, 100)
    """
    # Over 80 lines only through the closures it returns (embed, check_length, init, embed_tokens,
    # apply; the longest is 37 lines): a layer's functions close over its constructor's arguments.
    c = config
    blocks = _blocks(c, decode)
    param_dtype = c.param_dtype or jnp.float32
    normal = jax.nn.initializers.normal(c.initializer_range)
    ln_f = _norm(c, param_dtype)
    drop = Dropout(c.dropout)
    learned = c.position == "learned"
    head = (
        None
        if c.tie_embeddings
        else Dense(
            c.vocab_size, use_bias=False, kernel_init=normal, dtype=c.dtype, param_dtype=param_dtype
        )
    )
    param_keys = ["tok_embed", "blocks", "ln_f"]
    param_keys += ["pos_embed"] if learned else []
    param_keys += [] if c.tie_embeddings else ["lm_head"]

    def embed(rows, dtype):
        return Embedding(
            rows, c.hidden_size, embedding_init=normal, dtype=dtype, param_dtype=param_dtype
        )

    def check_length(ids):
        t = np.shape(ids)[-1]
        if learned and t > c.max_position:
            raise LayerError(
                f"expected x.shape[-1] <= max_position == {c.max_position} (the learned "
                f"position table's rows), got x.shape == {shape_str(np.shape(ids))}"
            )
        return t

    def init(key, x):
        ids, _, _ = _read_ids(x)
        check_length(ids)
        k_tok, k_pos, k_blocks, k_ln, k_head = jax.random.split(key, 5)
        params = {
            "tok_embed": call_child("tok_embed", embed(c.vocab_size, c.dtype).init, k_tok, ids)[0]
        }
        if learned:
            positions = jnp.broadcast_to(jnp.arange(np.shape(ids)[-1]), np.shape(ids))
            params["pos_embed"] = call_child(
                "pos_embed", embed(c.max_position, c.dtype).init, k_pos, positions
            )[0]
        dtype_ = jnp.dtype(c.dtype or param_dtype)
        h = jax.ShapeDtypeStruct((*np.shape(ids), c.hidden_size), dtype_)
        stream = {"query": h, "positions": jax.ShapeDtypeStruct(np.shape(ids), jnp.int32)}
        p_blocks, s_blocks = call_child("blocks", blocks.init, k_blocks, stream)
        scale = 1.0 / math.sqrt(2 * c.num_layers)
        for stacked in p_blocks.values():  # one stack per kind of a mixed stack
            for a, b in _RESIDUAL_KERNELS:
                if b in stacked.get(a, {}):
                    kernel = stacked[a][b]["kernel"]
                    stacked[a][b]["kernel"] = kernel * jnp.asarray(scale, kernel.dtype)
        params["blocks"] = p_blocks
        params["ln_f"] = call_child("ln_f", ln_f.init, k_ln, h)[0]
        if head is not None:
            params["lm_head"] = call_child("lm_head", head.init, k_head, h)[0]
        if not decode:
            return params, {}
        return params, {"blocks": s_blocks, "position": jnp.zeros((), jnp.int32)}

    def embed_tokens(params, ids, positions, dtype_):
        # jnp.asarray: under jit a NumPy constant becomes a tracer, so Embedding skips
        # its eager range check (which cannot run on a traced value).
        h, _ = call_child(
            "tok_embed",
            embed(c.vocab_size, dtype_).apply,
            params["tok_embed"],
            {},
            jnp.asarray(ids),
        )
        if c.embed_scale:  # Gemma: sqrt(d) rounded to the embedding's dtype first
            h = h * jnp.asarray(math.sqrt(c.hidden_size), h.dtype)
        if learned:
            p, _ = call_child(
                "pos_embed", embed(c.max_position, dtype_).apply, params["pos_embed"], {}, positions
            )
            h = h + p
        return h  # (..., T, d)

    def lazy_head(params, h, request):
        """LazyLogits when asked (``request``), or by default when the logits would reach
        ``lazy_logits_from``, and the head is a plain table or kernel (no adapters, not
        quantized); else None."""
        big = c.lazy_logits_from is not None and (
            math.prod(np.shape(h)[:-1]) * c.vocab_size >= c.lazy_logits_from
        )
        if not (big if request is None else request):
            return None
        name, leaf = ("tok_embed", "embedding") if head is None else ("lm_head", "kernel")
        weight, scale = params[name][leaf], params[name].get(f"{leaf}_scale")
        int8 = scale is not None and jnp.result_type(weight) == jnp.int8
        if sorted(params[name]) != sorted([leaf] + ([f"{leaf}_scale"] if int8 else [])):
            return None  # adapters or NF4: the head's own apply
        dtype_ = h.dtype if c.dtype is None else jnp.dtype(c.dtype)
        return LazyLogits(
            h.astype(dtype_),
            weight if int8 else weight.astype(dtype_),
            transposed=head is None,
            softcap=c.final_logit_softcap,  # computed in float32 per chunk
            scale=scale,  # int8 rows (tied) / columns (head): dequantized a chunk at a time
        )

    def apply(params, state, x, *, rng=None, train=False):
        ids, positions, segments = _read_ids(x)
        request = _lazy_request(x)
        t = check_length(ids)
        check_keys(params, param_keys)
        if decode:
            check_keys(state, ["blocks", "position"], kind="state")
            offset = state["position"]
        else:
            check_keys(state, [], kind="state")
            offset = 0
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), np.shape(ids))
        r_drop, r_blocks = (None, None) if rng is None else tuple(jax.random.split(rng))
        table = params["tok_embed"].get("embedding_scale", params["tok_embed"].get("embedding"))
        dtype_ = c.dtype if c.dtype is not None else getattr(table, "dtype", None)
        h = embed_tokens(params, ids, positions, dtype_)
        h = drop.apply({}, {}, h, rng=r_drop, train=train)[0]
        stream = {"query": h, "positions": positions}
        if segments is not None:
            stream["segment_ids"] = segments
        stream, s_blocks = call_child(
            "blocks",
            blocks.apply,
            params["blocks"],
            state.get("blocks", {}),
            stream,
            rng=r_blocks,
            train=train,
        )
        h, _ = call_child("ln_f", ln_f.apply, params["ln_f"], {}, stream["query"])
        if request is None and not train:
            request = False
        lazy = None if decode else lazy_head(params, h, request)
        if lazy is not None:
            return lazy, {}
        if head is None:
            logits = call_child("tok_embed", attend, params["tok_embed"], h)  # (..., T, V)
        else:
            logits, _ = call_child("lm_head", head.apply, params["lm_head"], {}, h)
        if c.final_logit_softcap is not None:  # Gemma 2: in the logits' dtype, as transformers
            cap = jnp.asarray(c.final_logit_softcap, logits.dtype)
            logits = jnp.tanh(logits / cap) * cap
        if not decode:  # the blocks' state is the MoE auxiliary-loss channel, if any
            return logits, ({"blocks": s_blocks} if s_blocks else {})
        return logits, {"blocks": s_blocks, "position": (offset + t).astype(jnp.int32)}

    return Layer(init, apply, name)
