"""Gemma 2 (``Gemma2ForCausalLM``): Gemma with sandwich norms, soft caps and alternating windows.

Its layers alternate sliding-window and full attention (``layer_types``: a mixed
stack), each branch's output is normalized too (``norm_placement="sandwich"``), the
attention logits are scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped, and
so are the output logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.models.hf.families.common import kinds_in, kinds_out, llama_entries, llama_in, llama_out
from nnjax.models.hf.families.gemma import gemma_activation
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Table

TABLE = Table(entries=llama_entries(post_norms=True), tied_head="lm_head.weight")


def gemma_types(hf: Mapping[str, Any], period: int) -> list[str]:
    """``layer_types``, or the pattern older configs imply: every ``period``-th layer full."""
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)
    ]
    return list(types)


def gemma2_in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Gemma 2's fields (Gemma 3 starts from them)."""
    return {
        **llama_in(hf, where),
        "activation": gemma_activation(hf),
        "norm_scale_plus_one": True,
        "embed_scale": True,
        "norm_placement": "sandwich",
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
        "attn_logit_softcap": hf.get("attn_logit_softcapping"),
        "final_logit_softcap": hf.get("final_logit_softcapping"),
    }


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x


def gemma2_out(c: Any) -> dict[str, Any]:
    types, configs = kinds_out(c, "sliding_attention" if c.sliding_window else "full_attention")
    windows = {k.sliding_window for k in configs.values()} - {None}
    return {
        **llama_out(c),
        "hidden_activation": c.activation,
        "attention_bias": c.qkv_bias,
        "query_pre_attn_scalar": _int_if_whole(c.query_pre_attn_scalar),  # HF: an int field
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
        "layer_types": types,
        "sliding_window": next(iter(windows), None),
    }


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    window = {"sliding_attention": {"sliding_window": int(hf.get("sliding_window") or 4096)}}
    return {**gemma2_in(hf, where), **kinds_in(gemma_types(hf, 2), window)}


FAMILY = Family(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    table=TABLE,
    config_in=_in,
    config_out=gemma2_out,
    tied_default=True,
)
