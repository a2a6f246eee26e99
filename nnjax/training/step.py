"""The train step, in named parts: forward pass, loss and metrics, gradients (over
micro-batches when accumulating), the finite guard, and the masked optimizer update.

:func:`nnjax.trainer` puts them together and jit-compiles the result; each part is a
factory closing over configuration, and the step they make is one XLA computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nnjax.core import aux, masks, paths
from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Params
from nnjax.training import guards

__all__ = ["TrainState"]


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


def trainable_mask(trainable: Any, params: Params) -> masks.Resolved:
    """The mask resolved against ``params``; one that freezes everything, or trains a
    quantized leaf, is refused."""
    resolved = masks.resolve(trainable, params)
    masks.require_trainable(resolved)
    masks.require_frozen_quantized(resolved, params)
    return resolved


def keys(rng: jax.Array | None, n: int) -> jax.Array | None:
    return None if rng is None else jax.random.split(rng, n)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


def _in_stack(path: tuple) -> bool:
    return any(paths.parse_stack_key(str(getattr(k, "key", ""))) is not None for k in path)


def _cast_unstacked(params: Any, dtype: Any) -> Any:
    """Float params cast to ``dtype``, except those of stacked copies (:func:`nnjax.repeat`).

    The copies' layers cast each copy's params inside the scan (a layer computes in its
    input's dtype), so their gradients are gathered into the stacked float32 buffers in
    place; cast before the scan, XLA:CPU rewrote the whole stacked bfloat16 gradient for
    every layer (an unsupported bfloat16 ``dynamic-update-slice`` converted to float32).
    """

    def cast(path, x):
        if _in_stack(path) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def forward_fn(model: Layer, compute_dtype: Any) -> Callable:
    """``forward(params, state, inputs, rng, train) -> (outputs, state)``, in ``compute_dtype``."""

    def forward(params, state, inputs, rng, train):
        if compute_dtype is not None:
            params, inputs = (
                _cast_unstacked(params, compute_dtype),
                _cast_floats(inputs, compute_dtype),
            )
        outputs, new_state = model.apply(params, state, inputs, rng=rng, train=train)
        if compute_dtype is not None:
            outputs = _cast_floats(outputs, jnp.float32)
        return outputs, new_state

    return forward


def objective_fn(loss_fn: Callable, metric_fns: Mapping[str, Callable]) -> Callable:
    """``objective(outputs, targets) -> (loss, {"loss": ..., extra losses, metrics})``."""

    def objective(outputs, targets):
        out = loss_fn(outputs, targets)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        values = {"loss": loss, **extra}
        for name, fn in metric_fns.items():
            if name in values:
                raise ArgumentError(f"metric name {name!r} is also a loss output")
            values[name] = fn(outputs, targets)
        return loss, values

    return objective


def gradients_fn(forward: Callable, objective: Callable, accumulate: int) -> Callable:
    """``grads(train_p, frozen, template, state, batch, rng) -> (grads, state, values)``.

    Differentiates the trainable params only (the frozen ones enter as constants). The
    objective is the loss plus the weighted auxiliary losses the layers report in their
    state (:mod:`nnjax.core.aux`); ``values`` gains their unweighted ``aux/{kind}``, and
    the state comes back without them. With ``accumulate`` ``M > 1`` the batch is split into ``M`` micro-batches in a
    ``lax.scan``, gradients and metrics averaged, layer state threaded in order.
    """

    def once(train_p, frozen, template, state, batch, rng):
        inputs, targets = batch

        def loss_of(train_p):
            params = masks.merge(template, train_p, frozen)
            outputs, new_state = forward(params, state, inputs, rng, True)
            loss, values = objective(outputs, targets)
            aux_total, aux_values = aux.losses(new_state)
            return loss + aux_total, (aux.strip(new_state), {**values, **aux_values})

        (_, (new_state, values)), grads = jax.value_and_grad(loss_of, has_aux=True)(train_p)
        if jax.tree.structure(new_state) != jax.tree.structure(state):
            raise LayerError(
                "model.apply returned a state with another structure than ts.state; "
                "pass the state from model.init to trainer.init"
            )
        new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, state)
        return grads, new_state, values

    if accumulate == 1:
        return once

    def accumulated(train_p, frozen, template, state, batch, rng):
        def micro_step(carry, xs):
            g_sum, state = carry
            g, state, values = once(train_p, frozen, template, state, *xs)
            return (jax.tree.map(jnp.add, g_sum, g), state), values

        micro = (guards.split_leading(batch, accumulate, "accumulate"), keys(rng, accumulate))
        g0 = jax.tree.map(jnp.zeros_like, train_p)
        (g_sum, new_state), values = jax.lax.scan(micro_step, (g0, state), micro)
        grads = jax.tree.map(lambda g: g / accumulate, g_sum)
        return grads, new_state, jax.tree.map(lambda v: jnp.mean(v, axis=0), values)

    return accumulated


def finite_guard(new: Any, old: Any, values: dict, grads: Any) -> tuple[Any, dict]:
    """``new`` where the loss and gradients are finite, else ``old``; adds the ``finite`` metric."""
    finite = jnp.isfinite(values["loss"])
    for g in jax.tree.leaves(grads):
        finite &= jnp.all(jnp.isfinite(g))
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return new, {**values, "finite": finite}


def train_step_fn(
    model: Layer,
    optimizer: optax.GradientTransformation,
    trainable: Any,
    gradients: Callable,
    check_finite: bool,
) -> Callable:
    """``one_step(ts, batch, rng) -> (ts, metrics)``: checks, gradients, masked update."""

    def one_step(ts: TrainState, batch: Any, rng: jax.Array | None):
        guards.check_batch(batch)
        guards.check_params(model, ts.params, batch[0])
        mask = trainable_mask(trainable, ts.params)
        train_p, frozen = masks.split(ts.params, mask)
        guards.check_opt_state(optimizer, train_p, ts.opt_state)
        grads, new_state, values = gradients(train_p, frozen, ts.params, ts.state, batch, rng)
        grads = masks.select_copies(mask, grads, None)
        updates, opt_state = optimizer.update(grads, ts.opt_state, train_p)
        new_train = masks.select_copies(mask, optax.apply_updates(train_p, updates), train_p)
        new = (ts.step + 1, new_train, new_state, opt_state)
        if check_finite:
            old = (ts.step, train_p, ts.state, ts.opt_state)
            new, values = finite_guard(new, old, values, grads)
        step, new_train, new_state, opt_state = new
        params = masks.merge(ts.params, new_train, frozen)
        return TrainState(step, params, new_state, opt_state), values

    return one_step


def scanned(one_step: Callable, k: int) -> Callable:
    """``k`` steps in one call: batches ``(k, B, ...)``, step ``i`` with ``split(rng, k)[i]``."""

    def step(ts: TrainState, batch: Any, rng: jax.Array | None = None):
        guards.check_leading(batch, k)
        return jax.lax.scan(lambda ts, xs: one_step(ts, *xs), ts, (batch, keys(rng, k)))

    return step
