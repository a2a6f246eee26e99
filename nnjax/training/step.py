"""The train step, in named parts: forward pass, loss and metrics, gradients (over
micro-batches when accumulating), the finite guard, and the masked optimizer update.

:func:`nnjax.trainer` puts them together and jit-compiles the result; each part is a
factory closing over configuration, and the step they make is one XLA computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnjax.core import aux, masks, paths
from nnjax.core.checks import shape_str
from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError, LayerError, ShapeError
from nnjax.core.layer import Params
from nnjax.training import guards
from nnjax.training.chunked import LazyLogits

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


def gradients_fn(
    forward: Callable, objective: Callable, accumulate: int, replicas: int = 1
) -> Callable:
    """``grads(train_p, frozen, template, state, batch, rng) -> (grads, state, values)``.

    Differentiates the trainable params only (the frozen ones enter as constants). The
    objective is the loss plus the weighted auxiliary losses the layers report in their
    state (:mod:`nnjax.core.aux`); ``values`` gains their unweighted ``aux/{kind}``, and
    the state comes back without them. With ``accumulate`` ``M > 1`` the batch is split into ``M`` micro-batches in a
    ``lax.scan``, gradients and metrics averaged, layer state threaded in order; with
    ``replicas`` ``n > 1`` each (micro-)batch runs as :func:`replicated_fn` says.
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

    if replicas > 1:
        once = replicated_fn(forward, objective, replicas)
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


def join_replicas(outputs: Any, rows: int) -> Any:
    """The replicas' outputs ``(n, rows, ...)`` as one batch ``(n * rows, ...)``.

    A :class:`~nnjax.losses.LazyLogits` joins its hidden states and keeps replica 0's
    head (every replica holds the same values; the head's whole gradient then reaches
    replica 0's copy, and the sum over copies is the same).

    Raises:
        ShapeError: an output that is not per row (its axis 1 is not ``rows``).
    """

    def join(path, x):
        if isinstance(x, LazyLogits):
            return LazyLogits(
                join(path, x.hidden),
                x.weight[0],
                transposed=x.transposed,
                softcap=x.softcap,
                scale=None if x.scale is None else x.scale[0],
            )
        if np.ndim(x) < 2 or np.shape(x)[1] != rows:
            raise ShapeError(
                f"trainer(replicas=...): the model's output{jax.tree_util.keystr(path)} "
                f"is not per row: expected (replicas, {rows}, ...) from {rows} rows a "
                f"replica, got {shape_str(np.shape(x))}"
            )
        return jnp.reshape(x, (-1, *np.shape(x)[2:]))

    return jax.tree_util.tree_map_with_path(
        join, outputs, is_leaf=lambda x: isinstance(x, LazyLogits)
    )


def sum_replicas(grads: Any) -> Any:
    """Leaves ``(n, ...)`` summed over axis 0, as one flat buffer per dtype.

    Over devices, XLA sums each buffer of a (combined) all-reduce on its own, and
    XLA:CPU's in-process all-reduce meets the other devices once per buffer: joined,
    the gradients of every leaf take one meeting.
    """
    leaves, treedef = jax.tree.flatten(grads)
    out: list[Any] = list(leaves)
    for dtype in dict.fromkeys(x.dtype for x in leaves):  # in leaf order: one program
        idx = [i for i, x in enumerate(leaves) if x.dtype == dtype]
        flat = jnp.concatenate([leaves[i].reshape(leaves[i].shape[0], -1) for i in idx], axis=1)
        total, start = jnp.sum(flat, axis=0), 0
        for i in idx:
            shape = leaves[i].shape[1:]
            size = math.prod(shape)
            out[i] = total[start : start + size].reshape(shape)
            start += size
    return jax.tree.unflatten(treedef, out)


def replicated_fn(forward: Callable, objective: Callable, n: int) -> Callable:
    """``once`` (see :func:`gradients_fn`) with the batch's rows in ``n`` replicas.

    Replica ``i`` runs rows ``[i * B/n, (i + 1) * B/n)`` through the model with its own
    copy of the trainable params (``jax.vmap`` over a leading replica axis) and the
    dropout key ``split(rng, n)[i]``; the loss and metrics are computed over all rows
    together, the auxiliary statistics averaged over the replicas (each a mean over
    as many rows), and the copies' gradients summed by :func:`sum_replicas`. With the
    batch sharded over ``n`` devices each replica runs on its own device.
    """

    def once(train_p, frozen, template, state, batch, rng):
        if jax.tree.leaves(state):
            raise ArgumentError(
                f"trainer(replicas={n}): the model keeps layer state (BatchNorm statistics, "
                f"...: {sorted(paths.flatten(state))[:3]}); each replica would update a copy "
                "of its own: use replicas=1"
            )
        inputs, targets = batch
        rows = guards.split_leading(inputs, n, "replicas")
        copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), train_p)
        rngs = keys(rng, n)

        def replica(train_p, inputs, rng):
            params = masks.merge(template, train_p, frozen)
            return forward(params, state, inputs, rng, True)

        def loss_of(copies):
            run = jax.vmap(replica, in_axes=(0, 0, None if rngs is None else 0))
            outputs, new_state = run(copies, rows, rngs)
            outputs = join_replicas(outputs, jax.tree.leaves(rows)[0].shape[1])
            aux_total, aux_values = aux.losses(jax.tree.map(lambda x: x.mean(0), new_state))
            loss, values = objective(outputs, targets)
            return loss + aux_total, {**values, **aux_values}

        (_, values), grads = jax.value_and_grad(loss_of, has_aux=True)(copies)
        return sum_replicas(grads), state, values

    return once


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
