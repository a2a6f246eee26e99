"""Mixtral (``MixtralForCausalLM``): Mistral whose MLP is 8 experts, top-2, renormalised."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import llama_in, llama_out
from nnjax.models.hf.families.moe_common import attention_entries, expert_entries, moe_in
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Table


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    experts = int(hf.get("num_local_experts", 8))
    moe = moe_in({**hf, "norm_topk_prob": True}, where, num_experts=experts,
                 moe_hidden=int(hf["intermediate_size"]))  # fmt: skip
    return {**llama_in(hf, where), "sliding_window": hf.get("sliding_window"), **moe}


def _out(c: Any) -> dict[str, Any]:
    return {
        **llama_out(c),
        "intermediate_size": c.moe_hidden or c.mlp_hidden,
        "sliding_window": c.sliding_window,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "router_aux_loss_coef": c.router_aux_loss_coef or 0.001,
        "output_router_logits": c.router_aux_loss_coef > 0,
        "router_jitter_noise": 0.0,
    }


FAMILY = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    table=Table(
        entries=attention_entries() + expert_entries("block_sparse_moe", ("w1", "w3", "w2")),
        tied_head="lm_head.weight",
    ),
    config_in=_in,
    config_out=_out,
    derived=(
        "num_local_experts",
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "output_router_logits",
        "router_jitter_noise",
    ),
)
