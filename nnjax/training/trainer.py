"""The trainer: one jit-compiled train step over a model, a loss and an optax optimizer.

``trainer(...)`` returns a :class:`TrainerFunctions`, a NamedTuple of pure functions (as an
optax ``GradientTransformation``)::

    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-3),
                    metrics=[nj.metrics.accuracy])
    ts = tr.init(params, state)                  # copies params: yours stay valid
    ts, m = tr.step(ts, (x, y), jax.random.key(0))   # m == {"loss": ..., "accuracy": ...}
    m = tr.evaluate(ts, (x, y))

The step is one XLA computation (forward with ``train=True``, loss, gradient,
optax update, new layer state, metrics) with the :class:`TrainState` donated.

Fine-tuning masks (``trainable``): a pytree of bools with the structure of params
(True = trainable; a bool may also stand for a whole subtree). Only trainable
leaves are differentiated (the frozen ones enter the loss as constants, so XLA
forms no weight gradient for them), only they have optimizer state, and frozen
leaves come out bit for bit. A leaf stacked by ``nj.repeat`` (under ``"stacked"``)
may take a NumPy bool array ``(n,)`` that selects copies along axis 0: the whole
stacked leaf is then differentiated and has optimizer state, the unselected
copies' gradients are zeroed before the optimizer (so clipping sees only the
selected ones) and their values are kept by ``jnp.where``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

import jax
import jax.core  # for type checkers: jax's __init__ loads jax.core only under a private name
import jax.numpy as jnp
import optax

from nnjax.core import aux, masks
from nnjax.core.checks import check_int
from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError
from nnjax.core.layer import Params
from nnjax.training import guards, names
from nnjax.training import step as parts
from nnjax.training.step import TrainState

__all__ = ["TrainState", "TrainerFunctions", "trainer", "ONEDNN_DOTS"]

Batch = tuple[Any, Any]
MetricFn = Callable[[Any, Any], jax.Array]

ONEDNN_DOTS: Mapping[str, Any] = MappingProxyType(
    {
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    }
)
"""XLA:CPU options that run each matmul as its own oneDNN call: ``trainer(...,
compiler_options=ONEDNN_DOTS)``. Opt-in: XLA calls the oneDNN path experimental.

Measured on a 2-core Xeon (jaxlib 0.10.2): the 4-layer, width-128 GPT's train step
at batch 32 x 128 tokens 0.78x the default time (the attention's batched dots use
both cores); at 12 x 64 no gain (1.05x). The options are XLA:CPU's (not measured on
other backends). The fusing
variant (``LIBRARY_FUSION_TYPE_DOT``) is not offered: XLA aborts the process
("partition compile failed") on a sum of two dots, ``a @ w1 + b @ w2``, which the
backward pass of separate q/k/v projections contains.
"""


class TrainerFunctions(NamedTuple):
    """Pure functions built by :func:`trainer`.

    Attributes:
        init: ``init(params, state=None) -> TrainState``; copies its inputs.
        step: ``step(ts, batch, rng=None) -> (ts, metrics)``, jitted, ``ts`` donated.
        evaluate: ``evaluate(ts, batch) -> metrics`` (``train=False``), jitted; one
            plain batch (no ``steps_per_call`` axis, no accumulation).
        predict: ``predict(ts, inputs) -> outputs`` (``train=False``), jitted.
        steps_per_call: how many stacked batches ``step`` takes per call.
    """

    init: Callable[..., TrainState]
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[TrainState, Batch], dict[str, jax.Array]]
    predict: Callable[[TrainState, Any], Any]
    steps_per_call: int = 1


# --- small helpers -------------------------------------------------------------------


T = TypeVar("T")


def _copy(tree: T) -> T:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


DONATED = (
    "ts: this TrainState was donated to an earlier train step, which reused its buffers; "
    "use the one that step returned (ts, metrics = tr.step(ts, batch, rng)), or build the "
    "trainer with donate=False to keep every state valid (a copy per step)"
)


CPU_CALLS_IN_FLIGHT = 16
"""Calls of one trainer function a computation over several CPU devices may have queued:
XLA:CPU's in-process collectives deadlocked (a rendezvous timeout that aborts the
process) with 128 or more small train steps queued over 2 host devices; waiting for
every 32nd call's result prevented it."""


def _over_cpu_devices(out: Any) -> bool:
    leaf = next((x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)), None)
    if leaf is None or isinstance(leaf, jax.core.Tracer):
        return False
    devices = leaf.sharding.device_set
    return len(devices) > 1 and next(iter(devices)).platform == "cpu"


class _Donated:
    """A jitted function of a TrainState whose error for a donated state says what happened.

    Reusing a state after ``step`` donated it fails inside XLA ("Buffer has been deleted
    or donated"); the arrays are checked only then, so a good call pays nothing. Every
    other attribute (``lower``, ``_cache_size``) is the jitted function's. Over several
    CPU devices, every :data:`CPU_CALLS_IN_FLIGHT`-th call waits for its result.
    """

    def __init__(self, jitted: Callable[..., Any]):
        self._jitted = jitted
        self._calls = 0
        functools.update_wrapper(self, jitted)

    def __call__(self, ts: TrainState, *args: Any, **kwargs: Any) -> Any:
        out = self._call(ts, *args, **kwargs)
        self._calls += 1
        if self._calls % CPU_CALLS_IN_FLIGHT == 0 and _over_cpu_devices(out):
            jax.block_until_ready(out)
        return out

    def _call(self, ts: TrainState, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._jitted(ts, *args, **kwargs)
        except (RuntimeError, ValueError) as e:
            arrays = [
                x
                for x in jax.tree.leaves(ts)
                if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
            ]
            if not any(x.is_deleted() for x in arrays):
                raise
            raise ArgumentError(DONATED) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


# --- the trainer ---------------------------------------------------------------------


def trainer(
    model: Layer,
    loss_fn: Callable[[Any, Any], Any] | str,
    optimizer: optax.GradientTransformation | str,
    *,
    trainable: Any = None,
    metrics: Sequence[MetricFn | str] | Mapping[str, MetricFn | str] = (),
    steps_per_call: int = 1,
    accumulate: int = 1,
    compute_dtype: Any = None,
    donate: bool = True,
    check_finite: bool = False,
    compiler_options: Mapping[str, Any] | None = None,
    replicas: int = 1,
) -> TrainerFunctions:
    """Build the train step, evaluation and prediction functions for ``model``.

    Args:
        model: a :class:`~nnjax.Layer`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` or ``(scalar, {name: scalar})``
            (the dict is reported as extra metrics). Use a mean over examples. Or a
            name: ``"sparse_categorical_crossentropy"``, ``"mse"``, ... (the table
            :data:`nnjax.training.names.LOSSES`; the losses take logits). Auxiliary
            losses the model's layers report (a mixture of experts' load balancing, see
            :mod:`nnjax.core.aux`) are added to it with their weights and reported as
            ``aux/{kind}`` (unweighted); ``"loss"`` stays the task loss.
        optimizer: an optax ``GradientTransformation`` (chain clipping, schedules, ...),
            or a name, ``"adam"``, ``"sgd"``, ... with Keras' default learning rate
            (the table :data:`nnjax.training.names.OPTIMIZERS`).
        trainable: a bool pytree over params (True = trainable), see the module doc;
            ``None`` trains everything.
        metrics: ``fn(outputs, targets) -> scalar``, keyed by ``__name__``, or names
            (``"accuracy"``, keyed by the name; :data:`nnjax.training.names.METRICS`),
            or a dict ``{key: fn or name}``.
        steps_per_call: ``K``; ``step`` takes batches with a leading axis ``K``
            (``(K, B, ...)``) and runs ``K`` optimizer steps in a ``lax.scan``; step
            ``i`` uses ``jax.random.split(rng, K)[i]``; metrics come stacked ``(K,)``.
        accumulate: ``M``; each batch is split into ``M`` micro-batches along axis 0
            (``B % M == 0``), gradients are averaged over them in a ``lax.scan``
            (micro-batch ``j`` uses ``jax.random.split(rng, M)[j]``; layer state is
            threaded through in order), then one optimizer update. Metrics are the
            mean over micro-batches.
        compute_dtype: e.g. ``jnp.bfloat16``: float params and inputs are cast to it
            for the forward and backward pass (the params of stacked copies,
            :func:`~nnjax.repeat`, by their layers inside the scan, one copy at a time);
            params and optimizer state stay in their own dtype (float32 master copy)
            and the loss is computed on outputs cast to float32.
        donate: donate the train state to ``step`` (``donate_argnums=0``): the ``ts``
            passed in is invalid afterwards; use the returned one.
        check_finite: add a bool metric ``"finite"`` (loss and gradients finite);
            a non-finite step leaves the train state unchanged (``step`` included).
        compiler_options: XLA options for the train step's compilation only (not for
            ``evaluate``/``predict``), as ``jax.jit(..., compiler_options=...)`` takes
            them (:data:`ONEDNN_DOTS`); a global ``XLA_FLAGS`` would reach every
            compile.
        replicas: ``n``; each batch's rows are split into ``n`` equal groups that go
            through the model as replicas of it (``jax.vmap`` over a replica axis, each
            with its own dropout key), the loss is taken over all rows, and the
            replicas' gradients are summed as one flat buffer. Data parallelism over
            ``n`` host devices (the batch sharded on them, the params replicated):
            XLA:CPU's all-reduce meets the devices once per buffer, ~50 times a step
            for a 4-layer GPT, once with replicas (``docs/benchmarks.md``). Layers
            that look across rows see their replica's only (a mixture of experts'
            ``capacity`` dispatch fills per replica; its auxiliary statistics are
            averaged over the replicas); a model with layer state (BatchNorm) is
            refused. On GPUs and TPUs leave it at 1.

    Returns:
        A :class:`TrainerFunctions` ``(init, step, evaluate, predict)``.

    Raises:
        ArgumentError: an unknown optimizer, loss or metric name (the message lists the
            accepted ones), or an optimizer that is not an optax transformation.

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(64), jax.nn.relu, nj.Dense(10))
        >>> params, state = model.init(key, jnp.zeros((32, 784)))
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-3))
        >>> ts = tr.init(params, state)
        >>> x, y = jnp.ones((32, 784)), jnp.zeros((32,), jnp.int32)
        >>> ts, m = tr.step(ts, (x, y), jax.random.key(1))
        >>> int(ts.step), sorted(m)
        (1, ['loss'])
    """
    steps_per_call = check_int(steps_per_call, "steps_per_call")
    accumulate = check_int(accumulate, "accumulate")
    replicas = check_int(replicas, "replicas")
    loss_fn = names.resolve_loss(loss_fn)
    optimizer = names.resolve_optimizer(optimizer)
    forward = parts.forward_fn(model, compute_dtype)
    objective = parts.objective_fn(loss_fn, names.resolve_metrics(metrics))
    gradients = parts.gradients_fn(forward, objective, accumulate, replicas)
    one_step = parts.train_step_fn(model, optimizer, trainable, gradients, check_finite)

    def step(ts: TrainState, batch: Batch, rng: jax.Array | None = None):
        return one_step(ts, batch, rng)

    def evaluate(ts: TrainState, batch: Batch):
        guards.check_batch(batch)
        inputs, targets = batch
        guards.check_params(model, ts.params, inputs)
        outputs, new_state = forward(ts.params, ts.state, inputs, None, False)
        return {**objective(outputs, targets)[1], **aux.losses(new_state)[1]}

    def predict(ts: TrainState, inputs: Any):
        guards.check_params(model, ts.params, inputs)
        return forward(ts.params, ts.state, inputs, None, False)[0]

    return TrainerFunctions(
        init=functools.partial(_init, optimizer, trainable),
        step=_Donated(
            jax.jit(
                step if steps_per_call == 1 else parts.scanned(one_step, steps_per_call),
                donate_argnums=0 if donate else (),
                compiler_options=dict(compiler_options) if compiler_options else None,
            )
        ),
        evaluate=_Donated(jax.jit(evaluate)),
        predict=_Donated(jax.jit(predict)),
        steps_per_call=steps_per_call,
    )


def _init(
    optimizer: optax.GradientTransformation,
    trainable: Any,
    params: Params,
    state: dict[str, Any] | None = None,
) -> TrainState:
    """``TrainerFunctions.init``: copies of ``params`` and ``state``, optimizer state on the trainable part."""
    mask = parts.trainable_mask(trainable, params)
    params, state = _copy(params), _copy({} if state is None else state)
    opt_state = optimizer.init(masks.split(params, mask)[0])
    # An optimizer may keep the very param arrays in its state (lookahead):
    # copy those, or the donated step would get one buffer twice.
    held = {id(x) for x in jax.tree.leaves(params)}
    opt_state = jax.tree.map(lambda x: _copy(x) if id(x) in held else x, opt_state)
    return TrainState(jnp.zeros((), jnp.int32), params, state, opt_state)
