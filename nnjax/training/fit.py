"""The fit loop: steps, logging, evaluation, callbacks, checkpoints and exact resumption.

``fit`` drives a :class:`~nnjax.training.trainer.TrainerFunctions` over a stream of batches::

    ts, history = nj.fit(tr, ts, nj.data.batches((x, y), 128, epochs=5),
                         eval_data=nj.data.batches((xv, yv), 512, shuffle=False),
                         eval_every=500, checkpoint_dir="runs/mnist", checkpoint_every=1000)

It never waits on the device inside a step: metrics stay on the device and are
fetched with one ``jax.device_get`` every ``log_every`` steps, where the losses
are also checked for divergence. With a ``checkpoint_dir`` the run resumes from
its newest checkpoint (train state, rng, data position, history) and gives the
same losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.checkpoint import state as checkpoint
from nnjax.core.checks import check_int
from nnjax.core.errors import ArgumentError, CheckpointError, DataError, TrainingDiverged
from nnjax.data.iterators import BatchIterator, batches
from nnjax.training import stream
from nnjax.training.ahead import compile_beside
from nnjax.training.evaluate import evaluate
from nnjax.training.host_memory import release_host_memory
from nnjax.training.logs import Logger, MetricLog, jsonable, jsonl_logger, tensorboard_logger

__all__ = ["fit", "TrainingDiverged", "early_stopping"]

Callback = Callable[[int, Any, dict[str, Any]], Any]


def early_stopping(
    monitor: str = "val_loss",
    patience: int = 3,
    *,
    mode: str = "min",
    min_delta: float = 0.0,
    restore_best: bool = False,
) -> Callback:
    """A callback that stops ``fit`` when ``logs[monitor]`` has not improved ``patience`` times.

    Args:
        monitor: the log key, e.g. ``"val_loss"``, ``"val_accuracy"``, ``"loss"``.
        patience: evaluations without improvement before stopping.
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: the least change that counts as an improvement.
        restore_best: ``fit`` returns the params and layer state of the best evaluation
            (Keras' ``restore_best_weights``), whether or not it stopped early; the
            step count and optimizer state stay the last step's, and a checkpoint
            ``fit`` writes holds the last step. Costs one device copy of params and
            state, made at each improvement.

    Returns:
        ``callback(step, ts, logs) -> bool``; it only looks at logs that hold ``monitor``.
        It has ``on_end(ts) -> ts``, which ``fit`` calls on the final train state.

    Raises:
        ArgumentError: ``mode`` is not ``"min"`` or ``"max"``.

    Example:
        >>> stop = nj.early_stopping("val_accuracy", patience=2, mode="max", restore_best=True)
        >>> stop(100, None, {"loss": 0.3})   # no "val_accuracy" in these logs
        False
    """
    if mode not in ("min", "max"):
        raise ArgumentError(f"mode: expected 'min' or 'max', got {mode!r}")
    return _EarlyStopping(monitor, check_int(patience, "patience"), mode, min_delta, restore_best)


class _EarlyStopping:
    """What :func:`early_stopping` returns: the callback and its ``on_end``."""

    def __init__(self, monitor: str, patience: int, mode: str, min_delta: float, restore: bool):
        self.monitor, self.patience, self.mode = monitor, patience, mode
        self.min_delta, self.restore = min_delta, restore
        self.best: float | None = None
        self.best_step: int | None = None
        self.kept: Any = None  # (params, state) copied at the best evaluation
        self.bad = 0

    def __call__(self, step: int, ts: Any, logs: dict[str, Any]) -> bool:
        if self.monitor not in logs:
            return False
        value, best = float(logs[self.monitor]), self.best
        better = (
            best is None
            or (self.mode == "min" and value < best - self.min_delta)
            or (self.mode == "max" and value > best + self.min_delta)
        )
        if better:
            self.best, self.best_step, self.bad = value, step, 0
            if self.restore:  # a copy: the next step donates ts
                self.kept = jax.tree.map(jnp.copy, (ts.params, ts.state))
            return False
        self.bad += 1
        return self.bad >= self.patience

    def on_end(self, ts: Any) -> Any:
        """The final train state, with the best evaluation's params and state if asked."""
        if not self.restore:
            return ts
        if self.kept is None:
            warnings.warn(
                f"early_stopping(restore_best=True): {self.monitor!r} was never logged; "
                "fit returns the last step's params",
                stacklevel=3,
            )
            return ts
        params, state = self.kept
        return ts._replace(params=params, state=state)


# ---------------------------------------------------------------- the run's state


@dataclasses.dataclass
class _Run:
    """What a run carries from step to step, and what its checkpoints hold."""

    ts: Any
    rng: jax.Array
    step: int = 0
    pos: dict[str, int] | None = None  # the data position after the last step
    history: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"loss": [], "train": [], "eval": []}
    )
    last_ckpt: str | None = None
    saved_at: int | None = None
    evaluated_at: int | None = None


def _rng_to_json(rng: jax.Array) -> dict[str, Any]:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(rng))
        return {"impl": str(jax.random.key_impl(rng)), "data": data.tolist()}
    return {"impl": None, "data": np.asarray(rng).tolist()}


def _rng_from_json(blob: dict[str, Any]) -> jax.Array:
    data = jnp.asarray(np.asarray(blob["data"], np.uint32))
    return data if blob["impl"] is None else jax.random.wrap_key_data(data, impl=blob["impl"])


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf is finite: one bool fetched, not the whole state."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else True)


def _is_deleted(tree: Any) -> bool:
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- resume and save


def _resume(checkpoint_dir: str | None, ts: Any, rng: jax.Array) -> _Run:
    """The run restored from the newest checkpoint in ``checkpoint_dir``, or a fresh one."""
    found = None if checkpoint_dir is None else checkpoint.latest(checkpoint_dir)
    if found is None:
        return _Run(ts, rng)
    ts, extra = checkpoint.restore(found, ts)
    if "fit" not in extra:
        raise CheckpointError(f"{found} was not written by fit (no 'fit' entry in extra)")
    run = extra["fit"]
    rng = _rng_from_json(run["rng"])
    return _Run(ts, rng, run["step"], run["data"], run["history"], found, run["step"])


def _save(run: _Run, checkpoint_dir: str, keep: int | None, blocking: bool = True) -> None:
    """The one place fit writes a checkpoint: the train state and all it needs to resume."""
    if not bool(_all_finite(run.ts)):
        raise TrainingDiverged(run.step, run.last_ckpt, "non-finite values in the train state")
    fit_state = {"step": run.step, "data": run.pos, "rng": _rng_to_json(run.rng)}
    extra = {"fit": {**fit_state, "history": run.history}}
    run.last_ckpt = checkpoint.save(
        checkpoint_dir, run.ts, step=run.step, extra=extra, keep=keep, blocking=blocking
    )
    run.saved_at = run.step


class _Plan(NamedTuple):
    """What ``fit`` was asked to do, fixed for the run."""

    steps: int | None
    total: int | None
    k: int
    log_every: int
    eval_data: Any
    eval_batch_size: int | None  # arrays as eval_data are split by fit's batch_size
    eval_every: int | None
    callbacks: Sequence[Callback]
    checkpoint_dir: str | None
    checkpoint_every: int | None
    keep: int | None
    async_checkpoint: bool
    signals: list[int] | None = None  # SIGTERMs received, appended by the handler


def _evaluate(trainer: Any, run: _Run, plan: _Plan, log: MetricLog) -> dict[str, Any]:
    """Metrics over one pass of ``eval_data``, added to the history; ``val_``-prefixed logs."""
    metrics = evaluate(trainer, run.ts, plan.eval_data, batch_size=plan.eval_batch_size)
    metrics = {n: jsonable(v) for n, v in metrics.items()}
    run.history["eval"].append({"step": run.step, **metrics})
    log.write("eval", run.step, metrics)
    run.evaluated_at = run.step
    return {f"val_{n}": v for n, v in metrics.items()}


def _checkpoint(run: _Run, directory: str, plan: _Plan, log: MetricLog) -> None:
    log.flush(run.step, run.last_ckpt)  # the history saved is complete, its losses checked
    _save(run, directory, plan.keep, blocking=not plan.async_checkpoint)


def _loop(trainer: Any, run: _Run, plan: _Plan, calls: Iterator, log: MetricLog) -> None:
    """Step until the data, ``steps`` or a callback ends the run; log, evaluate, save on the way."""
    due = lambda every, first: bool(every) and run.step // every > first // every
    start = run.step
    while plan.steps is None or run.step + plan.k <= plan.steps:
        item = next(calls, None)
        if item is None:
            break
        batch, pos, n = item
        first = run.step
        run.ts, metrics = trainer.step(run.ts, batch, jax.random.fold_in(run.rng, first))
        if first == start:  # the call that compiled: return the compiler's freed heap
            release_host_memory()
        run.step, run.pos = first + plan.k, pos
        log.add(first, metrics, n)
        at_end = run.step == plan.total
        logs = log.flush(run.step, run.last_ckpt) if due(plan.log_every, first) or at_end else {}
        if plan.eval_data is not None and due(plan.eval_every, first):
            logs.update(_evaluate(trainer, run, plan, log))
        # every callback sees the logs, even after one asked to stop
        stop = logs and any([bool(cb(run.step, run.ts, logs)) for cb in plan.callbacks])
        if plan.checkpoint_dir is not None and due(plan.checkpoint_every, first):
            _checkpoint(run, plan.checkpoint_dir, plan, log)
        log.epochs.summarize(run.history)
        if plan.signals:
            raise _Terminated
        if stop:
            break


def _finish(trainer: Any, run: _Run, plan: _Plan, log: MetricLog, start_step: int) -> None:
    """The last log, and a last evaluation and checkpoint unless the last step had them."""
    log.flush(run.step, run.last_ckpt)
    if run.step > start_step:
        if plan.eval_data is not None and run.evaluated_at != run.step:
            _evaluate(trainer, run, plan, log)
        if plan.checkpoint_dir is not None and run.saved_at != run.step:
            _checkpoint(run, plan.checkpoint_dir, plan, log)
    log.epochs.summarize(run.history)


class _Terminated(Exception):  # noqa: N818 (an event, not an error)
    """SIGTERM arrived: fit saves, then lets the signal end the process."""


@contextlib.contextmanager
def _sigterm_saves(checkpoint_dir: str | None) -> Iterator[list[int]]:
    """While ``fit`` runs, SIGTERM (``kill``, schedulers) asks it to stop after the current
    step and save, as Ctrl-C does; the handler before it is put back afterwards."""
    received: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    if checkpoint_dir is None or not main or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield received  # nothing to save, or signals belong to someone else
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save_on_interrupt(run: _Run, plan: _Plan, log: MetricLog) -> None:
    """Ctrl-C: keep what was trained since the last checkpoint, if it is sound."""
    state_ok = run.step > 0 and not _is_deleted(run.ts)
    if plan.checkpoint_dir is None or run.saved_at == run.step or not state_ok:
        return
    try:
        _checkpoint(run, plan.checkpoint_dir, plan, log)
    except TrainingDiverged as e:
        warnings.warn(f"interrupted; no checkpoint saved: {e}", stacklevel=3)


def _train_data(data: Any, batch_size: int | None, shuffle: bool, seed: int) -> Any:
    """Arrays with ``batch_size`` as a ``nj.data.batches`` iterator; other forms as they are."""
    if batch_size is not None:
        if not stream.is_arrays(data):
            raise DataError(
                f"fit(batch_size={batch_size}) takes arrays (x, y), got a "
                f"{type(data).__name__}; {stream.ACCEPTED}"
            )
        return batches(data, batch_size, shuffle=shuffle, seed=seed)
    if stream.is_arrays(data):
        raise DataError(f"train_data: got arrays without batch_size=; {stream.ACCEPTED}")
    return data


def _counts(steps: Any, epochs: Any, k: int, **every: Any) -> None:
    """Step counts are ints in range, and ``steps`` a multiple of ``steps_per_call``."""
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None:
            check_int(value, name, minimum=0)
    for name, value in every.items():
        if value is not None:
            check_int(value, name)
    if steps is not None and steps % k:
        raise ArgumentError(
            f"steps: expected a multiple of steps_per_call == {k} (each call runs {k} steps), "
            f"got {steps}"
        )


def _loggers(log_dir: str | None, tensorboard: bool) -> tuple[Logger, ...]:
    if log_dir is None:
        if tensorboard:
            raise ArgumentError("tensorboard=True needs log_dir= (where the event files go)")
        return ()
    jsonl = jsonl_logger(os.path.join(log_dir, "metrics.jsonl"))
    return (jsonl, tensorboard_logger(log_dir)) if tensorboard else (jsonl,)


# ---------------------------------------------------------------- fit


def fit(
    trainer: Any,
    ts: Any,
    train_data: Any,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    eval_data: Any = None,
    eval_every: int | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    keep: int | None = 3,
    async_checkpoint: bool = False,
    rng: jax.Array | None = None,
    log_every: int = 50,
    progress: bool | str = True,
    steps_per_call: int | None = None,
    prefetch: int = 2,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    log_dir: str | None = None,
    tensorboard: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Train ``ts`` with ``trainer.step`` over ``train_data``; evaluate, checkpoint, resume.

    Steps count batches taken from ``train_data`` over the whole run (a resumed run
    goes on counting). Step ``s`` (from 0) gets ``jax.random.fold_in(rng, s)``.

    Args:
        trainer: a :class:`~nnjax.training.trainer.TrainerFunctions` (``step``, ``evaluate``).
        ts: the initial :class:`~nnjax.training.trainer.TrainState`; it is donated to the first
            step (with a checkpoint to resume from, it only gives the structure).
        train_data: arrays ``(x, y)`` (any pytree of arrays ``(N, ...)``) with
            ``batch_size``, batched as :func:`nnjax.data.batches` does (shuffled by
            ``seed``, last partial batch dropped, resumed exactly); or batches
            ``(inputs, targets)``: a :func:`nnjax.data.batches` or
            :func:`nnjax.data.lm_batches` iterator (resumed at its exact batch), a
            callable ``epoch -> iterable``, or an iterable (a list is passed over
            once per epoch; on resume the batches already seen are skipped).
            Anything else is a ``DataError`` that lists these forms.
        epochs: passes over ``train_data``; default: one pass, or the ``epochs`` of a
            ``batches`` iterator.
        steps: total steps of the run; training stops at whichever of ``steps``,
            ``epochs`` and the end of the data comes first.
        eval_data: data for :func:`nnjax.evaluate`: arrays ``(x, y)`` (split by
            ``batch_size``, nothing dropped), an iterable that can be passed over
            repeatedly (a list, a ``batches`` iterator) or a callable returning one.
        eval_every: evaluate every this many steps; also at the end when ``eval_data``.
            Default: once per epoch where the epoch length is known (arrays, a
            ``batches`` iterator, a list), else only at the end.
        callbacks: ``callback(step, ts, logs)`` at each log or eval point; ``logs``
            holds the train metrics averaged since the last log (``loss``, ...) and,
            after an eval, ``val_loss``, ...; a truthy return stops training. ``ts`` is
            valid during the call only (the next step donates it). A callback with an
            ``on_end(ts) -> ts`` method gets the final train state when the run ends
            and may return another (``early_stopping(restore_best=True)`` returns the
            best evaluation's params).
        checkpoint_dir: resume from the newest checkpoint here, and save into it.
        checkpoint_every: save every this many steps (and at the end, and on Ctrl-C or
            SIGTERM: ``fit`` stops after the current step, saves, then lets the signal
            end the process with its usual status; resuming is exact).
        keep: checkpoints to keep.
        async_checkpoint: write checkpoints in a background thread while training
            goes on (``nj.checkpoint.save(..., blocking=False)``: the state is
            copied to host memory first); ``fit`` waits for the last one before
            it returns or raises.
        rng: a PRNG key; default ``jax.random.key(0)``.
        log_every: fetch metrics, check for divergence and update the progress bar
            every this many steps.
        progress: show a tqdm progress bar (loss, metrics, examples/s) and, where the
            epoch length is known, a summary line per epoch beside it (mean loss and
            metrics over the epoch, the evaluation made in it, wall time). ``True``
            draws the bar on a terminal (or in a notebook) and, where output is
            redirected, prints plain lines instead (one per epoch, or one per log
            point when epochs are unknown); ``"bar"`` or ``"lines"`` choose; ``False``
            prints nothing.
        steps_per_call: defaults to ``trainer.steps_per_call`` ``K``: ``K`` batches are
            stacked into one call; ``steps`` should be a multiple of ``K``.
        prefetch: batches put on the device ahead of use (0: none).
        batch_size: examples per step when ``train_data`` is arrays.
        shuffle, seed: shuffle arrays anew each epoch, drawn from ``(seed, epoch)``.
        log_dir: write every log point, evaluation and epoch summary to
            ``log_dir/metrics.jsonl`` (one JSON object a line, appended on resume).
        tensorboard: also write TensorBoard event files into ``log_dir``
            (needs ``tensorboardX``: ``pip install 'nnjax[tensorboard]'``).

    Returns:
        ``(ts, history)``; ``history["loss"]`` has one float per step,
        ``history["train"]`` one ``{"step", "loss", ...}`` per log point and
        ``history["eval"]`` one ``{"step", "loss", ...}`` per evaluation, and
        ``history["epoch"]`` one ``{"epoch", "step", "loss", ..., "val_loss", ...,
        "seconds"}`` per finished epoch (where the epoch length is known).

    Raises:
        TrainingDiverged: a non-finite loss (found at the next log point or
            checkpoint at the latest, never saved); names the first bad step and
            the last good checkpoint.
        CheckpointError: the newest checkpoint is corrupt or does not fit ``ts``.

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(16), jax.nn.relu, nj.Dense(2))
        >>> params, state = model.init(key, jnp.zeros((1, 4)))
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-3))
        >>> x = np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int32)
        >>> data = nj.data.batches((x, y), 128, epochs=3)
        >>> ts, history = nj.fit(tr, tr.init(params, state), data, checkpoint_dir="runs/a",
        ...                      checkpoint_every=500, progress=False)   # run it again to resume
        >>> len(history["loss"]) == 3 * data.steps_per_epoch
        True
    """
    if steps_per_call is None:
        steps_per_call = trainer.steps_per_call
    k = check_int(steps_per_call, "steps_per_call")
    log_every = check_int(log_every, "log_every")
    _counts(steps, epochs, k, eval_every=eval_every, checkpoint_every=checkpoint_every)
    prefetch = check_int(prefetch, "prefetch", minimum=0)
    train_data = _train_data(train_data, batch_size, shuffle, seed)
    eval_batch_size = batch_size if stream.is_arrays(eval_data) else None
    run = _resume(checkpoint_dir, ts, jax.random.key(0) if rng is None else rng)
    if isinstance(train_data, BatchIterator):
        if steps is None and epochs is None and train_data.epochs is None:
            raise ArgumentError("train_data is endless (batches(..., epochs=None)): pass steps=")
    elif not stream.is_resumable(train_data) and epochs is None and steps is None:
        epochs = 1
    total = stream.planned_steps(train_data, epochs, steps)
    plan = _Plan(
        steps, total, k, log_every, eval_data, eval_batch_size, eval_every, tuple(callbacks),
        checkpoint_dir, checkpoint_every, keep, async_checkpoint,
    )  # fmt: skip
    calls = stream.calls(stream.stream(train_data, epochs, run.pos), k, prefetch)
    n_epochs = epochs if epochs is not None else getattr(train_data, "epochs", None)
    per_epoch = (stream.steps_per_epoch(train_data), n_epochs)
    if eval_data is not None and eval_every is None:  # as Keras: once per epoch
        plan = plan._replace(eval_every=per_epoch[0])
    log = MetricLog(
        run.history, k, total, run.step, progress, _loggers(log_dir, tensorboard), per_epoch
    )
    if checkpoint_dir is not None and not _is_deleted(run.ts):  # the save's check, beside the step
        compile_beside(_all_finite, run.ts)
    start_step = run.step
    terminated = False
    with _sigterm_saves(checkpoint_dir) as signals:
        plan = plan._replace(signals=signals)
        try:
            _loop(trainer, run, plan, calls, log)
            _finish(trainer, run, plan, log, start_step)
        except _Terminated:
            _save_on_interrupt(run, plan, log)
            terminated = True
        except KeyboardInterrupt:
            _save_on_interrupt(run, plan, log)
            raise
        finally:
            log.close()
            if checkpoint_dir is not None:
                checkpoint.wait(checkpoint_dir)  # a background save is complete (or raises)
    if terminated:  # the checkpoint is on disk: let SIGTERM do what it would have done
        signal.raise_signal(signal.SIGTERM)
    ts = run.ts
    for cb in plan.callbacks:
        on_end = getattr(cb, "on_end", None)
        ts = on_end(ts) if callable(on_end) else ts
    return ts, run.history
