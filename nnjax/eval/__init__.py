"""Evaluation: a perplexity helper, and nnjax models in lm-evaluation-harness.

``nnjax.eval.perplexity(config, params, source)``; ``nnjax.eval.NNJaxLM`` (in
:mod:`nnjax.eval.harness`, loaded on first use: it needs ``pip install nnjax[eval]``);
``python -m nnjax.eval --model-dir DIR --tasks ...``.
"""

from typing import Any

from nnjax.eval.perplexity import *


def __getattr__(name: str) -> Any:
    if name == "NNJaxLM":  # imports lm_eval (and torch) only when asked for
        from nnjax.eval.harness import NNJaxLM

        return NNJaxLM
    raise AttributeError(f"module 'nnjax.eval' has no attribute {name!r}")
