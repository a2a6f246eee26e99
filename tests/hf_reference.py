"""Tiny random transformers decoders and their weights copied into CausalLM params (tests only).

The mapping here is the test's own, written from transformers' parameter names; the
library's converter (``nnjax.models.hf``) is checked separately.
"""

from __future__ import annotations

import numpy as np

from nnjax.models import CausalLMConfig

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
)


_GEMMA = dict(head_dim=16, sliding_window=4, attention_bias=True, query_pre_attn_scalar=24)
NEW_FAMILIES = {
    # several layers, windows shorter than the tests' sequences, caps that bite, biases
    "gemma2": dict(
        _GEMMA, num_hidden_layers=4, attn_logit_softcapping=3.0, final_logit_softcapping=2.0
    ),
    "gemma3_text": dict(
        _GEMMA,
        num_hidden_layers=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
    ),
    "olmo2": dict(num_hidden_layers=3, attention_bias=True),
    "phi3": dict(num_hidden_layers=3, sliding_window=4, pad_token_id=0),
}
"""Tiny configs of the families of the second batch (on top of ``TINY``)."""


def hf_model(family: str, **overrides):
    """A float32 ``*ForCausalLM`` with random weights (seeded), in eval mode."""
    import torch
    import transformers as tr

    kw = {**TINY, **overrides}
    if family == "llama":
        config = tr.LlamaConfig(**kw)
        cls = tr.LlamaForCausalLM
    elif family == "qwen2":
        config = tr.Qwen2Config(**kw)
        cls = tr.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tr.Qwen3Config(**{"head_dim": 8, **kw})
        cls = tr.Qwen3ForCausalLM
    elif family == "mistral":
        config = tr.MistralConfig(**{"sliding_window": 4, **kw})
        cls = tr.MistralForCausalLM
    elif family == "gemma":
        config = tr.GemmaConfig(**{"head_dim": 16, "hidden_act": "gelu_pytorch_tanh", **kw})
        cls = tr.GemmaForCausalLM
    elif family in NEW_FAMILIES:
        config_cls, cls = {
            "gemma2": (tr.Gemma2Config, tr.Gemma2ForCausalLM),
            "gemma3_text": (tr.Gemma3TextConfig, tr.Gemma3ForCausalLM),
            "olmo2": (tr.Olmo2Config, tr.Olmo2ForCausalLM),
            "phi3": (tr.Phi3Config, tr.Phi3ForCausalLM),
        }[family]
        config = config_cls(**{**TINY, **NEW_FAMILIES[family], **overrides})
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"  # sliding windows and masks as written in the model
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # norms and biases away from their init, so every param matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def nnjax_config(model) -> CausalLMConfig:
    """The CausalLMConfig of a transformers model (the test's mapping)."""
    hf = model.config
    family = hf.model_type
    rope = dict(hf.rope_parameters or {})
    theta = rope.pop("rope_theta", 10000.0)
    scaling = None if rope.get("rope_type", "default") == "default" else tuple(sorted(rope.items()))
    act = getattr(hf, "hidden_act", "silu")
    return CausalLMConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None),
        mlp_hidden=hf.intermediate_size,
        max_position=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps,
        norm_scale_plus_one=family == "gemma",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=rope.get("partial_rotary_factor", 1.0),
        activation=act,
        qkv_bias=family == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        out_bias=bool(getattr(hf, "attention_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=getattr(hf, "sliding_window", None) if family == "mistral" else None,
        tie_embeddings=bool(hf.tie_word_embeddings),
        embed_scale=family == "gemma",
        family=family,
    )


_LAYER = {
    "input_layernorm.weight": ("ln_1", "scale"),
    "post_attention_layernorm.weight": ("ln_2", "scale"),
    "self_attn.q_proj": ("attn", "query"),
    "self_attn.k_proj": ("attn", "key"),
    "self_attn.v_proj": ("attn", "value"),
    "self_attn.o_proj": ("attn", "out"),
    "self_attn.q_norm.weight": ("attn", "q_norm", "scale"),
    "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
    "mlp.gate_proj": ("mlp", "gate"),
    "mlp.up_proj": ("mlp", "up"),
    "mlp.down_proj": ("mlp", "down"),
}


def _put(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def nnjax_params(model) -> dict:
    """CausalLM params (float32 NumPy) from the model's state dict."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return nnjax_params_from(sd, model.config)


def nnjax_params_from(sd: dict, hf_config) -> dict:
    """CausalLM params from a state dict of NumPy arrays (names in ``_LAYER`` per layer)."""
    n = hf_config.num_hidden_layers
    params: dict = {"tok_embed": {"embedding": sd["model.embed_tokens.weight"]}}
    params["ln_f"] = {"scale": sd["model.norm.weight"]}
    if not hf_config.tie_word_embeddings:
        params["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    layers = [{} for _ in range(n)]
    for i in range(n):
        prefix = f"model.layers.{i}."
        for name, value in sd.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if rest in _LAYER:
                _put(layers[i], _LAYER[rest], value)
                continue
            module, _, leaf = rest.rpartition(".")
            path = _LAYER[module]
            _put(
                layers[i],
                (*path, "kernel" if leaf == "weight" else "bias"),
                value.T if leaf == "weight" else value,
            )
    import jax

    params["blocks"] = {"stacked": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return params
