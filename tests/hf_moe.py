"""Tiny random transformers mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE), for tests.

``build(family)`` makes a seeded float32 model (eager attention, 3 layers, norms and
biases away from their init); ``config_of`` and ``params_of`` are the test's own
mapping to a CausalLMConfig and CausalLM params, written from transformers' parameter
names, so the library's converter is checked separately against them.
"""

from __future__ import annotations

import numpy as np

from nnjax.models import CausalLMConfig
from tests import hf_reference

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
VOCAB = 64
SEQ = 12  # longer than Mixtral's window below
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def build(family: str, folder=None, **overrides):
    """A random ``*ForCausalLM`` (eval, float32), saved to ``folder`` when given."""
    import torch
    import transformers as tr

    if family == "mixtral":
        kw = dict(intermediate_size=24, num_local_experts=4, sliding_window=4)
        config, cls = tr.MixtralConfig(**{**_COMMON, **kw, **overrides}), tr.MixtralForCausalLM
    elif family == "qwen2_moe":
        kw = dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=20,
            num_experts=4,
            norm_topk_prob=False,
        )
        config, cls = tr.Qwen2MoeConfig(**{**_COMMON, **kw, **overrides}), tr.Qwen2MoeForCausalLM
    else:
        kw = dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=4,
            norm_topk_prob=True,
            head_dim=8,
        )
        config, cls = tr.Qwen3MoeConfig(**{**_COMMON, **kw, **overrides}), tr.Qwen3MoeForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # norms and biases away from their init; routers spread out
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    if folder is not None:
        model.save_pretrained(folder)
    return model


def config_of(model) -> CausalLMConfig:
    hf = model.config
    family = hf.model_type
    rope = dict(hf.rope_parameters or {})
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
        rope_theta=rope.get("rope_theta", 10000.0),
        qkv_bias=family == "qwen2_moe",
        qk_norm=family == "qwen3_moe",
        sliding_window=hf.sliding_window if family == "mixtral" else None,
        num_experts=hf.num_local_experts if family == "mixtral" else hf.num_experts,
        num_experts_per_tok=hf.num_experts_per_tok,
        moe_hidden=hf.intermediate_size if family == "mixtral" else hf.moe_intermediate_size,
        shared_expert_hidden=getattr(hf, "shared_expert_intermediate_size", None),
        normalize_top_k=family == "mixtral" or bool(hf.norm_topk_prob),
        router_aux_loss_coef=hf.router_aux_loss_coef,
        tie_embeddings=bool(hf.tie_word_embeddings),
        family=family,
    )


def params_of(model) -> dict:
    """CausalLM params from the model's (transformers 5, fused-experts) state dict."""
    import jax

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    dense = {k: v for k, v in sd.items() if ".mlp." not in k}
    params = hf_reference.nnjax_params_from(dense, model.config)
    layers = []
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = sd[p + "experts.gate_up_proj"]  # (E, 2F, d)
        f = gate_up.shape[1] // 2
        mlp = {
            "router": {"kernel": sd[p + "gate.weight"].T},
            "experts": {
                "stacked": {
                    "gate": {"kernel": np.swapaxes(gate_up[:, :f], 1, 2)},
                    "up": {"kernel": np.swapaxes(gate_up[:, f:], 1, 2)},
                    "down": {"kernel": np.swapaxes(sd[p + "experts.down_proj"], 1, 2)},
                }
            },
        }
        if p + "shared_expert_gate.weight" in sd:
            mlp["shared_expert"] = {
                n: {"kernel": sd[f"{p}shared_expert.{n}_proj.weight"].T}
                for n in ("gate", "up", "down")
            }
            mlp["shared_expert_gate"] = {"kernel": sd[p + "shared_expert_gate.weight"].T}
        layers.append(mlp)
    params["blocks"]["stacked"]["mlp"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return params


def ids(shape, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=shape).astype(np.int32)


def greedy(model, prompt: np.ndarray, new_tokens: int = 8) -> np.ndarray:
    """transformers' greedy ``generate`` of ``new_tokens`` after ``prompt`` (B, T), unpadded."""
    import torch

    with torch.no_grad():
        return model.generate(
            torch.from_numpy(prompt).long(),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
