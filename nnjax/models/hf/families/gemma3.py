"""Gemma 3, text only (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``).

Gemma 2's block plus a per-head q/k norm; five sliding-window layers to one full
one by default, each kind with its own rotary base (``rope_parameters`` per layer
type: 10 000 on the sliding layers, 1 000 000 and any scaling on the full ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.families.common import kinds_in, kinds_out, rope_in, rope_out
from nnjax.models.hf.families.gemma2 import TABLE, gemma2_in, gemma2_out, gemma_types
from nnjax.models.hf.families.record import Family

_TYPES = ("sliding_attention", "full_attention")


def _ropes(hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each layer type's rotary fields: transformers 5's per-type ``rope_parameters``,
    or 4's ``rope_theta`` / ``rope_scaling`` (full) and ``rope_local_base_freq`` (sliding)."""
    params = hf.get("rope_parameters") or {}
    if any(t in params for t in _TYPES):
        return {t: rope_in(params.get(t), {}) for t in _TYPES}
    local = {"rope_theta": float(hf.get("rope_local_base_freq", 10000.0))}
    return {"full_attention": rope_in(params, hf), "sliding_attention": rope_in(local, {})}


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{where}: Gemma 3 with use_bidirectional_attention is not supported")
    ropes = _ropes(hf)
    window = int(hf.get("sliding_window") or 4096)
    per_type = {
        "full_attention": {**ropes["full_attention"], "sliding_window": None},
        "sliding_attention": {**ropes["sliding_attention"], "sliding_window": window},
    }
    pattern = int(hf.get("sliding_window_pattern") or 6)
    return {**gemma2_in(hf, where), "qk_norm": True, **kinds_in(gemma_types(hf, pattern), per_type)}


def _out(c: Any) -> dict[str, Any]:
    _, configs = kinds_out(c, "sliding_attention" if c.sliding_window else "full_attention")
    ropes = {
        t: rope_out(k.rope_theta, k.rope_scaling, k.partial_rotary_factor)["rope_parameters"]
        for t, k in configs.items()
    }
    out = {**gemma2_out(c), "rope_parameters": ropes}
    for key in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        out.pop(key, None)  # transformers 5 reads the per-type dict only
    return out


FAMILY = Family(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    table=TABLE,
    config_in=_in,
    config_out=_out,
    tied_default=True,
    derived=("rope_local_base_freq", "sliding_window_pattern"),
)
