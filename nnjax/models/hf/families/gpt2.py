"""GPT-2 (``GPT2LMHeadModel``): LayerNorms, learned positions, ``Conv1D`` kernels, fused q|k|v."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.families.record import Family
from nnjax.models.hf.tables import Entry, Table

_H, _B = "transformer.h.{i}", "blocks/{i}"


def _norm(hf: str, path: str) -> tuple[Entry, ...]:
    return (Entry(f"{hf}.weight", (f"{path}/scale",)), Entry(f"{hf}.bias", (f"{path}/bias",)))


def _conv1d(hf: str, paths: tuple[str, ...]) -> tuple[Entry, ...]:
    """GPT-2's ``Conv1D``: weight ``(in, out)`` as nnjax's kernel, and a bias."""
    return (
        Entry(f"{hf}.weight", tuple(f"{p}/kernel" for p in paths)),
        Entry(f"{hf}.bias", tuple(f"{p}/bias" for p in paths)),
    )


TABLE = Table(
    entries=(
        Entry("transformer.wte.weight", ("tok_embed/embedding",)),
        Entry("transformer.wpe.weight", ("pos_embed/embedding",)),
        *_norm(f"{_H}.ln_1", f"{_B}/ln_1"),
        *_conv1d(f"{_H}.attn.c_attn", tuple(f"{_B}/attn/{p}" for p in ("query", "key", "value"))),
        *_conv1d(f"{_H}.attn.c_proj", (f"{_B}/attn/out",)),
        *_norm(f"{_H}.ln_2", f"{_B}/ln_2"),
        *_conv1d(f"{_H}.mlp.c_fc", (f"{_B}/mlp/fc",)),
        *_conv1d(f"{_H}.mlp.c_proj", (f"{_B}/mlp/proj",)),
        *_norm("transformer.ln_f", "ln_f"),
    ),
    ignore=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),  # causal-mask buffers
    tied_head="lm_head.weight",
)


def _in(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
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


def _out(c: Any) -> dict[str, Any]:
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


FAMILY = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    table=TABLE,
    config_in=_in,
    config_out=_out,
    tied_default=True,
    peft_fan_in_fan_out=True,
)
