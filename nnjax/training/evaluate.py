"""A trained state over a whole dataset: metrics averaged over it, outputs for it.

``nj.evaluate`` and ``nj.predict`` take data in the forms ``nj.fit`` takes: arrays with
``batch_size=`` (split in order, nothing dropped), a ``nj.data.batches`` iterator (one
full pass each call, so the same object can be evaluated again), a list of batches, or
a callable returning an iterable of them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from nnjax.core.checks import check_int
from nnjax.core.errors import DataError
from nnjax.data.iterators import batches as make_batches
from nnjax.training import metrics as metrics_lib
from nnjax.training import stream

__all__ = ["evaluate", "predict"]


def _batches(data: Any, batch_size: int | None, what: str) -> Any:
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size")
        return make_batches(data, batch_size, shuffle=False, drop_remainder=False)
    if stream.is_arrays(data):
        raise DataError(f"{what}: got arrays without batch_size=; {stream.ACCEPTED}")
    return stream.eval_batches(data)


def evaluate(tr: Any, ts: Any, data: Any, *, batch_size: int | None = None) -> dict[str, Any]:
    """``tr.evaluate`` over a dataset, each metric averaged over examples.

    A batch weighs as many examples as the leading axis of its first input array (a
    loss that is itself a mean over a varying number of tokens, with ``ignore_index``,
    is still weighted per example).

    Args:
        tr: a :class:`~nnjax.training.trainer.TrainerFunctions`.
        ts: its train state.
        data: ``(inputs, targets)`` arrays with ``batch_size``, or batches as
            ``nj.fit``'s ``eval_data`` (see the module doc).
        batch_size: examples per batch when ``data`` is arrays.

    Returns:
        ``{name: float}`` (arrays for non-scalar metrics).

    Raises:
        DataError: arrays without ``batch_size``, or a batch that is not a pair.
        DataError: ``data`` gives no batches.

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(3))
        >>> x, y = np.ones((10, 4), np.float32), np.zeros(10, np.int32)
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.sgd(0.1))
        >>> ts = tr.init(*model.init(key, x))
        >>> sorted(nj.evaluate(tr, ts, (x, y), batch_size=4))
        ['loss']
    """
    avg = metrics_lib.MetricsAverage()
    for batch in _batches(data, batch_size, "evaluate"):
        inputs, _ = stream.check_batch(batch, "evaluate")
        n = np.shape(jax.tree.leaves(inputs)[0])[0]
        avg = metrics_lib.update(avg, tr.evaluate(ts, batch), n)
    if not avg.sums:
        raise DataError(
            "evaluate: no batches (a one-shot iterator is used up after one pass: pass a "
            "list, a callable or nj.data.batches)"
        )
    return {
        k: float(v) if np.ndim(v) == 0 else np.asarray(v)
        for k, v in jax.device_get(metrics_lib.compute(avg)).items()
    }


@jax.jit
def _softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits, axis=-1)


def predict(
    tr: Any, ts: Any, data: Any, *, batch_size: int | None = None, probabilities: bool = False
) -> Any:
    """``tr.predict`` over a dataset in batches, the outputs joined on the host.

    nnjax models end in logits (the losses take logits, as ``optax``'s do): a Keras
    model's final ``softmax`` is not part of them. ``probabilities=True`` applies
    ``jax.nn.softmax`` over the last axis, for models that classify; for a sigmoid
    output take ``jax.nn.sigmoid`` of the logits.

    Args:
        tr: a :class:`~nnjax.training.trainer.TrainerFunctions`.
        ts: its train state.
        data: inputs ``(N, ...)`` (an array or a pytree of them) with ``batch_size``,
            split in order; or an iterable of input batches (not ``(inputs, targets)``
            pairs), or a callable returning one.
        batch_size: examples per call when ``data`` is arrays.
        probabilities: softmax over the last axis of each output.

    Returns:
        The outputs ``(N, ...)`` as NumPy arrays (a pytree for a model with several).

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(3))
        >>> x = np.ones((10, 4), np.float32)
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.sgd(0.1))
        >>> ts = tr.init(*model.init(key, x))
        >>> p = nj.predict(tr, ts, x, batch_size=4, probabilities=True)
        >>> p.shape, bool(np.allclose(p.sum(-1), 1.0))
        ((10, 3), True)
    """
    outputs = []
    for inputs in _batches(data, batch_size, "predict"):
        out = tr.predict(ts, inputs)
        outputs.append(jax.tree.map(_softmax, out) if probabilities else out)
    if not outputs:
        raise DataError("predict: no batches")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *jax.device_get(outputs))
