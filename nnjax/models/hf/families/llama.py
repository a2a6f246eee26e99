"""Llama (``LlamaForCausalLM``): the base of the Llama-shaped families."""

from __future__ import annotations

from typing import Any

from nnjax.models.hf.families.common import LLAMA_TABLE, llama_in, llama_out
from nnjax.models.hf.families.record import Family


def _out(c: Any) -> dict[str, Any]:
    return {**llama_out(c), "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias}


FAMILY = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    table=LLAMA_TABLE,
    config_in=llama_in,
    config_out=_out,
)
