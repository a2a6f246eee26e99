"""OLMo 2 (``Olmo2ForCausalLM``): norms after each branch only, q/k norms over the projection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import llama_entries, llama_in, llama_out
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Table

TABLE = Table(entries=llama_entries(post_norms=True, pre_norms=False), tied_head="lm_head.weight")


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    fields = llama_in(hf, where)
    # OLMo 2 has no head_dim field: its heads are hidden_size / num_attention_heads wide
    fields["head_dim"] = fields["hidden_size"] // fields["num_heads"]
    return {**fields, "norm_placement": "post", "qk_norm": True, "qk_norm_per_head": False}


def _out(c: Any) -> dict[str, Any]:
    out = {**llama_out(c), "attention_bias": c.qkv_bias}
    out.pop("head_dim")
    return out


FAMILY = Family(
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    table=TABLE,
    config_in=_in,
    config_out=_out,
    derived=("head_dim",),
)
