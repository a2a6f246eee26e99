"""Hugging Face tensor names <-> nnjax param paths: one table per family.

A table is data: each :class:`Entry` names an HF tensor (``{i}`` for the layer
index), the nnjax path(s) it fills, whether its layout is transposed
(``nn.Linear`` stores ``(out, in)``, nnjax kernels ``(in, out)``) and the config
field that must be true for it to exist. Per-layer tensors fill one copy of a
``blocks/stacked/...`` leaf (leading axis ``num_layers``). One HF tensor may fill
several paths: GPT-2's ``c_attn`` is query | key | value along its last axis.

The Llama-style families (Llama, Qwen2, Qwen3, Mistral, Gemma) share HF's names;
their differences (biases, q/k norms, a tied head) are the conditions.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from nnjax.core.errors import CheckpointError

__all__ = ["Entry", "Table", "TABLES", "Slot", "layout"]


class Entry(NamedTuple):
    """One HF tensor.

    Attributes:
        hf: the HF name; ``{i}`` stands for the layer index.
        paths: nnjax param paths it fills (split evenly along the last nnjax axis).
        transpose: HF's layout is the transpose of nnjax's (``nn.Linear`` weights).
        when: a :class:`~nnjax.models.CausalLMConfig` field that must be true
            (``"!field"``: false) for the tensor to exist; ``None``: always.
    """

    hf: str
    paths: tuple[str, ...]
    transpose: bool = False
    when: str | None = None


class Table(NamedTuple):
    """A family's tensors, plus names some files hold that carry no weights."""

    entries: tuple[Entry, ...]
    ignore: tuple[str, ...] = ()  # regexes of tensors to skip (GPT-2's mask buffers)
    tied_head: str | None = None  # a head tensor that is skipped when the config ties it


class Slot(NamedTuple):
    """Where one HF tensor goes for a given config: ``entry`` and the layer (``None``: not per layer)."""

    entry: Entry
    layer: int | None


def _linear(hf: str, path: str, bias_when: str | None = None) -> tuple[Entry, ...]:
    """An ``nn.Linear``: its weight (transposed) and, when ``bias_when`` holds, its bias."""
    out = (Entry(f"{hf}.weight", (f"{path}/kernel",), True),)
    return out + ((Entry(f"{hf}.bias", (f"{path}/bias",), when=bias_when),) if bias_when else ())


_L, _B = "model.layers.{i}", "blocks/stacked"
LLAMA = Table(
    entries=(
        Entry("model.embed_tokens.weight", ("tok_embed/embedding",)),
        Entry(f"{_L}.input_layernorm.weight", (f"{_B}/ln_1/scale",)),
        *_linear(f"{_L}.self_attn.q_proj", f"{_B}/attn/query", "qkv_bias"),
        *_linear(f"{_L}.self_attn.k_proj", f"{_B}/attn/key", "qkv_bias"),
        *_linear(f"{_L}.self_attn.v_proj", f"{_B}/attn/value", "qkv_bias"),
        *_linear(f"{_L}.self_attn.o_proj", f"{_B}/attn/out", "out_bias"),
        Entry(f"{_L}.self_attn.q_norm.weight", (f"{_B}/attn/q_norm/scale",), when="qk_norm"),
        Entry(f"{_L}.self_attn.k_norm.weight", (f"{_B}/attn/k_norm/scale",), when="qk_norm"),
        Entry(f"{_L}.post_attention_layernorm.weight", (f"{_B}/ln_2/scale",)),
        *_linear(f"{_L}.mlp.gate_proj", f"{_B}/mlp/gate", "mlp_bias"),
        *_linear(f"{_L}.mlp.up_proj", f"{_B}/mlp/up", "mlp_bias"),
        *_linear(f"{_L}.mlp.down_proj", f"{_B}/mlp/down", "mlp_bias"),
        Entry("model.norm.weight", ("ln_f/scale",)),
        Entry("lm_head.weight", ("lm_head/kernel",), True, when="!tie_embeddings"),
    ),
    tied_head="lm_head.weight",
)

_H = "transformer.h.{i}"


def _norm(hf: str, path: str) -> tuple[Entry, ...]:
    return (Entry(f"{hf}.weight", (f"{path}/scale",)), Entry(f"{hf}.bias", (f"{path}/bias",)))


def _conv1d(hf: str, paths: tuple[str, ...]) -> tuple[Entry, ...]:
    """GPT-2's ``Conv1D``: weight ``(in, out)`` as nnjax's kernel, and a bias."""
    return (
        Entry(f"{hf}.weight", tuple(f"{p}/kernel" for p in paths)),
        Entry(f"{hf}.bias", tuple(f"{p}/bias" for p in paths)),
    )


GPT2 = Table(
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

TABLES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gpt2": GPT2,
}


def _holds(config: Any, when: str | None) -> bool:
    if when is None:
        return True
    negate = when.startswith("!")
    return bool(getattr(config, when.lstrip("!"))) != negate


def layout(table: Table, config: Any) -> dict[str, Slot]:
    """``{HF name: Slot}`` of every tensor a checkpoint of ``config`` holds, in table order."""
    out = {}
    for entry in table.entries:
        if not _holds(config, entry.when):
            continue
        if "{i}" in entry.hf:
            for i in range(config.num_layers):
                out[entry.hf.format(i=i)] = Slot(entry, i)
        else:
            out[entry.hf] = Slot(entry, None)
    return out


def ignored(table: Table, name: str, config: Any) -> bool:
    """A tensor the checkpoint may hold that carries no param (a buffer, a tied head)."""
    if name == table.tied_head and config.tie_embeddings:
        return True  # transformers ties it to the token table and ignores the stored copy
    return any(re.fullmatch(p, name) for p in table.ignore)


def hf_shape(slot: Slot, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape, from one nnjax path's (per-copy) shape."""
    shape = (*leaf_shape[:-1], leaf_shape[-1] * len(slot.entry.paths))
    return shape[::-1] if slot.entry.transpose else shape


def to_nnjax(slot: Slot, tensor: np.ndarray) -> list[np.ndarray]:
    """An HF tensor as the nnjax value of each of ``slot``'s paths."""
    arr = tensor.T if slot.entry.transpose else tensor
    return np.split(arr, len(slot.entry.paths), axis=-1)


def to_hf(slot: Slot, values: list[np.ndarray]) -> np.ndarray:
    """The HF tensor from the nnjax value of each of ``slot``'s paths."""
    arr = values[0] if len(values) == 1 else np.concatenate(values, axis=-1)
    return np.ascontiguousarray(arr.T if slot.entry.transpose else arr)


def check_family(family: str, where: str) -> Table:
    """The table of ``family``, or a :class:`CheckpointError` naming ``where`` and the supported ones."""
    if family not in TABLES:
        raise CheckpointError(
            f"{where}: model_type {family!r} is not supported; supported: {sorted(TABLES)}"
        )
    return TABLES[family]
