"""The reporting side of ``fit``: metrics fetched at log points, the progress bar, a
summary line per epoch, the history, and metric files (JSONL, TensorBoard).

Metrics stay on the device until a log point, where one ``jax.device_get`` fetches
every step's since the last one; that is also where a non-finite loss is found. Epoch
summaries are made from the fetched values, so they add no fetch of their own.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from nnjax.core.errors import ArgumentError, TrainingDiverged

__all__ = ["Logger", "jsonl_logger", "tensorboard_logger", "progress_mode", "seconds_str"]


def progress_mode(progress: bool | str) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for ``fit(progress=...)``.

    ``True`` picks a redrawn bar where one can be drawn (a terminal, where tqdm writes:
    stderr; or a notebook) and plain lines otherwise, so a redirected log holds one
    line per epoch (or per log point), not every redraw of a bar.

    Raises:
        ArgumentError: ``progress`` is not a bool, ``"bar"`` or ``"lines"``.
    """
    if progress is False:
        return "off"
    if progress is True:
        notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto's pick
        return "bar" if notebook or _is_terminal(sys.stderr) else "lines"
    if progress in ("bar", "lines"):
        return str(progress)
    raise ArgumentError(f"progress: expected True, False, 'bar' or 'lines', got {progress!r}")


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def seconds_str(seconds: float) -> str:
    """``"0.0123 s"``, ``"1.23 s"``, ``"123 s"``: three significant digits, never ``"0.0 s"``."""
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.3g} s"


def jsonable(value: Any) -> Any:
    return float(value) if np.ndim(value) == 0 else np.asarray(value).tolist()


class Logger(NamedTuple):
    """Where ``fit`` writes metrics: ``write(kind, step, values)``, ``kind`` one of
    ``"train"`` (a log point's means), ``"eval"`` and ``"epoch"``; ``close()`` at the end."""

    write: Callable[[str, int, dict[str, Any]], None]
    close: Callable[[], None]


def jsonl_logger(path: str | os.PathLike) -> Logger:
    """One JSON object per line, appended to ``path``: ``{"kind", "step", "time", **values}``.

    A resumed run appends to the same file (the steps after its checkpoint appear twice:
    the later lines are the ones the run kept). Each line is flushed as written, so the
    file can be followed while training runs.
    """
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by Logger.close)

    def write(kind: str, step: int, values: dict[str, Any]) -> None:
        f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        f.flush()

    return Logger(write, f.close)


def tensorboard_logger(log_dir: str | os.PathLike) -> Logger:
    """TensorBoard event files in ``log_dir`` through ``tensorboardX`` (``pip install
    nnjax[tensorboard]``): scalar ``{kind}/{name}`` per step (``train/loss``, ``eval/accuracy``)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "fit(tensorboard=True) needs tensorboardX: pip install 'nnjax[tensorboard]'"
        ) from e
    writer = SummaryWriter(os.fspath(log_dir))

    def write(kind: str, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, float):
                writer.add_scalar(f"{kind}/{name}", value, step)

    return Logger(write, writer.close)


class MetricLog:
    """Pending step metrics, the run's history and its progress bar.

    ``add`` keeps a step's metrics (device arrays, not fetched); ``flush`` fetches
    them all at once, checks the losses, extends ``history`` and returns the mean
    of each metric over the window, the ``logs`` callbacks see.
    """

    def __init__(
        self,
        history: dict[str, Any],
        k: int,
        total: int | None,
        step: int,
        progress: bool | str,
        loggers: tuple[Logger, ...] = (),
        epochs: tuple[int | None, int | None] = (None, None),
    ):
        self.history, self.k, self.loggers, self.total = history, k, loggers, total
        self.mode = progress_mode(progress)
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.window_start, self.window_examples = time.perf_counter(), 0
        self.bar = tqdm(
            total=total, initial=step, disable=self.mode != "bar", unit="step", dynamic_ncols=True
        )
        self.epochs = _Epochs(*epochs, step, self)

    def add(self, first_step: int, metrics: dict[str, Any], examples: int) -> None:
        self.pending.append((first_step, metrics))
        self.window_examples += examples
        self.epochs.dispatched(first_step + self.k)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.write(kind, step, values)

    def _losses(self, first: int, m: dict[str, Any], last_ckpt: str | None) -> np.ndarray:
        loss = np.ravel(np.asarray(m["loss"], np.float32))
        if loss.size != self.k:
            raise ArgumentError(
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
        per_step = {n: np.concatenate(v) for n, v in sums.items()}
        self.epochs.fetched([f + j + 1 for f in firsts for j in range(self.k)], per_step)
        logs = {n: jsonable(v.mean(axis=0).squeeze()) for n, v in per_step.items()}
        self.history["train"].append({"step": step, **logs})
        self.write("train", step, logs)
        self._show(step, logs)
        return logs

    def _show(self, step: int, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        rate = self.window_examples / max(now - self.window_start, 1e-9)
        self.window_start, self.window_examples = now, 0
        self.bar.update(step - self.bar.n)
        post = {n: f"{v:.4g}" for n, v in logs.items() if isinstance(v, float)}
        self.bar.set_postfix({**post, "ex/s": f"{rate:.4g}"}, refresh=False)
        if self.mode == "lines" and not self.epochs.per_epoch:  # else: a line per epoch
            of = f"/{self.total}" if self.total else ""
            shown = "  ".join(f"{n} {v}" for n, v in {**post, "ex/s": f"{rate:.4g}"}.items())
            self.line(f"step {step}{of}  {shown}")

    def line(self, text: str) -> None:
        """One line of the report: above the bar, or plain on stdout."""
        if self.mode == "bar":
            self.bar.write(text)
        elif self.mode == "lines":
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
        for logger in self.loggers:
            logger.close()


class _Epochs:
    """Summary lines of finished epochs, from the per-step metrics a flush fetched.

    An epoch ends after ``steps_per_epoch`` steps; its line (the mean of each scalar
    metric over its steps, the latest evaluation within it, its wall time) is written
    once a flush has fetched its last step.
    """

    def __init__(self, per_epoch: int | None, epochs: int | None, step: int, log: MetricLog):
        self.per_epoch, self.epochs, self.log = per_epoch, epochs, log
        self.rows: list[tuple[int, dict[str, float]]] = []  # (step, scalar metrics), fetched
        self.ended_at: dict[int, float] = {}  # epoch end step -> when its last step was sent
        self.start_time, self.fetched_to = time.perf_counter(), step

    def dispatched(self, step: int) -> None:
        if self.per_epoch and step // self.per_epoch > (step - self.log.k) // self.per_epoch:
            self.ended_at[step // self.per_epoch * self.per_epoch] = time.perf_counter()

    def fetched(self, steps: list[int], per_step: dict[str, np.ndarray]) -> None:
        if not self.per_epoch:
            return
        scalars = {n: v.reshape(len(steps), -1) for n, v in per_step.items()}
        scalars = {n: v[:, 0] for n, v in scalars.items() if v.shape[1] == 1}
        self.rows += [
            (s, {n: float(v[i]) for n, v in scalars.items()}) for i, s in enumerate(steps)
        ]
        self.fetched_to = max(steps)

    def summarize(self, history: dict[str, Any]) -> None:
        """Write the line of every epoch whose steps are all fetched."""
        while self.per_epoch and self.ended_at and min(self.ended_at) <= self.fetched_to:
            end = min(self.ended_at)
            done = [r for s, r in self.rows if s <= end]
            self.rows = [(s, r) for s, r in self.rows if s > end]
            values = {n: float(np.mean([r[n] for r in done])) for n in done[0]} if done else {}
            evals = [e for e in history["eval"] if end - self.per_epoch < e["step"] <= end]
            if evals:
                values.update({f"val_{n}": v for n, v in evals[-1].items() if n != "step"})
            sent = self.ended_at.pop(end)
            seconds, self.start_time = sent - self.start_time, sent
            self._emit(end // self.per_epoch, end, values, seconds, history)

    def _emit(
        self, epoch: int, step: int, values: dict[str, Any], seconds: float, history: dict
    ) -> None:
        entry = {"epoch": epoch, "step": step, **values, "seconds": float(f"{seconds:.3g}")}
        history.setdefault("epoch", []).append(entry)
        self.log.write("epoch", step, {k: v for k, v in entry.items() if k != "step"})
        if self.log.mode != "off":
            of = f"/{self.epochs}" if self.epochs else ""
            names = sorted(
                values, key=lambda n: (n.startswith("val_"), n != "loss", n != "val_loss")
            )
            shown = "  ".join(f"{n} {values[n]:.4g}" for n in names if isinstance(values[n], float))
            self.log.line(f"epoch {epoch}{of}  {shown}  {seconds_str(seconds)}")
