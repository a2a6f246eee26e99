"""GPT: the GPT-2 / nanoGPT configuration of :func:`~nnjax.models.CausalLM`, with nanoGPT's names.

``GPT(config)`` maps token ids ``(B, T)`` to next-token logits ``(B, T, vocab)``:
token and learned position embeddings, dropout, ``n_layer`` pre-LayerNorm blocks
stacked by :func:`~nnjax.core.repeat` (one ``lax.scan``), a final LayerNorm, and an
output head tied to the token table. It is ``CausalLM(causal_lm_config(config))``:
the same params, paths and options. ``GPT(config, decode=True)`` takes the same
params and keeps each block's key/value cache in ``state``; :func:`~nnjax.models.generate`
uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError
from nnjax.core.paths import flatten, unflatten
from nnjax.layers.transformer import ACTIVATIONS
from nnjax.models.causal_lm import CausalLM
from nnjax.models.causal_lm_config import CausalLMConfig

__all__ = [
    "GPTConfig",
    "GPT",
    "ACTIVATIONS",
    "causal_lm_config",
    "weight_decay_mask",
]


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


def causal_lm_config(config: GPTConfig) -> CausalLMConfig:
    """The :class:`~nnjax.models.CausalLMConfig` of a :class:`GPTConfig` (GPT-2's layout).

    Example:
        >>> nj.models.causal_lm_config(nj.models.GPTConfig()).position
        'learned'
    """
    c = config
    if c.n_embd % c.n_head:
        raise ArgumentError(f"GPT: n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})")
    if not callable(c.activation) and c.activation not in ACTIVATIONS:
        raise ArgumentError(
            f"GPTConfig: activation must be one of {sorted(ACTIVATIONS)} or a callable"
        )
    return CausalLMConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        num_layers=c.n_layer,
        num_heads=c.n_head,
        mlp_hidden=c.mlp_ratio * c.n_embd,
        max_position=c.block_size,
        norm="layer",
        norm_eps=c.epsilon,
        norm_bias=c.bias,
        position="learned",
        mlp="plain",
        activation=c.activation,  # type: ignore[arg-type]  (a name or a callable)
        qkv_bias=c.bias,
        out_bias=c.bias,
        mlp_bias=c.bias,
        tie_embeddings=True,
        dropout=c.dropout,
        initializer_range=0.02,
        dtype=c.dtype,
        remat=c.remat,
        scan_unroll=c.scan_unroll,
        family="gpt2",
    )


def GPT(config: GPTConfig = GPTConfig(), *, decode: bool = False, name: str = "gpt") -> Layer:
    """A GPT language model: token ids ``(..., T)`` -> logits ``(..., T, vocab_size)``.

    ``CausalLM(causal_lm_config(config))``: ``h = Dropout(tok_embed[ids] +
    pos_embed[positions])``, then ``n_layer`` pre-LN blocks, ``ln_f``, and ``logits = h
    @ tok_embed.T`` (the head is tied to the token table). Init follows GPT-2 / nanoGPT:
    every kernel and table ``normal(0.02)``, biases 0, the residual projections
    (``attn/out``, ``mlp/proj``) ``normal(0.02 / sqrt(2 * n_layer))``. The input may be
    the dict of :func:`~nnjax.models.CausalLM` (``ids``, ``positions``, ``segment_ids``).

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
        ArgumentError: ``n_embd`` not divisible by ``n_head``, an unknown activation.
        LayerError: non-integer ids, ``T > block_size``, a decode cache overflow.

    Params:
        tok_embed/embedding: ``(vocab_size, n_embd)``, also the output head.
        pos_embed/embedding: ``(block_size, n_embd)``.
        blocks/stacked/...: a block's params (``ln_1``, ``attn/{query,key,value,out}``,
            ``ln_2``, ``mlp/{fc,proj}``), each with a leading axis ``n_layer``; logical
            paths ``blocks/3/attn/query/kernel``.
        ln_f: LayerNorm ``scale (n_embd,)``, ``bias (n_embd,)``.

    State (``decode=True``): as :func:`~nnjax.models.CausalLM`'s.

    Example:
        >>> cfg = nj.models.GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_embd=32)
        >>> params, _ = nj.models.GPT(cfg).init(key, jnp.zeros((2, 64), jnp.int32))
        >>> jax.tree.map(jnp.shape, params["blocks"]["stacked"]["attn"]["query"])
        {'bias': (2, 32), 'kernel': (2, 32, 32)}
    """
    return CausalLM(causal_lm_config(config), decode=decode, name=name)


def weight_decay_mask(params: Any) -> Any:
    """nanoGPT's decay groups: True on every ``kernel`` and ``embedding``, False on biases and norms.

    For ``optax.adamw(..., mask=weight_decay_mask(params))``. (nanoGPT decays params
    with two or more axes; stacked biases have two, so the rule goes by leaf name.)
    """
    return unflatten({p: p.rpartition("/")[2] in ("kernel", "embedding") for p in flatten(params)})
