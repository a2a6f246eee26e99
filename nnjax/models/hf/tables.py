"""Hugging Face tensor names <-> nnjax logical paths: the mechanism of a family's table.

A table is data: each :class:`Entry` names an HF tensor and the nnjax *logical*
path(s) it fills, with ``{i}`` (or any ``{name}``) standing for an index that both
share (``model.layers.{i}.self_attn.q_proj.weight`` <-> ``blocks/{i}/attn/query/kernel``;
a mixture of experts adds ``{e}``). Which copies exist is read from the model's
params, so a uniform stack (``blocks/stacked/...``), a mixed one
(``blocks/stacked[1::2]/...``) or experts on only some layers need nothing more in
the table. An entry also says whether its layout is transposed (``nn.Linear``
stores ``(out, in)``, nnjax kernels ``(in, out)``) and the config field that must be
true for it to exist. One HF tensor may fill several paths, split along the last
nnjax axis in their widths: GPT-2's ``c_attn`` and Phi-3's ``qkv_proj`` are
query | key | value, Phi-3's ``gate_up_proj`` gate | up. The tables themselves live
in the family records (:mod:`nnjax.models.hf.families`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from nnjax.core.errors import CheckpointError
from nnjax.core.paths import logical_places

__all__ = ["Entry", "Table", "Slot", "linear", "layout", "ignored", "hf_shape", "to_nnjax", "to_hf"]


class Entry(NamedTuple):
    """One HF tensor.

    Attributes:
        hf: the HF name; ``{i}`` (``{e}``, ...) stands for an index shared with ``paths``.
        paths: nnjax logical paths it fills (split along the last nnjax axis, each
            taking its own width).
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
    """Where one HF tensor goes in a given model.

    Attributes:
        entry: the table's entry.
        layer: its ``{i}`` (``None``: not per layer).
        logical: the logical path of each of ``entry.paths``.
        places: ``(physical path, index over its stacked axes)`` of each.
    """

    entry: Entry
    layer: int | None
    logical: tuple[str, ...]
    places: tuple[tuple[str, tuple[int, ...]], ...]


def linear(hf: str, path: str, bias_when: str | None = None) -> tuple[Entry, ...]:
    """An ``nn.Linear``: its weight (transposed) and, when ``bias_when`` holds, its bias."""
    out = (Entry(f"{hf}.weight", (f"{path}/kernel",), True),)
    return out + ((Entry(f"{hf}.bias", (f"{path}/bias",), when=bias_when),) if bias_when else ())


def _holds(config: Any, when: str | None) -> bool:
    if when is None:
        return True
    negate = when.startswith("!")
    return bool(getattr(config, when.lstrip("!"))) != negate


@functools.lru_cache(maxsize=1024)
def _regex(path: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", path)  # literal, name, literal, name, ...
    return re.compile(
        "".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts))
    )


def layout(table: Table, config: Any, template: Mapping[str, Any]) -> dict[str, Slot]:
    """``{HF name: Slot}`` of every tensor a checkpoint of the model ``template`` holds.

    In table order, each entry's copies in index order (layer 0, 1, ...).

    Args:
        table: the family's table.
        config: the model's config (the entries' ``when`` fields).
        template: the model's params (arrays or ``ShapeDtypeStruct``s).

    Raises:
        CheckpointError: an entry the config requires that names no param (the table
            and the model disagree: a bug, said plainly).
    """
    places = logical_places(template)
    out = {}
    for entry in table.entries:
        if not _holds(config, entry.when):
            continue
        first = entry.paths[0]
        if "{" not in first:
            found: list[dict[str, int]] = [{}] if first in places else []
        else:
            rx = _regex(first)
            found = [
                {k: int(v) for k, v in m.groupdict().items()}
                for m in map(rx.fullmatch, places)
                if m is not None
            ]
            found.sort(key=lambda d: tuple(d.values()))
        if not found:
            raise CheckpointError(
                f"the {config.family} table and the model's params disagree: {entry.hf} -> "
                f"{first} names no param"
            )
        for idx in found:
            logical = tuple(p.format(**idx) for p in entry.paths)
            missing = [p for p in logical if p not in places]
            if missing:
                raise CheckpointError(
                    f"the {config.family} table and the model's params disagree: "
                    f"{entry.hf.format(**idx)} -> {missing} names no param"
                )
            out[entry.hf.format(**idx)] = Slot(
                entry, idx.get("i"), logical, tuple(places[p] for p in logical)
            )
    return out


def ignored(table: Table, name: str, config: Any) -> bool:
    """A tensor the checkpoint may hold that carries no param (a buffer, a tied head)."""
    if name == table.tied_head and config.tie_embeddings:
        return True  # transformers ties it to the token table and ignores the stored copy
    return any(re.fullmatch(p, name) for p in table.ignore)


def hf_shape(slot: Slot, copy_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The HF tensor's shape, from the per-copy shape of each of ``slot``'s paths."""
    shape = (*copy_shapes[0][:-1], sum(s[-1] for s in copy_shapes))
    return shape[::-1] if slot.entry.transpose else shape


def to_nnjax(slot: Slot, tensor: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    """An HF tensor as the nnjax value of each of ``slot``'s paths (``widths``: their last axes)."""
    arr = tensor.T if slot.entry.transpose else tensor
    return np.split(arr, np.cumsum(widths)[:-1], axis=-1)


def to_hf(slot: Slot, values: list[np.ndarray]) -> np.ndarray:
    """The HF tensor from the nnjax value of each of ``slot``'s paths."""
    arr = values[0] if len(values) == 1 else np.concatenate(values, axis=-1)
    return np.ascontiguousarray(arr.T if slot.entry.transpose else arr)
