"""The :class:`Family` record: everything nnjax knows about one HF model family."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from nnjax.models.hf.tables import Table

__all__ = ["Family"]


class Family(NamedTuple):
    """One Hugging Face model family.

    Attributes:
        model_type: HF's ``model_type`` (``config.json``), the registry key and
            ``CausalLMConfig.family``.
        architecture: the class name written to ``architectures`` (``"LlamaForCausalLM"``).
        table: the tensor table: HF tensor names <-> nnjax logical paths.
        config_in: ``config_in(hf, where) -> {CausalLMConfig field: value}`` for the
            architecture fields (the vocabulary, tied head, special ids and ``extra``
            are read for every family); raises ``CheckpointError`` naming ``where``
            for an option nnjax does not model. A missing required key may raise
            ``KeyError`` (reported with the family and the key).
        config_out: ``config_out(config) -> {HF field: value}``, the inverse; the
            export reads the result back and refuses a config it did not express.
        tied_default: ``tie_word_embeddings`` when ``config.json`` does not say.
        peft_fan_in_fan_out: PEFT's ``fan_in_fan_out`` for the family's modules
            (``True`` for GPT-2's ``Conv1D``). PEFT's module names are the table's
            tensor names without ``.weight``.
        derived: HF fields the export derives from the config: dropped from the
            ``extra`` fields written back as read (so an edited config never keeps a
            stale value).
    """

    model_type: str
    architecture: str
    table: Table
    config_in: Callable[[Mapping[str, Any], str], dict[str, Any]]
    config_out: Callable[[Any], dict[str, Any]]
    tied_default: bool = False
    peft_fan_in_fan_out: bool = False
    derived: tuple[str, ...] = ()
