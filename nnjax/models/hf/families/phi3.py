"""Phi-3 (``Phi3ForCausalLM``): Llama with fused ``qkv_proj`` and ``gate_up_proj`` tensors.

The fused tensors are split on load into ``attn/{query,key,value}`` and
``mlp/{gate,up}`` (each its own width: grouped-query k/v are narrower) and fused
again on export, so masks, LoRA targets and sharding rules see Llama's paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import llama_entries, llama_in, llama_out
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Table

TABLE = Table(entries=llama_entries(fused_qkv=True, fused_gate_up=True), tied_head="lm_head.weight")


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    fields = llama_in(hf, where)
    fields["head_dim"] = fields["hidden_size"] // fields["num_heads"]
    return {**fields, "sliding_window": hf.get("sliding_window")}


def _out(c: Any) -> dict[str, Any]:
    out = {**llama_out(c), "sliding_window": c.sliding_window}
    out.pop("head_dim")
    return out


FAMILY = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    table=TABLE,
    config_in=_in,
    config_out=_out,
    derived=("head_dim",),
)
