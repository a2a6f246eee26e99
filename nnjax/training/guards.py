"""The trainer's trace-time checks: a bad batch, params or optimizer state fails before any work.

Each runs while the step is traced (shapes only, ``jax.eval_shape`` where it needs
a plan), so it costs nothing per step and the donated train state survives it.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
import optax

from nnjax.core.checks import shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import DataError, LayerError, OptimizerStateError, ShapeError
from nnjax.core.paths import flatten

__all__: list[str] = []  # the trainer's internals

# An optimizer whose init looks at values (not only shapes) cannot be planned with
# eval_shape; these are the errors tracing raises then.
_UNTRACEABLE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def split_leading(tree: Any, n: int, what: str) -> Any:
    """Each leaf ``(B, ...)`` -> ``(n, B // n, ...)``."""

    def split(x):
        if np.ndim(x) < 1 or np.shape(x)[0] % n:
            raise ShapeError(
                f"expected batch arrays whose leading axis divides by {what}={n}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )
        return x.reshape(n, np.shape(x)[0] // n, *np.shape(x)[1:])

    return jax.tree.map(split, tree)


def check_leading(tree: Any, n: int) -> None:
    for x in jax.tree.leaves(tree):
        if np.ndim(x) < 1 or np.shape(x)[0] != n:
            raise ShapeError(
                f"expected batch arrays with a leading axis of steps_per_call={n}, "
                f"got x.shape == {shape_str(np.shape(x))}"
            )


def check_batch(batch: Any) -> None:
    """A batch is ``(inputs, targets)`` whose arrays share one leading (batch) length >= 1."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise DataError(f"expected a batch (inputs, targets), got a {type(batch).__name__}")
    inputs, targets = batch
    _warn_uint8(inputs)
    xs = [a for a in jax.tree.leaves(inputs) if np.ndim(a) >= 1]
    ys = [a for a in jax.tree.leaves(targets) if np.ndim(a) >= 1]
    if not xs:
        return
    n = np.shape(xs[0])[0]
    if n == 0:  # a mean over no examples is NaN: the step would poison the params
        raise DataError(
            f"expected a batch with at least one example, got x.shape == {shape_str(np.shape(xs[0]))}"
        )
    for other, what in [*((a, "another input") for a in xs[1:]), *((a, "targets") for a in ys)]:
        if np.shape(other)[0] != n:
            raise DataError(
                "expected inputs and targets with the same leading (batch) length, "
                f"got x.shape == {shape_str(np.shape(xs[0]))} (inputs) and "
                f"{shape_str(np.shape(other))} ({what})"
            )


def _warn_uint8(inputs: Any) -> None:
    """uint8 inputs are almost always images as stored: layers cast them to float as they are.

    Not an error (a uint8 array may hold ids or flags on purpose); a warning, raised
    once per compile (it runs while the step is traced), so it costs nothing per step.
    """
    if any(np.result_type(a) == np.uint8 for a in jax.tree.leaves(inputs)):
        warnings.warn(
            "inputs of dtype uint8: float layers cast them to float unscaled (0..255, not 0..1); "
            "for images pass x.astype(np.float32) / 255, for ids cast to int32",
            UserWarning,
            stacklevel=2,
        )


def _plan_key() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(jax.random.key, 0)


def check_params(model: Layer, params: dict[str, Any], inputs: Any) -> None:
    """``params`` must hold every leaf ``model.init`` makes for ``inputs``, with its shape.

    Runs ``jax.eval_shape`` (no FLOPs) while the step is traced, so it costs nothing per
    step. Extra leaves are left to the layers' own checks: adapters (``lora_a``, ...)
    are params that ``init`` does not make.
    """
    try:
        expected = jax.eval_shape(model.init, _plan_key(), inputs)[0]
    except LayerError:  # init refuses this batch; apply's own check says why, with its path
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
        quantized = f"{path}_scale" in got  # stored packed: its layer checks its shape
        if not quantized and tuple(np.shape(got[path])) != tuple(spec.shape):
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


def check_opt_state(
    optimizer: optax.GradientTransformation, train_p: dict[str, Any], opt_state: Any
):
    """``opt_state`` must have the structure and shapes ``optimizer.init(train_p)`` gives."""
    try:
        want = jax.eval_shape(optimizer.init, train_p)
    except _UNTRACEABLE:  # nothing to compare against
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
