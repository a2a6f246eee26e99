"""What both stories of ``nnjax demo`` report the same way: the cost columns, saved bytes, plots."""

from __future__ import annotations

import os
from typing import Any

import nnjax as nj
from nnjax import finetune
from nnjax.core.report import human_bytes

COST_HEADER = ["method", "trainable", "optimizer state", "saved file"]


def cost_cells(row: dict, *timings: str) -> list[str]:
    """A row's method, trainable count, optimizer-state and saved-file bytes, then ``timings``.

    A method that trains nothing shows ``-`` for all but its name and count.
    """
    cells = [
        human_bytes(row["opt_state_bytes"]),
        human_bytes(row["checkpoint_bytes"]),
        *timings,
    ]
    shown = cells if row["trainable"] else ["-"] * len(cells)
    return [row["method"], f"{row['trainable']:,}", *shown]


def saved_bytes(params: Any, mask: Any, path: str) -> int:
    """What a user would save: every param (``mask is None``), or only the trained leaves."""
    if mask is None:
        nj.checkpoint.save_params(path, params)
        return os.path.getsize(path)
    return finetune.save_adapters(path, params, trainable=mask)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None where it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
