"""HF ``config.json`` <-> :class:`~nnjax.models.CausalLMConfig`, for every supported family.

What is common to every family is here (vocabulary, tied head, special ids, the
fields kept for export, the round-trip check); each family's own fields are its
record's ``config_in`` / ``config_out`` (:mod:`nnjax.models.hf.families`). Both
rotary formats are read: transformers 5's ``rope_parameters`` (``rope_theta`` and the
scaling in one dict) and 4's ``rope_theta`` + ``rope_scaling``; both are written, so
either version loads an export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.hf.config_checks import check_config
from nnjax.models.hf.families import family_of

__all__ = ["config_from_hf", "config_to_hf"]

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


def _special_ids(hf: Mapping[str, Any], generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """bos/eos/pad ids; ``generation_config.json`` wins (Llama 3 lists two eos ids there)."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = (generation or {}).get(key, hf.get(key))
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


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
    check_config(hf, generation, where)  # fields, types and values, before anything is read
    family = str(hf.get("model_type"))
    record = family_of(family, where)
    try:
        fields = record.config_in(hf, where)
    except KeyError as e:
        raise CheckpointError(f"{where}: {family} config has no {e.args[0]!r}") from None
    return CausalLMConfig(
        vocab_size=int(hf["vocab_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", record.tied_default)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        family=family,
        extra=dict(hf),  # a plain dict: configs pickle (checkpoint metadata, subprocesses)
        **fields,
        **_special_ids(hf, generation),
    )


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
    record = family_of(family, "config.family")
    extra = dict(config.extra or {}) if (config.extra or {}).get("model_type") == family else {}
    for key in (*_DERIVED, *record.derived):
        extra.pop(key, None)
    out = {
        **extra,
        "architectures": [record.architecture],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        **record.config_out(config),
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
