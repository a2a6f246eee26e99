"""GPT: a decoder-only transformer language model (GPT-2 / nanoGPT layout) and KV-cache generation.

``GPT(config)`` maps token ids ``(B, T)`` to next-token logits ``(B, T, vocab)``:
token and learned position embeddings, dropout, ``n_layer`` pre-LN
:func:`~nnjax.layers.attention.TransformerBlock` s stacked by :func:`~nnjax.core.repeat`
(one ``lax.scan``), a final LayerNorm, and an output head tied to the token table.
``GPT(config, decode=True)`` takes the same params and keeps each block's
key/value cache in ``state``; :func:`generate` uses it to sample new tokens with
one prefill call and a ``lax.scan`` over the new tokens, compiled once per shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank, shape_str
from nnjax.core.combinators import Layer, remat, repeat
from nnjax.core.errors import LayerError
from nnjax.core.layer import call_child
from nnjax.core.paths import STACKED, flatten, unflatten
from nnjax.layers.attention import TransformerBlock
from nnjax.layers.base import compute_dtype
from nnjax.layers.dropout import Dropout
from nnjax.layers.embed import Embedding, attend
from nnjax.layers.norm import LayerNorm

__all__ = [
    "GPTConfig",
    "GPT",
    "ACTIVATIONS",
    "generate",
    "make_generate",
    "weight_decay_mask",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
"""MLP activations by their Hugging Face names: ``gelu_new`` is GPT-2's tanh
approximation, ``gelu`` the exact erf form (nanoGPT's ``nn.GELU()``)."""

_PARAM_KEYS = ("tok_embed", "pos_embed", "blocks", "ln_f")
_RESIDUAL_KERNELS = (("attn", "out", "kernel"), ("mlp", "proj", "kernel"))


@dataclass(frozen=True)
class GPTConfig:
    """Configuration of :func:`GPT` (nanoGPT's names).

    Attributes:
        vocab_size: number of token ids ``V``.
        block_size: the longest sequence (rows of the position table).
        n_layer: transformer blocks.
        n_head: attention heads; ``n_embd`` must be divisible by it.
        n_embd: model width ``d``.
        dropout: embedding, attention-weights and residual dropout probability.
        mlp_ratio: the MLP's hidden width is ``mlp_ratio * n_embd``.
        bias: biases in every Dense and LayerNorm (``False``: none, as nanoGPT's ``bias=False``).
        dtype: computation dtype (``jnp.bfloat16``); ``None``: the params' dtype.
        remat: recompute each block's activations in the backward pass.
        scan_unroll: blocks per iteration of the scan over blocks (``repeat``'s ``unroll``);
            ``n_layer`` unrolls fully (compile time then grows with depth). The params
            layout is the same for every value.
        activation: a name in :data:`ACTIVATIONS` (``"gelu_new"``: GPT-2) or a callable.
        epsilon: LayerNorm epsilon (GPT-2: 1e-5).
    """

    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    mlp_ratio: int = 4
    bias: bool = True
    dtype: Any = None
    remat: bool = False
    scan_unroll: int = 1
    activation: str | Callable[[jax.Array], jax.Array] = "gelu_new"
    epsilon: float = 1e-5


def _activation(activation: str | Callable) -> Callable:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"GPTConfig: activation must be one of {sorted(ACTIVATIONS)} or a callable"
        )
    return ACTIVATIONS[activation]


def _check_ids(x: Any, block_size: int) -> int:
    check_rank(x, 1, "(..., T)")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise LayerError(
            f"expected integer token ids, got x.dtype == {dtype} (x.shape == {shape_str(np.shape(x))})"
        )
    t = np.shape(x)[-1]
    if t > block_size:
        raise LayerError(
            f"expected x.shape[-1] <= block_size == {block_size}, got x.shape == {shape_str(np.shape(x))}"
        )
    return t


def GPT(config: GPTConfig = GPTConfig(), *, decode: bool = False, name: str = "gpt") -> Layer:
    """A GPT language model: token ids ``(..., T)`` -> logits ``(..., T, vocab_size)``.

    ``h = Dropout(tok_embed[ids] + pos_embed[positions])``, then ``n_layer`` pre-LN
    blocks, ``ln_f``, and ``logits = h @ tok_embed.T`` (the head is tied to the token
    table). Init follows GPT-2 / nanoGPT: every kernel and table ``normal(0.02)``,
    biases 0, the residual projections (``attn/out``, ``mlp/proj``) ``normal(0.02 /
    sqrt(2 * n_layer))``.

    With ``decode=True`` the same params are used; ``init(key, ids)`` with ``ids (B,
    max_len)`` (``max_len <= block_size``) makes the state: every block's KV cache
    (stacked) and ``position``, the number of tokens already seen. Each apply with
    ``ids (B, k)`` uses positions ``position .. position + k - 1`` and advances it.

    Args:
        config: a :class:`GPTConfig`.
        decode: keep a KV cache in ``state`` (see above).
        name: default name in a combinator.

    Returns:
        A Layer.

    Raises:
        LayerError: non-integer ids, ``T > block_size``, a decode cache overflow.

    Params:
        tok_embed/embedding: ``(vocab_size, n_embd)``, also the output head.
        pos_embed/embedding: ``(block_size, n_embd)``.
        blocks/stacked/...: a TransformerBlock's params (``ln_1``, ``attn/{query,key,value,out}``,
            ``ln_2``, ``mlp/{fc,proj}``), each with a leading axis ``n_layer``; logical
            paths ``blocks/3/attn/query/kernel``.
        ln_f: LayerNorm ``scale (n_embd,)``, ``bias (n_embd,)``.

    State (``decode=True``):
        blocks/stacked/attn: ``cached_key``, ``cached_value`` ``(n_layer, B, max_len, n_head,
        head_dim)``, ``cache_index`` ``(n_layer,)``; position: int32 ``()``.

    Example:
        >>> cfg = nj.models.GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_embd=32)
        >>> params, _ = nj.models.GPT(cfg).init(key, jnp.zeros((2, 64), jnp.int32))
        >>> jax.tree.map(jnp.shape, params["blocks"]["stacked"]["attn"]["query"])
        {'bias': (2, 32), 'kernel': (2, 32, 32)}
    """
    c = config
    if c.n_embd % c.n_head:
        raise ValueError(f"GPT: n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})")
    normal = jax.nn.initializers.normal(0.02)
    block = TransformerBlock(
        c.n_head,
        mlp_ratio=c.mlp_ratio,
        dropout_rate=c.dropout,
        causal=True,
        activation=_activation(c.activation),
        epsilon=c.epsilon,
        decode=decode,
        use_bias=c.bias,
        kernel_init=normal,
        dtype=c.dtype,
    )
    blocks = repeat(remat(block) if c.remat else block, c.n_layer, unroll=c.scan_unroll)
    ln_f = LayerNorm(epsilon=c.epsilon, use_bias=c.bias, dtype=c.dtype, name="ln_f")
    drop = Dropout(c.dropout)

    def embed(table_size, dtype):
        return Embedding(table_size, c.n_embd, embedding_init=normal, dtype=dtype)

    def init(key, x):
        _check_ids(x, c.block_size)
        k_tok, k_pos, k_blocks, k_ln = jax.random.split(key, 4)
        p_tok = call_child("tok_embed", embed(c.vocab_size, c.dtype).init, k_tok, x)[0]
        p_pos = call_child("pos_embed", embed(c.block_size, c.dtype).init, k_pos, x)[0]
        dtype_ = compute_dtype(x, c.dtype)
        h = jax.ShapeDtypeStruct((*np.shape(x), c.n_embd), dtype_)
        p_blocks, s_blocks = call_child("blocks", blocks.init, k_blocks, h)
        scale = 1.0 / math.sqrt(2 * c.n_layer)
        stacked = p_blocks[STACKED]
        for a, b, leaf in _RESIDUAL_KERNELS:
            stacked[a][b][leaf] = stacked[a][b][leaf] * jnp.asarray(
                scale, stacked[a][b][leaf].dtype
            )
        params = {
            "tok_embed": p_tok,
            "pos_embed": p_pos,
            "blocks": p_blocks,
            "ln_f": call_child("ln_f", ln_f.init, k_ln, h)[0],
        }
        if not decode:
            return params, {}
        return params, {"blocks": s_blocks, "position": jnp.zeros((), jnp.int32)}

    def apply(params, state, x, *, rng=None, train=False):
        t = _check_ids(x, c.block_size)
        check_keys(params, _PARAM_KEYS)
        if decode:
            check_keys(state, ["blocks", "position"], kind="state")
            offset = state["position"]
        else:
            check_keys(state, [], kind="state")
            offset = 0
        r_drop, r_blocks = (None, None) if rng is None else tuple(jax.random.split(rng))
        table = params["tok_embed"].get("embedding")
        dtype_ = c.dtype if c.dtype is not None else getattr(table, "dtype", None)
        tok = embed(c.vocab_size, dtype_)
        pos = embed(c.block_size, dtype_)
        # jnp.asarray: under jit a NumPy constant becomes a tracer, so Embedding skips
        # its eager range check (which cannot run on a traced value).
        ids = jnp.asarray(x)
        h, _ = call_child("tok_embed", tok.apply, params["tok_embed"], {}, ids)  # (..., T, d)
        positions = offset + jnp.arange(t, dtype=jnp.int32)  # (T,)
        p, _ = call_child("pos_embed", pos.apply, params["pos_embed"], {}, positions)  # (T, d)
        h = drop.apply({}, {}, h + p, rng=r_drop, train=train)[0]
        h, s_blocks = call_child(
            "blocks",
            blocks.apply,
            params["blocks"],
            state.get("blocks", {}),
            h,
            rng=r_blocks,
            train=train,
        )
        h, _ = call_child("ln_f", ln_f.apply, params["ln_f"], {}, h)
        logits = call_child("tok_embed", attend, params["tok_embed"], h)  # (..., T, V)
        if not decode:
            return logits, {}
        return logits, {"blocks": s_blocks, "position": (offset + t).astype(jnp.int32)}

    return Layer(init, apply, name)


def weight_decay_mask(params: Any) -> Any:
    """nanoGPT's decay groups: True on every ``kernel`` and ``embedding``, False on biases and norms.

    For ``optax.adamw(..., mask=weight_decay_mask(params))``. (nanoGPT decays params
    with two or more axes; stacked biases have two, so the rule goes by leaf name.)
    """
    return unflatten({p: p.rpartition("/")[2] in ("kernel", "embedding") for p in flatten(params)})


# --- generation ----------------------------------------------------------------------


def _sample(logits: jax.Array, key: Any, temperature: Any, top_k: int | None, greedy: bool):
    """One token id per row of ``logits (B, V)``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate(params, prompt_ids, rng, temperature, *, config, max_new_tokens, top_k, greedy):
    """``(B, T0)`` -> ``(B, T0 + max_new_tokens)``: prefill, then a scan over new tokens."""
    b, t0 = prompt_ids.shape
    model = GPT(config, decode=True)
    cache_len = t0 + max_new_tokens - 1
    spec = jax.ShapeDtypeStruct((b, cache_len), jnp.int32)
    _, state_spec = jax.eval_shape(model.init, jax.random.key(0), spec)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_spec)
    keys = None if greedy else jax.random.split(rng, max_new_tokens)
    logits, state = model.apply(params, state, prompt_ids)  # (B, T0, V)
    first = _sample(logits[:, -1], None if greedy else keys[0], temperature, top_k, greedy)

    def step(carry, key):
        state, token = carry
        logits, state = model.apply(params, state, token[:, None])  # (B, 1, V)
        nxt = _sample(logits[:, -1], key, temperature, top_k, greedy)
        return (state, nxt), nxt

    rest_keys = None if greedy else keys[1:]
    _, rest = jax.lax.scan(step, (state, first), rest_keys, length=max_new_tokens - 1)
    return jnp.concatenate([prompt_ids, first[:, None], rest.T.astype(jnp.int32)], axis=1)


_generate_jit = jax.jit(_generate, static_argnames=("config", "max_new_tokens", "top_k", "greedy"))


def _check_generate(config, prompt_ids, max_new_tokens, temperature, top_k, rng):
    """Checked ``(prompt_ids as int32, greedy)``."""
    if np.ndim(prompt_ids) != 2 or not jnp.issubdtype(jnp.result_type(prompt_ids), jnp.integer):
        raise LayerError(
            f"expected integer prompt_ids of shape (B, T), got prompt_ids.shape == "
            f"{shape_str(np.shape(prompt_ids))} and dtype {jnp.result_type(prompt_ids)}"
        )
    t0 = np.shape(prompt_ids)[1]
    if max_new_tokens < 1 or t0 < 1:
        raise ValueError(
            f"generate: expected a non-empty prompt and max_new_tokens >= 1, got "
            f"prompt_ids.shape == {shape_str(np.shape(prompt_ids))}, max_new_tokens == {max_new_tokens}"
        )
    if t0 + max_new_tokens - 1 > config.block_size:
        raise LayerError(
            f"expected prompt_ids.shape[1] + max_new_tokens <= block_size + 1 == "
            f"{config.block_size + 1} (the KV cache does not slide), got prompt_ids.shape == "
            f"{shape_str(np.shape(prompt_ids))} and max_new_tokens == {max_new_tokens}"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
    greedy = temperature == 0 or top_k == 1
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not greedy and rng is None:
        raise ValueError(
            "generate samples when temperature > 0 and top_k != 1: pass rng=jax.random.key(...)"
        )
    return jnp.asarray(prompt_ids, jnp.int32), greedy


def generate(
    config: GPTConfig,
    params: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens with the KV cache.

    The prompt is run in one call (prefill), then a ``lax.scan`` feeds one token at a
    time. Each new token is sampled from ``softmax(logits / temperature)``, restricted
    to the ``top_k`` most likely ids if given; ``temperature=0`` or ``top_k=1`` is
    greedy (argmax, no ``rng`` needed). Compiled once per ``(config, prompt shape,
    max_new_tokens, top_k)``; ``temperature`` and the prompt's contents do not recompile.

    Args:
        config: the model's :class:`GPTConfig`.
        params: :func:`GPT` params (adapters beside the kernels are used).
        prompt_ids: int ``(B, T0)``.
        max_new_tokens: ``N >= 1``; ``T0 + N <= block_size + 1``.
        temperature: softmax temperature, ``>= 0``.
        top_k: sample among the ``top_k`` most likely tokens; ``None``: all.
        rng: a PRNG key, needed unless greedy.

    Returns:
        int32 ``(B, T0 + N)``: the prompt followed by the new tokens.

    Raises:
        LayerError: a bad prompt or a sequence longer than the position table.
        ValueError: sampling without ``rng``, bad ``temperature`` / ``top_k``.

    Example:
        >>> cfg = nj.models.GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_embd=32)
        >>> params, _ = nj.models.GPT(cfg).init(key, jnp.zeros((1, 64), jnp.int32))
        >>> out = nj.models.generate(cfg, params, jnp.array([[0]]), 10, top_k=10,
        ...                          rng=jax.random.key(0))
        >>> out.shape
        (1, 11)
    """
    prompt, greedy = _check_generate(config, prompt_ids, max_new_tokens, temperature, top_k, rng)
    return _generate_jit(
        params,
        prompt,
        rng,
        jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        config=config,
        max_new_tokens=int(max_new_tokens),
        top_k=None if greedy else top_k,
        greedy=greedy,
    )


def make_generate(
    config: GPTConfig,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Callable[..., jax.Array]:
    """A jitted ``fn(params, prompt_ids, rng=None) -> (B, T0 + max_new_tokens)``, see :func:`generate`.

    Its own compile cache: one compilation per prompt shape, whatever the contents.
    """
    sampling = not (temperature == 0 or top_k == 1)
    _check_generate(
        config,
        np.zeros((1, 1), np.int32),
        max_new_tokens,
        temperature,
        top_k,
        jax.random.key(0) if sampling else None,
    )

    @jax.jit
    def fn(params: Any, prompt_ids: Any, rng: jax.Array | None = None) -> jax.Array:
        prompt, greedy = _check_generate(
            config, prompt_ids, max_new_tokens, temperature, top_k, rng
        )
        return _generate(
            params,
            prompt,
            rng,
            jnp.asarray(1.0 if greedy else temperature, jnp.float32),
            config=config,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            greedy=greedy,
        )

    return fn
