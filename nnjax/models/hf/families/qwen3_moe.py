"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 (per-head q/k norms) whose MLP is routed experts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import llama_in
from nnjax.models.hf.families.moe_common import attention_entries, dense_entries, expert_entries
from nnjax.models.hf.families.qwen2_moe import QWEN_MOE_DERIVED, qwen_moe_in, qwen_moe_out
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Table


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {**llama_in(hf, where), "qk_norm": True, **qwen_moe_in(hf, where)}


def _out(c: Any) -> dict[str, Any]:
    return {**qwen_moe_out(c), "attention_bias": c.qkv_bias}


FAMILY = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    table=Table(
        entries=attention_entries() + dense_entries() + expert_entries(),
        tied_head="lm_head.weight",
    ),
    config_in=_in,
    config_out=_out,
    derived=QWEN_MOE_DERIVED,
)
