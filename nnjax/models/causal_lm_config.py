"""Configuration of the one decoder-only language model every LLM family is built from.

A family (GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma) is a :class:`CausalLMConfig`,
not a model file. The params of :func:`nnjax.models.CausalLM` have these paths
(``blocks/stacked/...`` leaves carry a leading axis ``num_layers``; their logical
paths are ``blocks/3/attn/query/kernel``):

=================================  =====================================  ===========================
path                               shape                                  present when
=================================  =====================================  ===========================
``tok_embed/embedding``            ``(vocab_size, hidden_size)``          always
``pos_embed/embedding``            ``(max_position, hidden_size)``        ``position == "learned"``
``blocks/stacked/ln_1/scale``      ``(hidden_size,)``                     always (``bias`` too for
                                                                          ``norm == "layer"`` with
                                                                          ``norm_bias``)
``blocks/stacked/attn/query/...``  ``kernel (hidden_size, H * head_dim)``  always; ``bias`` with
                                                                          ``qkv_bias``
``blocks/stacked/attn/key/...``    ``kernel (hidden_size, KV * head_dim)`` always; ``bias`` with
                                                                          ``qkv_bias``
``blocks/stacked/attn/value/...``  ``kernel (hidden_size, KV * head_dim)`` as ``key``
``blocks/stacked/attn/out/...``    ``kernel (H * head_dim, hidden_size)``  always; ``bias`` with
                                                                          ``out_bias``
``blocks/stacked/attn/q_norm``     ``scale (head_dim,)``                  ``qk_norm`` (Qwen3)
``blocks/stacked/attn/k_norm``     ``scale (head_dim,)``                  ``qk_norm``
``blocks/stacked/ln_2/scale``      ``(hidden_size,)``                     always
``blocks/stacked/mlp/gate|up``     ``kernel (hidden_size, mlp_hidden)``   ``mlp == "gated"``
``blocks/stacked/mlp/down``        ``kernel (mlp_hidden, hidden_size)``   ``mlp == "gated"``
``blocks/stacked/mlp/fc``          ``kernel (hidden_size, mlp_hidden)``   ``mlp == "plain"``
``blocks/stacked/mlp/proj``        ``kernel (mlp_hidden, hidden_size)``   ``mlp == "plain"``
``ln_f/scale``                     ``(hidden_size,)``                     always
``lm_head/kernel``                 ``(hidden_size, vocab_size)``          not ``tie_embeddings``
=================================  =====================================  ===========================

``H`` is ``num_heads``, ``KV`` is ``num_kv_heads``. Kernels are ``(in, out)`` (JAX's
orientation; Hugging Face's ``nn.Linear`` weights are the transpose). A norm's
``scale`` is stored as the checkpoint stores it: with ``norm_scale_plus_one``
(Gemma) the layer multiplies by ``1 + scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CausalLMConfig"]


@dataclass(frozen=True)
class CausalLMConfig:
    """Every option the decoder families need; defaults give a small Llama-shaped model.

    Attributes:
        vocab_size: token ids ``[0, vocab_size)``.
        hidden_size: model width ``d``.
        num_layers: decoder blocks (stacked by ``repeat``: compile time flat in depth).
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``KV`` (``H % KV == 0``; ``KV == H``: multi-head,
            ``KV == 1``: multi-query, else grouped-query). ``None``: ``num_heads``.
        head_dim: per-head width; ``None``: ``hidden_size // num_heads``.
        mlp_hidden: the MLP's hidden width (HF ``intermediate_size``).
        max_position: the longest sequence the positions allow (HF
            ``max_position_embeddings``; the learned table's rows).
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm).
        norm_eps: the norms' epsilon.
        norm_bias: LayerNorm with a bias (GPT-2); ignored for RMSNorm.
        norm_scale_plus_one: multiply by ``1 + scale`` (Gemma) instead of ``scale``.
        position: ``"rope"`` (rotary, rotate-half convention) or ``"learned"`` (GPT-2).
        rope_theta: rotary base.
        rope_scaling: HF's ``rope_scaling`` as a sorted tuple of ``(key, value)`` pairs
            (``(("factor", 8.0), ("rope_type", "llama3"), ...)``; hashable, so the
            config can be a static argument of ``jax.jit``) or ``None``.
        partial_rotary_factor: fraction of each head's dimensions that rotate.
        mlp: ``"gated"`` (``down(act(gate(x)) * up(x))``: SwiGLU / GeGLU) or ``"plain"``
            (``proj(act(fc(x)))``).
        activation: HF activation name (``"silu"``, ``"gelu_pytorch_tanh"``,
            ``"gelu_new"``, ``"gelu"``, ``"relu"``) or a callable.
        qkv_bias: biases on the q/k/v projections (Qwen2, GPT-2).
        out_bias: a bias on the attention output projection (GPT-2).
        mlp_bias: biases in the MLP (GPT-2).
        qk_norm: RMSNorm on each head's q and k before the rotation (Qwen3).
        sliding_window: each token attends to at most this many positions back
            (itself included), as HF's Mistral; ``None``: the whole prefix.
        tie_embeddings: the output head is ``tok_embed``'s transpose (no ``lm_head``).
        embed_scale: multiply the token embeddings by ``sqrt(hidden_size)`` (Gemma), in
            the embedding's dtype.
        dropout: embedding, attention and residual dropout probability.
        initializer_range: std of the normal init of kernels and tables.
        dtype: compute dtype (``jnp.bfloat16``); ``None``: the params' dtype.
        param_dtype: dtype of freshly initialised params.
        remat: recompute each block's activations in the backward pass.
        attention_implementation: the attention's backend (see
            ``nnjax.layers.attention.IMPLEMENTATIONS``); ``None``: einsum on CPU,
            ``jax.nn.dot_product_attention`` elsewhere.
        scan_unroll: blocks per iteration of the scan over blocks.
        lazy_logits_from: in training (``apply(..., train=True)``), return
            :class:`~nnjax.losses.LazyLogits` (the head's input and weight) instead of the
            ``(..., T, V)`` logits when ``batch x T x vocab_size`` reaches this many, so
            :func:`nnjax.losses.softmax_cross_entropy` computes the loss and gradient over
            vocabulary chunks without materialising them; ``None``: always logits. A
            head with adapters or quantized leaves always gives logits.
        bos_token_id, eos_token_id, pad_token_id: the special ids the checkpoint names
            (``eos_token_id`` may be a tuple); used by ``generate`` and the data readers.
        family: the HF ``model_type`` this config came from (``"llama"``, ``"qwen2"``,
            ``"qwen3"``, ``"mistral"``, ``"gemma"``, ``"gpt2"``), for export.
        extra: other HF config fields kept for a faithful export (read-only).
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_hidden: int = 172
    max_position: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    norm_scale_plus_one: bool = False
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    partial_rotary_factor: float = 1.0
    mlp: str = "gated"
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_embeddings: bool = False
    embed_scale: bool = False
    dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: Any = None
    param_dtype: Any = None
    remat: bool = False
    attention_implementation: str | None = None
    scan_unroll: int = 1
    lazy_logits_from: int | None = 1 << 24
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    family: str = "llama"
    extra: Any = field(default=None, compare=False, hash=False)
