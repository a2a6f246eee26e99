"""What the Llama-shaped families share: their tensor table and ``config.json`` fields.

Llama, Mistral, Qwen2/3, Gemma and their descendants name their tensors alike
(``model.layers.{i}.self_attn.q_proj.weight``) and their configs alike
(``hidden_size``, ``num_attention_heads``, ``rope_theta``...); a family record starts
from these and states its differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.tables import Entry, Table, linear

__all__ = [
    "LLAMA_TABLE",
    "llama_entries",
    "llama_in",
    "llama_out",
    "rope_in",
    "rope_out",
    "qwen_sliding_in",
    "qwen_sliding_out",
    "kinds_in",
    "kinds_out",
]

_L, _B = "model.layers.{i}", "blocks/{i}"


def llama_entries(
    *,
    post_norms: bool = False,
    pre_norms: bool = True,
    fused_qkv: bool = False,
    fused_gate_up: bool = False,
) -> tuple[Entry, ...]:
    """The Llama-style tensor entries; the options are other families' layouts.

    Args:
        post_norms: ``post_attention_layernorm`` is the norm *after* the attention
            (``attn_post_norm``) and ``post_feedforward_layernorm`` the one after the MLP
            (Gemma 2/3 with ``pre_norms``, OLMo 2 without).
        pre_norms: the norms before attention and MLP exist (``input_layernorm``, and
            ``pre_feedforward_layernorm`` with ``post_norms``).
        fused_qkv: one ``qkv_proj`` holding query | key | value (Phi-3).
        fused_gate_up: one ``gate_up_proj`` holding gate | up (Phi-3).
    """
    attn = f"{_L}.self_attn"
    if fused_qkv:
        qkv = (
            Entry(
                f"{attn}.qkv_proj.weight",
                tuple(f"{_B}/attn/{p}/kernel" for p in ("query", "key", "value")),
                True,
            ),
        )
        qkv += (Entry(f"{attn}.qkv_proj.bias",
                      tuple(f"{_B}/attn/{p}/bias" for p in ("query", "key", "value")),
                      when="qkv_bias"),)  # fmt: skip
    else:
        qkv = (
            *linear(f"{attn}.q_proj", f"{_B}/attn/query", "qkv_bias"),
            *linear(f"{attn}.k_proj", f"{_B}/attn/key", "qkv_bias"),
            *linear(f"{attn}.v_proj", f"{_B}/attn/value", "qkv_bias"),
        )
    if fused_gate_up:
        gate_up = (Entry(f"{_L}.mlp.gate_up_proj.weight",
                         (f"{_B}/mlp/gate/kernel", f"{_B}/mlp/up/kernel"), True),)  # fmt: skip
    else:
        gate_up = (
            *linear(f"{_L}.mlp.gate_proj", f"{_B}/mlp/gate", "mlp_bias"),
            *linear(f"{_L}.mlp.up_proj", f"{_B}/mlp/up", "mlp_bias"),
        )
    if post_norms:
        norms_attn = (
            (Entry(f"{_L}.input_layernorm.weight", (f"{_B}/ln_1/scale",)),) if pre_norms else ()
        ) + (Entry(f"{_L}.post_attention_layernorm.weight", (f"{_B}/attn_post_norm/scale",)),)
        norms_mlp = (
            (Entry(f"{_L}.pre_feedforward_layernorm.weight", (f"{_B}/ln_2/scale",)),)
            if pre_norms
            else ()
        ) + (Entry(f"{_L}.post_feedforward_layernorm.weight", (f"{_B}/mlp_post_norm/scale",)),)
    else:
        norms_attn = (Entry(f"{_L}.input_layernorm.weight", (f"{_B}/ln_1/scale",)),)
        norms_mlp = (Entry(f"{_L}.post_attention_layernorm.weight", (f"{_B}/ln_2/scale",)),)
    return (
        Entry("model.embed_tokens.weight", ("tok_embed/embedding",)),
        *norms_attn,
        *qkv,
        *linear(f"{attn}.o_proj", f"{_B}/attn/out", "out_bias"),
        Entry(f"{attn}.q_norm.weight", (f"{_B}/attn/q_norm/scale",), when="qk_norm"),
        Entry(f"{attn}.k_norm.weight", (f"{_B}/attn/k_norm/scale",), when="qk_norm"),
        *norms_mlp,
        *gate_up,
        *linear(f"{_L}.mlp.down_proj", f"{_B}/mlp/down", "mlp_bias"),
        Entry("model.norm.weight", ("ln_f/scale",)),
        Entry("lm_head.weight", ("lm_head/kernel",), True, when="!tie_embeddings"),
    )


LLAMA_TABLE = Table(entries=llama_entries(), tied_head="lm_head.weight")
"""Llama, Mistral, Qwen2, Qwen3, Gemma: one table, their differences are its conditions."""


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def rope_in(params: Mapping[str, Any] | None, hf: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` fields.

    Reads transformers 5's ``rope_parameters`` dict (``params``) and 4's top-level
    ``rope_theta`` + ``rope_scaling`` (in ``hf``).
    """
    params = dict(params or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = {**scaling, **params}
    if "type" in scaling:  # transformers 4 wrote "type"
        scaling.setdefault("rope_type", scaling.pop("type"))
    scaling.pop("rope_theta", None)
    out: dict[str, Any] = {"rope_theta": theta, "partial_rotary_factor": partial}
    if scaling.get("rope_type", "default") == "default":
        out["rope_scaling"] = None
    else:
        out["rope_scaling"] = tuple(sorted((k, _hashable(v)) for k, v in scaling.items()))
    return out


def rope_out(theta: float, scaling: Any, partial: float) -> dict[str, Any]:
    """Both rotary formats (transformers 5's ``rope_parameters`` and 4's fields)."""
    scaling = dict(scaling) if scaling else None
    params = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    out = {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": params}
    if partial != 1.0:
        out["partial_rotary_factor"] = partial
    return out


def llama_in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields every Llama-shaped config has (``attention_bias`` on q/k/v and out)."""
    heads = int(hf["num_attention_heads"])
    bias = bool(hf.get("attention_bias", False))
    return {
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
        "mlp_hidden": int(hf["intermediate_size"]),
        "max_position": int(hf.get("max_position_embeddings", 2048)),
        "norm": "rms",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "position": "rope",
        **rope_in(hf.get("rope_parameters"), hf),
        "mlp": "gated",
        "activation": str(hf.get("hidden_activation") or hf.get("hidden_act", "silu")),
        "qkv_bias": bias,
        "out_bias": bias,
        "mlp_bias": bool(hf.get("mlp_bias", False)),
    }


def llama_out(c: Any) -> dict[str, Any]:
    """The inverse of :func:`llama_in` (without ``attention_bias``: not every family has it)."""
    return {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads or c.num_heads,
        "head_dim": c.head_dim or c.hidden_size // c.num_heads,
        "hidden_act": c.activation,
        "max_position_embeddings": c.max_position,
        "rms_norm_eps": c.norm_eps,
        **rope_out(c.rope_theta, c.rope_scaling, c.partial_rotary_factor),
    }


def kinds_in(
    types: Sequence[str], overrides: Mapping[str, Mapping[str, Any]], base: str = "full_attention"
) -> dict[str, Any]:
    """Config fields of HF's per-layer ``layer_types`` and each type's field values.

    One type on every layer: its values are plain fields (a uniform stack). Several:
    ``base``'s values are the plain fields, ``layer_types`` lists the types and
    ``layer_kinds`` holds every other type's values (a mixed stack).

    Example:
        >>> from nnjax.models.hf.families.common import kinds_in
        >>> kinds_in(["sliding_attention", "full_attention"], {"sliding_attention": {"sliding_window": 4}})
        {'layer_types': ('sliding_attention', 'full_attention'), 'layer_kinds': {'sliding_attention': {'sliding_window': 4}}}
    """
    present = list(dict.fromkeys(types))
    if len(present) == 1:
        return dict(overrides.get(present[0], {}))
    if base not in present:
        base = present[-1]
    return {
        **overrides.get(base, {}),
        "layer_types": tuple(types),
        "layer_kinds": {t: dict(overrides.get(t, {})) for t in present if t != base},
    }


def kinds_out(c: Any, uniform: str) -> tuple[list[str], dict[str, Any]]:
    """``(layer_types, {type: its config})``; a uniform config's layers are all ``uniform``."""
    types = list(c.layer_types) if c.layer_types else [uniform] * c.num_layers
    return types, {t: c.kind_config(t if c.layer_types else None) for t in dict.fromkeys(types)}


def qwen_sliding_in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Qwen2/3's windows: ``use_sliding_window`` on layers from ``max_window_layers`` on
    (or as ``layer_types`` says)."""
    if not hf.get("use_sliding_window"):
        return {"sliding_window": None}
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    window = {"sliding_attention": {"sliding_window": int(hf["sliding_window"])}}
    return kinds_in(types, window)


def qwen_sliding_out(c: Any) -> dict[str, Any]:
    types, configs = kinds_out(
        c, "sliding_attention" if c.sliding_window is not None else "full_attention"
    )
    windows = {c_.sliding_window for c_ in configs.values()} - {None}
    if len(windows) > 1:
        raise CheckpointError(f"an HF {c.family} config has one sliding window, got {windows}")
    window = next(iter(windows), None)
    out: dict[str, Any] = {"use_sliding_window": window is not None, "sliding_window": window}
    if window is not None:
        out["layer_types"] = types
        out["max_window_layers"] = next(i for i, t in enumerate(types) if t != "full_attention")
    return out
