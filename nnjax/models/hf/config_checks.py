"""``config.json`` and ``adapter_config.json`` are input: checked field by field before any tensor is read.

A file that is not a JSON object, lacks a field the model needs, has a field of the
wrong type (``"32"``, ``32.0`` or ``true`` where a count is meant) or an impossible
value (zero heads, key/value heads that do not divide the heads, negative layers, an
unknown rotary type or activation) is a :class:`~nnjax.core.errors.CheckpointError`
naming the file and the field. Fields are checked by the table :data:`FIELDS` wherever
they appear, whatever the family; :data:`REQUIRED` lists what each family must have.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from nnjax.core.errors import CheckpointError

__all__ = [
    "Field",
    "FIELDS",
    "ADAPTER_FIELDS",
    "REQUIRED",
    "read_json",
    "check_config",
    "check_adapter_config",
]


class Field(NamedTuple):
    """What one field may hold: ``kind`` (``int``, ``float``, ``bool``, ``str``, ``ids``,
    ``dict``, ``names``), a lower bound (``above``: strictly), and whether null is allowed."""

    kind: str
    least: float | None = None
    above: bool = False
    null: bool = False
    most: float | None = None


_COUNT = Field("int", 1)
_SIZE_OR_NULL = Field("int", 1, null=True)
_POSITIVE = Field("float", 0, above=True)
_FLAG = Field("bool")
_IDS = Field("ids", null=True)

FIELDS: dict[str, Field] = {
    "model_type": Field("str"),
    "vocab_size": _COUNT,
    "hidden_size": _COUNT,
    "intermediate_size": _COUNT,
    "num_hidden_layers": _COUNT,
    "num_attention_heads": _COUNT,
    "num_key_value_heads": _SIZE_OR_NULL,
    "head_dim": _SIZE_OR_NULL,
    "max_position_embeddings": _COUNT,
    "n_embd": _COUNT,
    "n_layer": _COUNT,
    "n_head": _COUNT,
    "n_positions": _COUNT,
    "n_inner": _SIZE_OR_NULL,
    "sliding_window": _SIZE_OR_NULL,
    "max_window_layers": Field("int", 0),
    "rms_norm_eps": _POSITIVE,
    "layer_norm_epsilon": _POSITIVE,
    "rope_theta": _POSITIVE,
    "partial_rotary_factor": Field("float", 0, above=True, most=1),
    "initializer_range": Field("float", 0),
    "tie_word_embeddings": _FLAG,
    "attention_bias": _FLAG,
    "mlp_bias": _FLAG,
    "use_sliding_window": _FLAG,
    "hidden_act": Field("str", null=True),
    "hidden_activation": Field("str", null=True),
    "activation_function": Field("str"),
    "rope_scaling": Field("dict", null=True),
    "rope_parameters": Field("dict", null=True),
    "bos_token_id": _IDS,
    "eos_token_id": _IDS,
    "pad_token_id": _IDS,
    "num_experts": Field("int", 0),
    "num_local_experts": Field("int", 0),
    "num_experts_per_tok": _COUNT,
    "moe_intermediate_size": _COUNT,
    "shared_expert_intermediate_size": Field("int", 0),
    "decoder_sparse_step": _COUNT,
    "norm_topk_prob": _FLAG,
    "output_router_logits": _FLAG,
    "router_aux_loss_coef": Field("float", 0),
    "router_jitter_noise": Field("float", 0),
}
"""``config.json`` (and ``generation_config.json``) fields, checked wherever they appear."""

ADAPTER_FIELDS: dict[str, Field] = {
    "peft_type": Field("str"),
    "r": _COUNT,
    "lora_alpha": Field("float", 0, above=True),
    "target_modules": Field("names", null=True),
    "use_rslora": _FLAG,
    "use_dora": _FLAG,
    "fan_in_fan_out": _FLAG,
    "bias": Field("str"),
    "rank_pattern": Field("dict", null=True),
    "alpha_pattern": Field("dict", null=True),
    "modules_to_save": Field("names", null=True),
}
"""``adapter_config.json`` fields."""

REQUIRED: dict[str, tuple[str, ...]] = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    "": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ),  # every other (Llama-like) family
    "adapter": ("peft_type", "r", "lora_alpha"),
}


def read_json(path: str) -> Any:
    """The parsed JSON file at ``path``.

    Raises:
        CheckpointError: the file does not exist or is not valid JSON (named).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (not a Hugging Face model folder?)")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _problem(value: Any, rule: Field) -> str | None:
    """What is wrong with ``value`` under ``rule``, or None."""
    if value is None:
        return None if rule.null else "expected a value, got null"
    if rule.kind == "ids":
        ids = value if isinstance(value, list) else [value]
        ok = all(_is_int(i) and i >= 0 for i in ids)
        return None if ok else f"expected a token id >= 0 or a list of them, got {value!r}"
    if rule.kind == "names":
        names = [value] if isinstance(value, str) else value
        ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
        return None if ok else f"expected a name or a list of names, got {value!r}"
    number = rule.kind in ("int", "float")
    types = {"int": _is_int(value), "bool": isinstance(value, bool), "str": isinstance(value, str)}
    types["float"] = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    types["dict"] = isinstance(value, Mapping)
    if not types[rule.kind]:
        want = {"int": "an int", "float": "a finite number", "bool": "true or false"}
        return f"expected {want.get(rule.kind, 'a ' + rule.kind)}, got {value!r}"
    if number and rule.least is not None:
        low = value <= rule.least if rule.above else value < rule.least
        if low or (rule.most is not None and value > rule.most):
            bound = f"{'>' if rule.above else '>='} {rule.least}"
            bound += f" and <= {rule.most}" if rule.most is not None else ""
            return f"expected a value {bound}, got {value!r}"
    return None


def _check_fields(data: Any, table: Mapping[str, Field], required: tuple[str, ...], where: str):
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for name in required:
        if name not in data:
            raise CheckpointError(f"{where}: lacks the field {name!r}")
    for name, rule in table.items():
        if name in data and (bad := _problem(data[name], rule)) is not None:
            raise CheckpointError(f"{where}: field {name!r}: {bad}")


def _check_rope(hf: Mapping[str, Any], where: str) -> None:
    from nnjax.layers.rope import ROPE_TYPES

    for name in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(name) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise CheckpointError(
                f"{where}: field {name!r}: rope_type {kind!r} is not one of {list(ROPE_TYPES)}"
            )


def _check_activation(hf: Mapping[str, Any], where: str) -> None:
    from nnjax.layers.transformer import ACTIVATIONS

    for name in ("hidden_act", "hidden_activation", "activation_function"):
        act = hf.get(name)
        if act is not None and act not in ACTIVATIONS:
            raise CheckpointError(
                f"{where}: field {name!r}: activation {act!r} is not one of {sorted(ACTIVATIONS)}"
            )


def _check_heads(hf: Mapping[str, Any], where: str) -> None:
    gpt2 = hf.get("model_type") == "gpt2"
    heads = hf["n_head"] if gpt2 else hf["num_attention_heads"]
    kv = None if gpt2 else hf.get("num_key_value_heads")
    if kv is not None and heads % kv:
        raise CheckpointError(
            f"{where}: field 'num_key_value_heads': {kv} does not divide "
            f"num_attention_heads ({heads})"
        )
    width, name = (hf["n_embd"], "n_embd") if gpt2 else (hf["hidden_size"], "hidden_size")
    if (gpt2 or hf.get("head_dim") is None) and width % heads:
        raise CheckpointError(
            f"{where}: field {name!r}: {width} is not divisible by the {heads} heads "
            "(and no head_dim is given)"
        )


def check_config(hf: Any, generation: Any = None, where: str = "config.json") -> None:
    """Check a parsed ``config.json`` (and ``generation_config.json``) before it is used.

    Raises:
        CheckpointError: not an object, a missing field, a field of the wrong type or
            an impossible value; the message names the file and the field.
    """
    from nnjax.models.hf.families import family_of

    _check_fields(hf, {"model_type": FIELDS["model_type"]}, ("model_type",), where)
    family_of(hf["model_type"], where)  # an unsupported family first: its fields differ
    fields = FIELDS
    if hf.get("use_sliding_window") is False:  # Qwen writes sliding_window 0 when it is off
        fields = {k: v for k, v in FIELDS.items() if k != "sliding_window"}
    _check_fields(hf, fields, REQUIRED.get(hf["model_type"], REQUIRED[""]), where)
    _check_heads(hf, where)
    _check_rope(hf, where)
    _check_activation(hf, where)
    if generation is not None:
        gen_where = where.replace("config.json", "generation_config.json")
        ids = {k: FIELDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _check_fields(generation, ids, (), gen_where)


def check_adapter_config(cfg: Any, where: str) -> None:
    """Check a parsed ``adapter_config.json`` before any adapter tensor is read.

    Raises:
        CheckpointError: not an object, a missing field, a field of the wrong type or
            an impossible value; the message names the file and the field.
    """
    _check_fields(cfg, ADAPTER_FIELDS, REQUIRED["adapter"], where)
    for name in ("rank_pattern", "alpha_pattern"):
        for key, value in (cfg.get(name) or {}).items():
            rule = ADAPTER_FIELDS["r" if name == "rank_pattern" else "lora_alpha"]
            if (bad := _problem(value, rule)) is not None:
                raise CheckpointError(f"{where}: field {name!r}[{key!r}]: {bad}")
