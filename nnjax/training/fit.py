"""The fit loop: steps, logging, evaluation, callbacks, checkpoints and exact resumption.

``fit`` drives a :class:`~nnjax.training.trainer.Trainer` over a stream of batches::

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

import collections
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nnjax.checkpoint import state as checkpoint
from nnjax.core.errors import CheckpointError, TrainingDiverged
from nnjax.data.iterators import BatchIterator, stack_batches
from nnjax.training.trainer import evaluate_dataset

__all__ = ["fit", "TrainingDiverged", "early_stopping"]

Callback = Callable[[int, Any, dict[str, Any]], Any]


def early_stopping(
    monitor: str = "val_loss", patience: int = 3, *, mode: str = "min", min_delta: float = 0.0
) -> Callback:
    """A callback that stops ``fit`` when ``logs[monitor]`` has not improved ``patience`` times.

    Args:
        monitor: the log key, e.g. ``"val_loss"``, ``"val_accuracy"``, ``"loss"``.
        patience: evaluations without improvement before stopping.
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: the least change that counts as an improvement.

    Returns:
        ``callback(step, ts, logs) -> bool``; it only looks at logs that hold ``monitor``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"expected mode 'min' or 'max', got {mode!r}")
    best: float | None = None
    bad = 0

    def callback(step: int, ts: Any, logs: dict[str, Any]) -> bool:
        nonlocal best, bad
        if monitor not in logs:
            return False
        value = float(logs[monitor])
        better = (
            best is None
            or (mode == "min" and value < best - min_delta)
            or (mode == "max" and value > best + min_delta)
        )
        if better:
            best, bad = value, 0
            return False
        bad += 1
        return bad >= patience

    return callback


# ---------------------------------------------------------------- the data stream


def _is_resumable(data: Any) -> bool:
    return hasattr(data, "at") and hasattr(data, "position")


def _stream(data: Any, epochs: int | None, pos: dict[str, int] | None) -> Iterator:
    """``(batch, position after it)`` from any kind of ``train_data``, resumed at ``pos``."""
    if isinstance(data, BatchIterator):
        if pos is not None and "position" not in pos:
            raise CheckpointError(f"the checkpoint's data position {pos} does not fit {data!r}")
        position = data.position if pos is None else pos["position"]
        it = data.at(position, epochs=data.epochs if epochs is None else epochs)
        for batch in it:
            yield batch, {"position": it.position}
        return
    if _is_resumable(data):
        if epochs is not None:
            raise ValueError(f"{type(data).__name__} has no epochs; pass steps= to fit")
        if pos is not None and "position" not in pos:
            raise CheckpointError(f"the checkpoint's data position {pos} does not fit {data!r}")
        it = data.at(data.position if pos is None else pos["position"])
        for batch in it:
            yield batch, {"position": it.position}
        return
    if pos is not None and "epoch" not in pos:
        raise CheckpointError(f"the checkpoint's data position {pos} does not fit {data!r}")
    epoch, index = (0, 0) if pos is None else (pos["epoch"], pos["index"])
    while epochs is None or epoch < epochs:
        it = iter(data(epoch) if callable(data) else data)
        skipped = sum(1 for _ in itertools.islice(it, index))
        count = skipped
        for batch in it:
            count += 1
            yield batch, {"epoch": epoch, "index": count}
        if count == 0:
            return  # an empty (or used up) epoch ends the data
        epoch, index = epoch + 1, 0


def _batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def _calls(stream: Iterator, k: int, prefetch: int) -> Iterator:
    """``(batch for one trainer.step, position after it, examples)``; ``k`` batches stacked."""

    def grouped():
        if k == 1:
            for batch, pos in stream:
                yield batch, pos, _batch_size(batch)
            return
        while True:
            group = list(itertools.islice(stream, k))
            if len(group) < k:
                return
            batches = [b for b, _ in group]
            yield next(stack_batches(batches, k)), group[-1][1], sum(map(_batch_size, batches))

    if prefetch <= 0:
        yield from grouped()
        return
    queue: collections.deque = collections.deque()
    for batch, pos, n in grouped():
        queue.append((jax.device_put(batch), pos, n))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _planned_steps(data: Any, epochs: int | None, steps: int | None) -> int | None:
    per_epoch = None
    if isinstance(data, BatchIterator):
        per_epoch = data.steps_per_epoch
        epochs = data.epochs if epochs is None else epochs
    elif hasattr(data, "__len__") and not callable(data):
        per_epoch = len(data)
    by_epochs = per_epoch * epochs if per_epoch is not None and epochs is not None else None
    known = [n for n in (steps, by_epochs) if n is not None]
    return min(known) if known else None


def _eval_batches(eval_data: Any) -> Iterable:
    if isinstance(eval_data, BatchIterator):
        return eval_data.at(0, epochs=1)  # one full pass, however it was built
    if _is_resumable(eval_data):
        if getattr(eval_data, "steps", None) is None:
            raise ValueError(f"eval_data {type(eval_data).__name__} is endless; give it steps=")
        return eval_data.at(0)
    return eval_data() if callable(eval_data) else eval_data


# ---------------------------------------------------------------- helpers


def _rng_to_json(rng: jax.Array) -> dict[str, Any]:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(rng))
        return {"impl": str(jax.random.key_impl(rng)), "data": data.tolist()}
    return {"impl": None, "data": np.asarray(rng).tolist()}


def _rng_from_json(blob: dict[str, Any]) -> jax.Array:
    data = jnp.asarray(np.asarray(blob["data"], np.uint32))
    return data if blob["impl"] is None else jax.random.wrap_key_data(data, impl=blob["impl"])


def _jsonable(value: Any) -> Any:
    return float(value) if np.ndim(value) == 0 else np.asarray(value).tolist()


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf is finite: one bool fetched, not the whole state."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _is_deleted(tree: Any) -> bool:
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


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
    rng: jax.Array | None = None,
    log_every: int = 50,
    progress: bool = True,
    steps_per_call: int | None = None,
    prefetch: int = 2,
) -> tuple[Any, dict[str, Any]]:
    """Train ``ts`` with ``trainer.step`` over ``train_data``; evaluate, checkpoint, resume.

    Steps count batches taken from ``train_data`` over the whole run (a resumed run
    goes on counting). Step ``s`` (from 0) gets ``jax.random.fold_in(rng, s)``.

    Args:
        trainer: a :class:`~nnjax.training.trainer.Trainer` (``step``, ``evaluate``).
        ts: the initial :class:`~nnjax.training.trainer.TrainState`; it is donated to the first
            step (with a checkpoint to resume from, it only gives the structure).
        train_data: batches ``(inputs, targets)``: a :func:`nnjax.data.batches` or
            :func:`nnjax.data.lm_batches` iterator (resumed at its exact batch), a
            callable ``epoch -> iterable``, or an iterable (a list is passed over
            once per epoch; on resume the batches already seen are skipped).
        epochs: passes over ``train_data``; default: one pass, or the ``epochs`` of a
            ``batches`` iterator.
        steps: total steps of the run; training stops at whichever of ``steps``,
            ``epochs`` and the end of the data comes first.
        eval_data: batches for ``trainer.evaluate``: an iterable that can be passed
            over repeatedly (a list, a ``batches`` iterator) or a callable returning one.
        eval_every: evaluate every this many steps; also at the end when ``eval_data``.
        callbacks: ``callback(step, ts, logs)`` at each log or eval point; ``logs``
            holds the train metrics averaged since the last log (``loss``, ...) and,
            after an eval, ``val_loss``, ...; a truthy return stops training. ``ts`` is
            valid during the call only (the next step donates it).
        checkpoint_dir: resume from the newest checkpoint here, and save into it.
        checkpoint_every: save every this many steps (and at the end, and on Ctrl-C).
        keep: checkpoints to keep.
        rng: a PRNG key; default ``jax.random.key(0)``.
        log_every: fetch metrics, check for divergence and update the progress bar
            every this many steps.
        progress: show a tqdm progress bar (loss, metrics, examples/s).
        steps_per_call: defaults to ``trainer.steps_per_call`` ``K``: ``K`` batches are
            stacked into one call; ``steps`` should be a multiple of ``K``.
        prefetch: batches put on the device ahead of use (0: none).

    Returns:
        ``(ts, history)``; ``history["loss"]`` has one float per step,
        ``history["train"]`` one ``{"step", "loss", ...}`` per log point and
        ``history["eval"]`` one ``{"step", "loss", ...}`` per evaluation.

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
    if log_every < 1 or steps_per_call < 1:
        raise ValueError(
            f"expected log_every, steps_per_call >= 1, got {log_every}, {steps_per_call}"
        )
    k = steps_per_call
    rng = jax.random.key(0) if rng is None else rng
    step, pos, last_ckpt, saved_at = 0, None, None, None
    history: dict[str, Any] = {"loss": [], "train": [], "eval": []}

    if checkpoint_dir is not None:
        found = checkpoint.latest(checkpoint_dir)
        if found is not None:
            ts, extra = checkpoint.restore(found, ts)
            if "fit" not in extra:
                raise CheckpointError(f"{found} was not written by fit (no 'fit' entry in extra)")
            run = extra["fit"]
            step, pos, history = run["step"], run["data"], run["history"]
            rng = _rng_from_json(run["rng"])
            last_ckpt, saved_at = found, step

    if isinstance(train_data, BatchIterator):
        if steps is None and epochs is None and train_data.epochs is None:
            raise ValueError("train_data is endless (batches(..., epochs=None)): pass steps=")
    elif not _is_resumable(train_data) and epochs is None and steps is None:
        epochs = 1
    total = _planned_steps(train_data, epochs, steps)
    calls = _calls(_stream(train_data, epochs, pos), k, prefetch)
    pending: list[tuple[int, dict[str, Any]]] = []
    window = {"start": time.perf_counter(), "examples": 0}
    start_step, evaluated_at = step, None
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)

    def flush() -> dict[str, float]:
        """Fetch the pending metrics, check them, extend the history; the mean logs."""
        if not pending:
            return {}
        fetched = jax.device_get([m for _, m in pending])
        losses: list[float] = []
        sums: dict[str, list] = collections.defaultdict(list)
        for (first, _), m in zip(pending, fetched, strict=True):
            loss = np.ravel(np.asarray(m["loss"], np.float32))
            if loss.size != k:
                raise ValueError(
                    f"fit(steps_per_call={k}) but trainer.step returned {loss.size} losses per "
                    "call; pass the trainer's steps_per_call"
                )
            ok = np.ravel(m.get("finite", True)) & np.isfinite(loss)
            if not ok.all():
                bad = int(np.argmin(ok))
                what = f"loss {loss[bad]}" if not np.isfinite(loss[bad]) else "non-finite gradients"
                raise TrainingDiverged(first + bad + 1, last_ckpt, what)
            losses.extend(float(x) for x in loss)
            for name, value in m.items():
                if name != "finite":
                    sums[name].append(np.asarray(value, np.float64).reshape(k, -1))
        pending.clear()
        history["loss"].extend(losses)
        logs = {n: _jsonable(np.concatenate(v).mean(axis=0).squeeze()) for n, v in sums.items()}
        history["train"].append({"step": step, **logs})
        now = time.perf_counter()
        rate = window["examples"] / max(now - window["start"], 1e-9)
        window.update(start=now, examples=0)
        bar.update(step - bar.n)
        post = {n: f"{v:.4g}" for n, v in logs.items() if isinstance(v, float)}
        bar.set_postfix({**post, "ex/s": f"{rate:.4g}"}, refresh=False)
        return logs

    def evaluate() -> dict[str, Any]:
        try:
            metrics = evaluate_dataset(trainer, ts, _eval_batches(eval_data))
        except ValueError as e:
            if "no batches" not in str(e):
                raise
            raise ValueError(
                "eval_data gave no batches (a one-shot iterator is used up after one "
                "evaluation: pass a list, a callable or nj.data.batches)"
            ) from None
        metrics = {n: _jsonable(v) for n, v in metrics.items()}
        history["eval"].append({"step": step, **metrics})
        return {f"val_{n}": v for n, v in metrics.items()}

    def save() -> None:
        nonlocal last_ckpt, saved_at
        flush()
        if not bool(_all_finite(ts)):
            raise TrainingDiverged(step, last_ckpt, "non-finite values in the train state")
        extra = {"fit": {"step": step, "data": pos, "rng": _rng_to_json(rng), "history": history}}
        last_ckpt = checkpoint.save(checkpoint_dir, ts, step=step, extra=extra, keep=keep)
        saved_at = step

    def due(every: int | None, first: int) -> bool:
        return bool(every) and step // every > first // every

    try:
        while steps is None or step + k <= steps:
            item = next(calls, None)
            if item is None:
                break
            batch, new_pos, n = item
            new_ts, metrics = trainer.step(ts, batch, jax.random.fold_in(rng, step))
            first, ts, step, pos = step, new_ts, step + k, new_pos
            pending.append((first, metrics))
            window["examples"] += n
            logs = flush() if due(log_every, first) or step == total else {}
            if eval_data is not None and due(eval_every, first):
                logs.update(evaluate())
                evaluated_at = step
            stop = False
            if logs:
                for callback in callbacks:
                    stop = bool(callback(step, ts, logs)) or stop
            if checkpoint_dir is not None and due(checkpoint_every, first):
                save()
            if stop:
                break
        flush()
        if step > start_step:
            if eval_data is not None and evaluated_at != step:
                evaluate()
            if checkpoint_dir is not None and saved_at != step:
                save()
    except KeyboardInterrupt:
        if checkpoint_dir is not None and saved_at != step and step > 0 and not _is_deleted(ts):
            try:
                save()
            except TrainingDiverged as e:
                warnings.warn(f"interrupted; no checkpoint saved: {e}", stacklevel=2)
        raise
    finally:
        bar.close()
    return ts, history
