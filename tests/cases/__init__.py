"""The layer registry the contract suite runs over.

Each family module here (``tests/cases/<family>.py``) defines ``CASES``: a list of
:class:`Case`. ``tests/test_contract.py`` runs every case through the same checks
(init shape == apply shape, jit == eager, finite grads, dtype kept).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nnjax as nj


@dataclass(frozen=True)
class Case:
    """One layer configuration: ``make()`` builds the layer, ``shape`` the float input.

    ``int_input=(low, high)`` feeds integer ids instead (Embedding).
    ``needs_rng`` passes an rng at train time (Dropout). ``train`` also checks
    train mode. ``bf16_tol``: the bound on bfloat16's relative error against float32
    (outputs: ``||y_bf16 - y_f32|| / ||y_f32||``; each parameter gradient's error over
    the whole gradient's norm).
    """

    name: str
    make: Callable[[], nj.Layer]
    shape: tuple[int, ...]
    int_input: tuple[int, int] | None = None
    train: bool = False
    grad: bool = True
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    bf16_tol: float = 2e-2
    extra: dict[str, Any] = field(default_factory=dict)


def all_cases() -> list[Case]:
    cases = []
    for mod in pkgutil.iter_modules(__path__):
        cases += importlib.import_module(f"{__name__}.{mod.name}").CASES
    return cases
