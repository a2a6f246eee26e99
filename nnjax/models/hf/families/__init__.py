"""The family registry: one :class:`Family` record per Hugging Face model family.

A family is data: its HF ``model_type`` and architecture name, how its ``config.json``
reads into a :class:`~nnjax.models.CausalLMConfig` and writes back, its tensor table
(:mod:`nnjax.models.hf.tables`), whether its embeddings are tied by default, and how
PEFT names its modules. The converter, the config reader and writer and the PEFT
adapter files read these records and nothing else, so a family whose blocks are made
of parts nnjax already has is one module here (its record) plus its tests.

Example:
    >>> fam = nj.models.hf.FAMILIES["qwen3"]
    >>> fam.architecture, fam.tied_default
    ('Qwen3ForCausalLM', False)
"""

from __future__ import annotations

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.families import (
    gemma,
    gemma2,
    gemma3,
    gpt2,
    llama,
    mistral,
    mixtral,
    olmo2,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from nnjax.models.hf.families.record import Family

__all__ = ["Family", "FAMILIES", "family_of"]

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        llama.FAMILY,
        mistral.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        gemma.FAMILY,
        gemma2.FAMILY,
        gemma3.FAMILY,
        olmo2.FAMILY,
        phi3.FAMILY,
        gpt2.FAMILY,
        mixtral.FAMILY,
        qwen2_moe.FAMILY,
        qwen3_moe.FAMILY,
    )
}
"""``{HF model_type: Family}``: every family nnjax loads and exports."""


def family_of(model_type: str, where: str) -> Family:
    """The record of ``model_type``, or a :class:`CheckpointError` naming ``where`` and the supported ones."""
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]
