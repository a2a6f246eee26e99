"""The reporting side of ``fit``: metrics fetched at log points, the progress bar, history.

Metrics stay on the device until a log point, where one ``jax.device_get`` fetches
every step's since the last one; that is also where a non-finite loss is found.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from nnjax.core.errors import TrainingDiverged

__all__: list[str] = []  # fit's internals


def jsonable(value: Any) -> Any:
    return float(value) if np.ndim(value) == 0 else np.asarray(value).tolist()


class MetricLog:
    """Pending step metrics, the run's history and its progress bar.

    ``add`` keeps a step's metrics (device arrays, not fetched); ``flush`` fetches
    them all at once, checks the losses, extends ``history`` and returns the mean
    of each metric over the window, the ``logs`` callbacks see.
    """

    def __init__(self, history: dict[str, Any], k: int, total: int | None, step: int, bar: bool):
        self.history, self.k = history, k
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.window_start, self.window_examples = time.perf_counter(), 0
        self.bar = tqdm(total=total, initial=step, disable=not bar, unit="step", dynamic_ncols=True)

    def add(self, first_step: int, metrics: dict[str, Any], examples: int) -> None:
        self.pending.append((first_step, metrics))
        self.window_examples += examples

    def _losses(self, first: int, m: dict[str, Any], last_ckpt: str | None) -> np.ndarray:
        loss = np.ravel(np.asarray(m["loss"], np.float32))
        if loss.size != self.k:
            raise ValueError(
                f"fit(steps_per_call={self.k}) but trainer.step returned {loss.size} losses per "
                "call; pass the trainer's steps_per_call"
            )
        ok = np.ravel(m.get("finite", True)) & np.isfinite(loss)
        if not ok.all():
            bad = int(np.argmin(ok))
            what = f"loss {loss[bad]}" if not np.isfinite(loss[bad]) else "non-finite gradients"
            raise TrainingDiverged(first + bad + 1, last_ckpt, what)
        return loss

    def flush(self, step: int, last_ckpt: str | None) -> dict[str, Any]:
        """Fetch the pending metrics, check them, extend the history; the window's means."""
        if not self.pending:
            return {}
        fetched = jax.device_get([m for _, m in self.pending])
        firsts = [first for first, _ in self.pending]
        losses = [self._losses(f, m, last_ckpt) for f, m in zip(firsts, fetched, strict=True)]
        self.history["loss"].extend(float(x) for loss in losses for x in loss)
        sums: dict[str, list] = collections.defaultdict(list)
        for m in fetched:
            for name, value in m.items():
                if name != "finite":
                    sums[name].append(np.asarray(value, np.float64).reshape(self.k, -1))
        self.pending.clear()
        logs = {n: jsonable(np.concatenate(v).mean(axis=0).squeeze()) for n, v in sums.items()}
        self.history["train"].append({"step": step, **logs})
        self._show(step, logs)
        return logs

    def _show(self, step: int, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        rate = self.window_examples / max(now - self.window_start, 1e-9)
        self.window_start, self.window_examples = now, 0
        self.bar.update(step - self.bar.n)
        post = {n: f"{v:.4g}" for n, v in logs.items() if isinstance(v, float)}
        self.bar.set_postfix({**post, "ex/s": f"{rate:.4g}"}, refresh=False)

    def close(self) -> None:
        self.bar.close()
