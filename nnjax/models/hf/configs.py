"""HF ``config.json`` <-> :class:`~nnjax.models.CausalLMConfig`, for every supported family.

Both rotary formats are read: transformers 5's ``rope_parameters`` (``rope_theta`` and
the scaling in one dict) and 4's ``rope_theta`` + ``rope_scaling``; both are written,
so either version loads an export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.hf.tables import check_family

__all__ = ["config_from_hf", "config_to_hf"]

_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_TIED_BY_DEFAULT = ("gemma", "gpt2")
# fields the export derives from the config (the rest of ``extra`` is written back as read)
_DERIVED = (
    "layer_types",
    "hidden_activation",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "torch_dtype",
    "dtype",
)
# fields that are not part of the checkpoint's architecture
_RUNTIME = (
    "dtype",
    "param_dtype",
    "remat",
    "scan_unroll",
    "dropout",
    "extra",
    "lazy_logits_from",
)


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None, float]:
    """``(rope_theta, rope_scaling pairs or None, partial_rotary_factor)``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = {**scaling, **params}
    if "type" in scaling:  # transformers 4 wrote "type"
        scaling.setdefault("rope_type", scaling.pop("type"))
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None, partial
    return theta, tuple(sorted((k, _hashable(v)) for k, v in scaling.items())), partial


def _sliding_window(hf: Mapping[str, Any], family: str, where: str) -> int | None:
    if family == "mistral":
        return hf.get("sliding_window")
    if family not in ("qwen2", "qwen3") or not hf.get("use_sliding_window"):
        return None
    n = int(hf["num_hidden_layers"])
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    if all(k == "full_attention" for k in kinds):
        return None
    if all(k == "sliding_attention" for k in kinds):
        return int(hf["sliding_window"])
    raise CheckpointError(
        f"{where}: sliding-window attention on only some layers ({kinds}) is not supported"
    )


def _special_ids(hf: Mapping[str, Any], generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """bos/eos/pad ids; ``generation_config.json`` wins (Llama 3 lists two eos ids there)."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = (generation or {}).get(key, hf.get(key))
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _gpt2(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{where}: GPT-2 with {key}={hf[key]!r} is not supported")
    d = int(hf["n_embd"])
    return {
        "hidden_size": d,
        "num_layers": int(hf["n_layer"]),
        "num_heads": int(hf["n_head"]),
        "mlp_hidden": int(hf.get("n_inner") or 4 * d),
        "max_position": int(hf["n_positions"]),
        "norm": "layer",
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "norm_bias": True,
        "position": "learned",
        "mlp": "plain",
        "activation": str(hf.get("activation_function", "gelu_new")),
        "qkv_bias": True,
        "out_bias": True,
        "mlp_bias": True,
    }


def _llama_like(hf: Mapping[str, Any], family: str, where: str) -> dict[str, Any]:
    heads = int(hf["num_attention_heads"])
    theta, scaling, partial = _rope(hf)
    bias = bool(hf.get("attention_bias", False))
    # Gemma 1 configs name it hidden_activation, and their "gelu" means the tanh one
    act = str(hf.get("hidden_activation") or hf.get("hidden_act", "silu"))
    if family == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"
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
        "norm_scale_plus_one": family == "gemma",
        "position": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "partial_rotary_factor": partial,
        "mlp": "gated",
        "activation": act,
        "qkv_bias": True if family == "qwen2" else bias,
        "out_bias": False if family == "qwen2" else bias,
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "qk_norm": family == "qwen3",
        "sliding_window": _sliding_window(hf, family, where),
        "embed_scale": family == "gemma",
    }


def config_from_hf(
    hf: Mapping[str, Any],
    generation: Mapping[str, Any] | None = None,
    *,
    where: str = "config.json",
) -> CausalLMConfig:
    """The :class:`CausalLMConfig` of an HF ``config.json`` dict.

    Args:
        hf: the parsed ``config.json``.
        generation: the parsed ``generation_config.json`` (its bos/eos/pad ids win).
        where: the file named in errors.

    Raises:
        CheckpointError: an unsupported ``model_type`` or option, a missing field.

    Example:
        >>> c = nj.models.hf.config_from_hf({"model_type": "mistral", "vocab_size": 32000,
        ...     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        ...     "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
        ...     "rope_theta": 1e6, "eos_token_id": 2})
        >>> c.num_kv_heads, c.head_dim, c.sliding_window, c.rope_theta, c.eos_token_id
        (8, 128, 4096, 1000000.0, 2)
    """
    family = str(hf.get("model_type"))
    check_family(family, where)
    try:
        fields = _gpt2(hf, where) if family == "gpt2" else _llama_like(hf, family, where)
    except KeyError as e:
        raise CheckpointError(f"{where}: {family} config has no {e.args[0]!r}") from None
    return CausalLMConfig(
        vocab_size=int(hf["vocab_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family in _TIED_BY_DEFAULT)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        family=family,
        extra=dict(hf),  # a plain dict: configs pickle (checkpoint metadata, subprocesses)
        **fields,
        **_special_ids(hf, generation),
    )


def _rope_fields(c: CausalLMConfig) -> dict[str, Any]:
    scaling = dict(c.rope_scaling) if c.rope_scaling else None
    params = {"rope_theta": c.rope_theta, "rope_type": "default", **(scaling or {})}
    if c.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = c.partial_rotary_factor
    out = {"rope_theta": c.rope_theta, "rope_scaling": scaling, "rope_parameters": params}
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out


def _llama_like_out(c: CausalLMConfig) -> dict[str, Any]:
    out = {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads or c.num_heads,
        "head_dim": c.head_dim or c.hidden_size // c.num_heads,
        "hidden_act": c.activation,
        "max_position_embeddings": c.max_position,
        "rms_norm_eps": c.norm_eps,
        **_rope_fields(c),
    }
    if c.family in ("llama", "qwen3", "gemma"):
        out["attention_bias"] = c.qkv_bias
    if c.family == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.family == "mistral":
        out["sliding_window"] = c.sliding_window
    if c.family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = c.sliding_window is not None
        out["sliding_window"] = c.sliding_window
        if c.sliding_window is not None:
            out["max_window_layers"] = 0  # every layer slides
    return out


def _gpt2_out(c: CausalLMConfig) -> dict[str, Any]:
    return {
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": c.mlp_hidden,
        "n_positions": c.max_position,
        "activation_function": c.activation,
        "layer_norm_epsilon": c.norm_eps,
        **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), c.dropout),
    }


def _normal(c: CausalLMConfig) -> CausalLMConfig:
    """``c`` with the defaults spelled out (``num_kv_heads=None`` is ``num_heads``)."""
    return dataclasses.replace(
        c,
        num_kv_heads=c.num_kv_heads or c.num_heads,
        head_dim=c.head_dim or c.hidden_size // c.num_heads,
    )


def config_to_hf(config: CausalLMConfig, dtype: str | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict of ``config`` (``extra``'s other fields kept).

    Args:
        config: the model's config; ``family`` picks the HF architecture.
        dtype: the saved weights' dtype name (``"float32"``, ``"bfloat16"``).

    Raises:
        CheckpointError: ``config.family`` is unsupported, or the family cannot express
            an option of ``config`` (e.g. Qwen2 without q/k/v biases); the message
            names the fields.

    Example:
        >>> c = nj.models.hf.config_from_hf({"model_type": "gemma", "vocab_size": 100,
        ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4, "head_dim": 8})
        >>> hf = nj.models.hf.config_to_hf(c)
        >>> hf["architectures"], hf["tie_word_embeddings"], hf["num_key_value_heads"]
        (['GemmaForCausalLM'], True, 4)
    """
    family = config.family
    check_family(family, "config.family")
    extra = dict(config.extra or {}) if (config.extra or {}).get("model_type") == family else {}
    for key in _DERIVED:
        extra.pop(key, None)
    out = {
        **extra,
        "architectures": [_ARCH[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        **(_gpt2_out(config) if family == "gpt2" else _llama_like_out(config)),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (
            list(config.eos_token_id)
            if isinstance(config.eos_token_id, tuple)
            else config.eos_token_id
        ),
        "pad_token_id": config.pad_token_id,
    }
    if dtype is not None:
        out["torch_dtype"] = out["dtype"] = dtype
    back, want = _normal(config_from_hf(out)), _normal(config)
    lost = [
        f.name
        for f in dataclasses.fields(CausalLMConfig)
        if f.name not in _RUNTIME and getattr(back, f.name) != getattr(want, f.name)
    ]
    if lost:
        detail = ", ".join(f"{n}={getattr(config, n)!r}" for n in lost)
        raise CheckpointError(f"an HF {family} config cannot express {detail}")
    return out
