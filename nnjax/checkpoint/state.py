"""The train-state checkpoint API in one import (``from nnjax.checkpoint import state``).

Kept for the modules that import it by this name; each function lives in its
own module: :mod:`~nnjax.checkpoint.saving`, :mod:`~nnjax.checkpoint.restoring`,
:mod:`~nnjax.checkpoint.listing`, :mod:`~nnjax.checkpoint.lock`,
:mod:`~nnjax.checkpoint.params`.
"""

from nnjax.checkpoint.listing import all_steps, latest
from nnjax.checkpoint.lock import release, wait
from nnjax.checkpoint.params import load_params, save_params
from nnjax.checkpoint.restoring import restore
from nnjax.checkpoint.saving import save

__all__ = [
    "save",
    "restore",
    "latest",
    "all_steps",
    "wait",
    "release",
    "save_params",
    "load_params",
]
