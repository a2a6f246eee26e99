"""Qwen3 (``Qwen3ForCausalLM``): Llama with an RMSNorm on each head's q and k."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import (
    LLAMA_TABLE,
    llama_in,
    llama_out,
    qwen_sliding_in,
    qwen_sliding_out,
)
from nnjax.models.hf.families.record import Family


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {**llama_in(hf, where), "qk_norm": True, **qwen_sliding_in(hf, where)}


def _out(c: Any) -> dict[str, Any]:
    return {**llama_out(c), "attention_bias": c.qkv_bias, **qwen_sliding_out(c)}


FAMILY = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    table=LLAMA_TABLE,
    config_in=_in,
    config_out=_out,
)
