"""Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2 whose MLP is routed experts plus a gated shared
expert; ``decoder_sparse_step`` / ``mlp_only_layers`` layers keep a dense MLP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.families.common import llama_in, llama_out, qwen_sliding_in, qwen_sliding_out
from nnjax.models.hf.families.moe_common import (
    attention_entries,
    dense_entries,
    expert_entries,
    moe_in,
    moe_out,
    shared_entries,
)
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Table


def qwen_moe_in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Qwen2/3-MoE's MoE fields and windows (one of the two may vary by layer)."""
    # transformers 5 writes Qwen3-MoE's count as num_local_experts, 4 as num_experts
    experts = hf.get("num_experts", hf.get("num_local_experts")) or 0
    moe = moe_in(hf, where, num_experts=int(experts),
                 moe_hidden=int(hf["moe_intermediate_size"]))  # fmt: skip
    windows = qwen_sliding_in(hf, where)
    if "layer_types" in moe and "layer_types" in windows:
        raise CheckpointError(
            f"{where}: sliding windows on some layers and dense MLPs on others together are "
            "not supported"
        )
    return {**moe, **windows}


def qwen_moe_out(c: Any) -> dict[str, Any]:
    out = {
        **llama_out(c),
        "moe_intermediate_size": c.moe_hidden or c.mlp_hidden,
        "num_experts": c.num_experts,
        **moe_out(c),
    }
    if c.layer_types is None or c.sliding_window is not None:
        out.update(qwen_sliding_out(c))
    else:  # the kinds are dense / moe: no windows
        out.update({"use_sliding_window": False, "sliding_window": None})
    return out


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    return {
        **llama_in(hf, where),
        "qkv_bias": bool(hf.get("qkv_bias", True)),
        "out_bias": False,
        "shared_expert_hidden": shared or None,
        **qwen_moe_in(hf, where),
    }


QWEN_MOE_DERIVED = (
    "num_experts",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "output_router_logits",
    "decoder_sparse_step",
    "mlp_only_layers",
    "norm_topk_prob",
    "moe_intermediate_size",
)
"""The HF fields both Qwen MoE families derive from the config on export."""


def _out(c: Any) -> dict[str, Any]:
    return {
        **qwen_moe_out(c),
        "qkv_bias": c.qkv_bias,
        "shared_expert_intermediate_size": c.shared_expert_hidden or 0,
    }


FAMILY = Family(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    table=Table(
        entries=attention_entries() + dense_entries() + expert_entries() + shared_entries(),
        tied_head="lm_head.weight",
    ),
    config_in=_in,
    config_out=_out,
    derived=(*QWEN_MOE_DERIVED, "shared_expert_intermediate_size"),
)
