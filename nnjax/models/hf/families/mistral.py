"""Mistral (``MistralForCausalLM``): Llama with a sliding window on every layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import LLAMA_TABLE, llama_in, llama_out
from nnjax.models.hf.families.record import Family


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {**llama_in(hf, where), "sliding_window": hf.get("sliding_window")}


def _out(c: Any) -> dict[str, Any]:
    return {**llama_out(c), "sliding_window": c.sliding_window}


FAMILY = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    table=LLAMA_TABLE,
    config_in=_in,
    config_out=_out,
)
