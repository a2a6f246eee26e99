"""Gemma 1 (``GemmaForCausalLM``): Llama with ``1 + scale`` norms, scaled embeddings, a tied head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import LLAMA_TABLE, llama_in, llama_out
from nnjax.models.hf.families.record import Family


def gemma_activation(hf: Mapping[str, Any]) -> str:
    """Gemma configs name it ``hidden_activation``, and their ``"gelu"`` means the tanh one."""
    act = str(hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh"))
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {
        **llama_in(hf, where),
        "activation": gemma_activation(hf),
        "norm_scale_plus_one": True,
        "embed_scale": True,
    }


def _out(c: Any) -> dict[str, Any]:
    return {**llama_out(c), "attention_bias": c.qkv_bias}


FAMILY = Family(
    model_type="gemma",
    architecture="GemmaForCausalLM",
    table=LLAMA_TABLE,
    config_in=_in,
    config_out=_out,
    tied_default=True,
)
