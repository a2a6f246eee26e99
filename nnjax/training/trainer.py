"""The trainer: one jit-compiled train step over a model, a loss and an optax optimizer.

``trainer(...)`` returns a :class:`Trainer`, a NamedTuple of pure functions (as an
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

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnjax.core import masks
from nnjax.core.checks import check_int, shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import DataError, LayerError, OptimizerStateError, ShapeError
from nnjax.core.paths import flatten
from nnjax.training import metrics as metrics_lib

__all__ = ["TrainState", "Trainer", "trainer", "evaluate_dataset", "ONEDNN_DOTS"]

Params = dict[str, Any]
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


class TrainState(NamedTuple):
    """Everything a train step updates; a pytree.

    Attributes:
        step: int32 scalar, the number of optimizer updates applied.
        params: the model's params (float32 master copy under mixed precision).
        state: the model's layer state (BatchNorm statistics), ``{}`` if none.
        opt_state: the optax state, built on the trainable params only.
    """

    step: jax.Array
    params: Params
    state: dict[str, Any]
    opt_state: Any


class Trainer(NamedTuple):
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


def _trainable_mask(trainable: Any, params: Params) -> masks.Resolved:
    resolved = masks.resolve(trainable, params)
    masks.require_trainable(resolved)
    return resolved


# --- small helpers -------------------------------------------------------------------


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _metric_fns(metrics: Sequence[MetricFn] | Mapping[str, MetricFn]) -> dict[str, MetricFn]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    fns: dict[str, MetricFn] = {}
    for fn in metrics:
        name = getattr(fn, "__name__", "")
        if not name or name.startswith("<") or name in fns:
            raise ValueError(
                f"metric {fn!r} needs a unique __name__; pass metrics as a dict {{name: fn}}"
            )
        fns[name] = fn
    return fns


def _split_leading(tree: Any, n: int, what: str) -> Any:
    """Each leaf ``(B, ...)`` -> ``(n, B // n, ...)``."""

    def split(x):
        if np.ndim(x) < 1 or np.shape(x)[0] % n:
            raise ShapeError(
                f"expected batch arrays whose leading axis divides by {what}={n}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )
        return x.reshape(n, np.shape(x)[0] // n, *np.shape(x)[1:])

    return jax.tree.map(split, tree)


def _check_leading(tree: Any, n: int) -> None:
    for x in jax.tree.leaves(tree):
        if np.ndim(x) < 1 or np.shape(x)[0] != n:
            raise ShapeError(
                f"expected batch arrays with a leading axis of steps_per_call={n}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )


def _keys(rng: jax.Array | None, n: int) -> jax.Array | None:
    return None if rng is None else jax.random.split(rng, n)


# --- trace-time checks: bad batches, params and optimizer states fail before any work ---


def _check_batch(batch: Any) -> None:
    """Every input and target array must have the same leading (batch) length."""
    inputs, targets = batch
    xs = [a for a in jax.tree.leaves(inputs) if np.ndim(a) >= 1]
    ys = [a for a in jax.tree.leaves(targets) if np.ndim(a) >= 1]
    if not xs:
        return
    n = np.shape(xs[0])[0]
    for other, what in [*((a, "another input") for a in xs[1:]), *((a, "targets") for a in ys)]:
        if np.shape(other)[0] != n:
            raise DataError(
                "expected inputs and targets with the same leading (batch) length, "
                f"got x.shape == {shape_str(np.shape(xs[0]))} (inputs) and "
                f"{shape_str(np.shape(other))} ({what})"
            )


def _plan_key() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(jax.random.key, 0)


def _check_params(model: Layer, params: Params, inputs: Any) -> None:
    """``params`` must hold every leaf ``model.init`` makes for ``inputs``, with its shape.

    Runs ``jax.eval_shape`` (no FLOPs) while the step is traced, so it costs nothing per
    step. Extra leaves are left to the layers' own checks: adapters (``lora_a``, ...)
    are params that ``init`` does not make.
    """
    try:
        expected = jax.eval_shape(model.init, _plan_key(), inputs)[0]
    except Exception:  # init cannot plan from this batch; the layers' own checks remain
        return
    got = flatten(params)
    for path, spec in flatten(expected).items():
        *parent, leaf = path.split("/")
        if path not in got:
            prefix = "/".join(parent) + "/" if parent else ""
            keys = sorted(p[len(prefix) :].split("/")[0] for p in got if p.startswith(prefix))
            raise LayerError(
                f"missing param {leaf!r} (expected shape {shape_str(spec.shape)}); got keys {keys}",
                tuple(parent),
            )
        if tuple(np.shape(got[path])) != tuple(spec.shape):
            raise LayerError(
                f"expected param {leaf!r} with shape {shape_str(spec.shape)}, "
                f"got {shape_str(np.shape(got[path]))}",
                tuple(parent),
            )


def _state_kind(tree: Any) -> str:
    """An optimizer state's node types: ``(ScaleByAdamState, EmptyState)``."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree).__name__
    if isinstance(tree, tuple | list):
        return "(" + ", ".join(_state_kind(t) for t in tree) + ")"
    return type(tree).__name__


def _check_opt_state(optimizer: optax.GradientTransformation, train_p: Params, opt_state: Any):
    """``opt_state`` must have the structure and shapes ``optimizer.init(train_p)`` gives."""
    try:
        want = jax.eval_shape(optimizer.init, train_p)
    except Exception:  # an optimizer whose init cannot be traced: nothing to compare
        return
    if jax.tree.structure(want) != jax.tree.structure(opt_state):
        kind_w, kind_g = _state_kind(want), _state_kind(opt_state)
        if kind_w == kind_g:  # same optimizer, built over other params (another mask?)
            paths = lambda t: {jax.tree_util.keystr(k) for k, _ in jax.tree.leaves_with_path(t)}
            pw, pg = paths(want), paths(opt_state)
            raise OptimizerStateError(
                f"opt_state: expected a {kind_w} over the trainable params, got one over other "
                f"params: missing {sorted(pw - pg)[:5]}, unexpected {sorted(pg - pw)[:5]}; "
                "build the TrainState with this trainer's init"
            )
        raise OptimizerStateError(
            f"opt_state: expected the state of this trainer's optimizer, {kind_w}, got {kind_g}; "
            "build the TrainState with this trainer's init"
        )
    for (keypath, w), g in zip(
        jax.tree.leaves_with_path(want), jax.tree.leaves(opt_state), strict=True
    ):
        if tuple(np.shape(g)) != tuple(w.shape):
            raise OptimizerStateError(
                f"opt_state: expected {jax.tree_util.keystr(keypath)} with shape "
                f"{shape_str(w.shape)}, got {shape_str(np.shape(g))}"
            )


# --- the trainer ---------------------------------------------------------------------


def trainer(
    model: Layer,
    loss_fn: Callable[[Any, Any], Any],
    optimizer: optax.GradientTransformation,
    *,
    trainable: Any = None,
    metrics: Sequence[MetricFn] | Mapping[str, MetricFn] = (),
    steps_per_call: int = 1,
    accumulate: int = 1,
    compute_dtype: Any = None,
    donate: bool = True,
    check_finite: bool = False,
    compiler_options: Mapping[str, Any] | None = None,
) -> Trainer:
    """Build the train step, evaluation and prediction functions for ``model``.

    Args:
        model: a :class:`~nnjax.Layer`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` or ``(scalar, {name: scalar})``
            (the dict is reported as extra metrics). Use a mean over examples.
        optimizer: an optax ``GradientTransformation`` (chain clipping, schedules, ...).
        trainable: a bool pytree over params (True = trainable), see the module doc;
            ``None`` trains everything.
        metrics: ``fn(outputs, targets) -> scalar``, keyed by ``__name__``, or a dict.
        steps_per_call: ``K``; ``step`` takes batches with a leading axis ``K``
            (``(K, B, ...)``) and runs ``K`` optimizer steps in a ``lax.scan``; step
            ``i`` uses ``jax.random.split(rng, K)[i]``; metrics come stacked ``(K,)``.
        accumulate: ``M``; each batch is split into ``M`` micro-batches along axis 0
            (``B % M == 0``), gradients are averaged over them in a ``lax.scan``
            (micro-batch ``j`` uses ``jax.random.split(rng, M)[j]``; layer state is
            threaded through in order), then one optimizer update. Metrics are the
            mean over micro-batches.
        compute_dtype: e.g. ``jnp.bfloat16``: float params and inputs are cast to it
            for the forward and backward pass; params and optimizer state stay in
            their own dtype (float32 master copy) and the loss is computed on outputs
            cast to float32.
        donate: donate the train state to ``step`` (``donate_argnums=0``): the ``ts``
            passed in is invalid afterwards; use the returned one.
        check_finite: add a bool metric ``"finite"`` (loss and gradients finite);
            a non-finite step leaves the train state unchanged (``step`` included).
        compiler_options: XLA options for the train step's compilation only (not for
            ``evaluate``/``predict``), as ``jax.jit(..., compiler_options=...)`` takes
            them (:data:`ONEDNN_DOTS`); a global ``XLA_FLAGS`` would reach every
            compile.

    Returns:
        A :class:`Trainer` ``(init, step, evaluate, predict)``.

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
    metric_fns = _metric_fns(metrics)

    def forward(params, state, inputs, rng, train):
        if compute_dtype is not None:
            params, inputs = _cast_floats((params, inputs), compute_dtype)
        outputs, new_state = model.apply(params, state, inputs, rng=rng, train=train)
        if compute_dtype is not None:
            outputs = _cast_floats(outputs, jnp.float32)
        return outputs, new_state

    def loss_and_metrics(outputs, targets):
        out = loss_fn(outputs, targets)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        values = {"loss": loss, **extra}
        for name, fn in metric_fns.items():
            if name in values:
                raise ValueError(f"metric name {name!r} is also a loss output")
            values[name] = fn(outputs, targets)
        return loss, values

    def grads_of(train_p, frozen, template, state, batch, rng):
        """Gradient of the loss w.r.t. the trainable params only; frozen ones are constants."""
        inputs, targets = batch

        def loss_of(train_p):
            params = masks.merge(template, train_p, frozen)
            outputs, new_state = forward(params, state, inputs, rng, True)
            loss, values = loss_and_metrics(outputs, targets)
            return loss, (new_state, values)

        (_, (new_state, values)), grads = jax.value_and_grad(loss_of, has_aux=True)(train_p)
        if jax.tree.structure(new_state) != jax.tree.structure(state):
            raise ValueError(
                "model.apply returned a state with another structure than ts.state; "
                "pass the state from model.init to trainer.init"
            )
        new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, state)
        return grads, new_state, values

    def one_step(ts, batch, rng):
        _check_batch(batch)
        _check_params(model, ts.params, batch[0])
        mask = _trainable_mask(trainable, ts.params)
        train_p, frozen = masks.split(ts.params, mask)
        _check_opt_state(optimizer, train_p, ts.opt_state)
        if accumulate == 1:
            grads, new_state, values = grads_of(train_p, frozen, ts.params, ts.state, batch, rng)
        else:

            def micro_step(carry, xs):
                g_sum, state = carry
                g, state, values = grads_of(train_p, frozen, ts.params, state, *xs)
                return (jax.tree.map(jnp.add, g_sum, g), state), values

            micro = (_split_leading(batch, accumulate, "accumulate"), _keys(rng, accumulate))
            g0 = jax.tree.map(jnp.zeros_like, train_p)
            (g_sum, new_state), values = jax.lax.scan(micro_step, (g0, ts.state), micro)
            grads = jax.tree.map(lambda g: g / accumulate, g_sum)
            values = jax.tree.map(lambda v: jnp.mean(v, axis=0), values)
        grads = masks.select_copies(mask, grads, None)
        updates, opt_state = optimizer.update(grads, ts.opt_state, train_p)
        new_train = masks.select_copies(mask, optax.apply_updates(train_p, updates), train_p)
        new = (ts.step + 1, new_train, new_state, opt_state)
        if check_finite:
            finite = jnp.isfinite(values["loss"])
            for g in jax.tree.leaves(grads):
                finite &= jnp.all(jnp.isfinite(g))
            old = (ts.step, train_p, ts.state, ts.opt_state)
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            values = {**values, "finite": finite}
        step, new_train, new_state, opt_state = new
        params = masks.merge(ts.params, new_train, frozen)
        return TrainState(step, params, new_state, opt_state), values

    def step(ts: TrainState, batch: Batch, rng: jax.Array | None = None):
        if steps_per_call == 1:
            return one_step(ts, batch, rng)
        _check_leading(batch, steps_per_call)
        return jax.lax.scan(
            lambda ts, xs: one_step(ts, *xs), ts, (batch, _keys(rng, steps_per_call))
        )

    def evaluate(ts: TrainState, batch: Batch):
        _check_batch(batch)
        inputs, targets = batch
        _check_params(model, ts.params, inputs)
        outputs, _ = forward(ts.params, ts.state, inputs, None, False)
        return loss_and_metrics(outputs, targets)[1]

    def predict(ts: TrainState, inputs: Any):
        _check_params(model, ts.params, inputs)
        return forward(ts.params, ts.state, inputs, None, False)[0]

    def init(params: Params, state: dict[str, Any] | None = None) -> TrainState:
        mask = _trainable_mask(trainable, params)
        params, state = _copy(params), _copy({} if state is None else state)
        opt_state = optimizer.init(masks.split(params, mask)[0])
        # An optimizer may keep the very param arrays in its state (lookahead):
        # copy those, or the donated step would get one buffer twice.
        held = {id(x) for x in jax.tree.leaves(params)}
        opt_state = jax.tree.map(lambda x: _copy(x) if id(x) in held else x, opt_state)
        return TrainState(jnp.zeros((), jnp.int32), params, state, opt_state)

    return Trainer(
        init=init,
        step=jax.jit(
            step,
            donate_argnums=0 if donate else (),
            compiler_options=dict(compiler_options) if compiler_options else None,
        ),
        evaluate=jax.jit(evaluate),
        predict=jax.jit(predict),
        steps_per_call=steps_per_call,
    )


def evaluate_dataset(tr: Trainer, ts: TrainState, batches: Iterable[Batch]) -> dict[str, Any]:
    """``tr.evaluate`` over ``batches``, each metric averaged weighted by batch size.

    The weight of a batch is the leading axis of its first input array. (A loss
    that is itself a mean over a varying number of tokens, with ``ignore_index``,
    is still weighted per example.)

    Returns:
        ``{name: float}`` (arrays for non-scalar metrics).

    Raises:
        ValueError: ``batches`` is empty.
    """
    avg = metrics_lib.MetricsAverage()
    for batch in batches:
        n = np.shape(jax.tree.leaves(batch[0])[0])[0]
        avg = metrics_lib.update(avg, tr.evaluate(ts, batch), n)
    if not avg.sums:
        raise ValueError("evaluate_dataset: no batches")
    return {
        k: float(v) if np.ndim(v) == 0 else np.asarray(v)
        for k, v in jax.device_get(metrics_lib.compute(avg)).items()
    }
