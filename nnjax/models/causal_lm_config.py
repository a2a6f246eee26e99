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
``blocks/stacked/mlp/router``      ``kernel (hidden_size, E)``            ``num_experts > 0``
``.../mlp/experts/stacked/gate|up`` ``kernel (L, E, hidden_size, F)``     ``num_experts > 0``
``.../mlp/experts/stacked/down``   ``kernel (L, E, F, hidden_size)``      ``num_experts > 0``
``.../mlp/shared_expert/...``      ``gate|up|down`` kernels               ``shared_expert_hidden``
``.../mlp/shared_expert_gate``     ``kernel (hidden_size, 1)``            ``shared_expert_hidden``
``ln_f/scale``                     ``(hidden_size,)``                     always
``lm_head/kernel``                 ``(hidden_size, vocab_size)``          not ``tie_embeddings``
=================================  =====================================  ===========================

``H`` is ``num_heads``, ``KV`` is ``num_kv_heads``, ``E`` is ``num_experts``, ``F``
``moe_hidden``, ``L`` ``num_layers`` (an expert's logical path is
``blocks/{i}/mlp/experts/{e}/gate/kernel``). Kernels are ``(in, out)`` (JAX's
orientation; Hugging Face's ``nn.Linear`` weights are the transpose). A norm's
``scale`` is stored as the checkpoint stores it: with ``norm_scale_plus_one``
(Gemma) the layer multiplies by ``1 + scale``.
"""

from __future__ import annotations

import dataclasses
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
        position: ``"rope"`` (rotary, rotate-half convention), ``"learned"`` (GPT-2) or
            ``"none"`` (no positions: a layer kind of a mixed stack, as Llama 4's NoPE layers).
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
        num_experts: ``E > 0``: the MLP is a mixture of ``E`` gated experts
            (:func:`nnjax.layers.MoE`; params ``blocks/*/mlp/router/kernel``,
            ``blocks/*/mlp/experts/{e}/{gate,up,down}/kernel``); 0: a dense MLP.
        num_experts_per_tok: experts per token (top-k).
        moe_hidden: each expert's hidden width (HF ``moe_intermediate_size``);
            ``None``: ``mlp_hidden``.
        shared_expert_hidden: a shared expert of this width with a sigmoid gate
            (Qwen2-MoE); ``None``: none.
        normalize_top_k: renormalise the chosen experts' probabilities (Mixtral, HF
            ``norm_topk_prob``).
        router_aux_loss_coef: weight of the load-balancing loss in the training
            objective (reported as ``aux/load_balance`` whatever the weight).
        moe_dispatch: the MoE dispatch (``"sorted"``, ``"capacity"``, ``"dense"``).
        qk_norm: RMSNorm on each head's q and k before the rotation (Qwen3, Gemma 3).
        qk_norm_per_head: ``False``: the q/k norms span the whole projection
            (``num_heads * head_dim`` and ``num_kv_heads * head_dim``; OLMo 2).
        norm_placement: ``"pre"`` (``x + f(norm(x))``), ``"sandwich"`` (also a norm on
            each branch's output: Gemma 2/3) or ``"post"`` (only there: OLMo 2).
        query_pre_attn_scalar: the attention logits are scaled by its ``-0.5`` power
            instead of ``head_dim``'s (Gemma 2/3); ``None``: ``head_dim``.
        attn_logit_softcap: ``cap * tanh(logits / cap)`` on the attention logits (Gemma 2).
        final_logit_softcap: the same on the output logits (Gemma 2).
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
        layer_types: each layer's kind name (``("sliding_attention", "full_attention") *
            13``, as HF's ``layer_types``); ``None``: every layer alike. The layers are a
            mixed stack (``nj.repeat`` of a pattern): still one scan per periodic
            segment, and logical paths ``blocks/{i}/...`` for every layer.
        layer_kinds: ``{kind name: {field: value}}``, the fields of this config a kind
            overrides (``{"sliding_attention": {"sliding_window": 512},
            "full_attention": {"rope_theta": 1e6}}``); any per-block field may differ
            (window, rotary base and scaling, ``position="none"`` for a layer without
            positions). Kept as sorted pairs (hashable); a kind not named overrides nothing.
        family: the HF ``model_type`` this config came from (a key of
            ``nj.models.hf.FAMILIES``), for export.
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
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_hidden: int | None = None
    shared_expert_hidden: int | None = None
    normalize_top_k: bool = False
    router_aux_loss_coef: float = 0.0
    moe_dispatch: str = "sorted"
    qk_norm: bool = False
    qk_norm_per_head: bool = True
    norm_placement: str = "pre"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
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
    layer_types: tuple[str, ...] | None = None
    layer_kinds: Any = None
    family: str = "llama"
    extra: Any = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        # dicts and lists in, sorted tuples kept: the config stays hashable (a static jit argument)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_kinds is not None:
            kinds = dict(self.layer_kinds)
            object.__setattr__(
                self,
                "layer_kinds",
                tuple(sorted((str(k), tuple(sorted(dict(v).items()))) for k, v in kinds.items())),
            )

    def kind_config(self, kind: str | None) -> CausalLMConfig:
        """The config of a layer of ``kind`` (``None``: this one): its overrides applied.

        Example:
            >>> c = nj.models.CausalLMConfig(num_layers=4,
            ...     layer_types=("sliding_attention", "full_attention") * 2,
            ...     layer_kinds={"sliding_attention": {"sliding_window": 8}})
            >>> c.kind_config("sliding_attention").sliding_window, c.kind_config("full_attention").sliding_window
            (8, None)
        """
        overrides = dict(dict(self.layer_kinds or ()).get(kind, ()))
        if not overrides:
            return self
        return dataclasses.replace(self, layer_types=None, layer_kinds=None, **overrides)

    def kinds(self) -> list[str | None]:
        """Every layer's kind name (``[None] * num_layers`` without ``layer_types``)."""
        return list(self.layer_types) if self.layer_types else [None] * self.num_layers
