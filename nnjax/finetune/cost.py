"""What a compiled train step spends: memory, FLOPs, matmuls, gradient and optimizer bytes.

Freezing parameters should make a step cheaper, not just possible. ``step_cost``
compiles a step (without running it) and reports XLA's own accounting, so the
saving of a mask can be read off and tested::

    full = nj.finetune.step_cost(tr_full.step, ts_full, batch)
    frozen = nj.finetune.step_cost(tr_head.step, ts_head, batch, trainable=m)
    print(frozen)   # temp bytes, FLOPs, dot_generals, gradient and optimizer bytes
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from nnjax.core.report import human_bytes, param_bytes, table
from nnjax.finetune.masks import trainable_bytes

__all__ = ["memory_table", "StepCost", "step_cost", "count_primitives"]


def _subjaxprs(value: Any):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _subjaxprs(v)


def count_primitives(jaxpr: Any, names: tuple[str, ...] = ("dot_general",)) -> int:
    """Number of equations of the primitives ``names`` in a jaxpr, sub-jaxprs included.

    A ``scan``/``while`` body counts once whatever its trip count: this counts the
    matmuls the program *contains*, e.g. whether weight-gradient matmuls are there.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in names
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                n += count_primitives(sub, names)
    return n


class StepCost(NamedTuple):
    """XLA's accounting of one compiled step (bytes per device), plus the trainable split.

    Attributes:
        temp_bytes: temporaries (activations kept for the backward pass, gradients,
            optimizer intermediates).
        argument_bytes, output_bytes, alias_bytes: inputs, outputs, and outputs that
            reuse a donated input's buffer.
        peak_bytes: XLA's peak estimate (0 where the backend does not give one).
        flops: XLA's FLOP estimate for the step.
        dot_generals: matmul (``dot_general``) and convolution equations in the step's jaxpr.
        param_bytes: all params.
        gradient_bytes: the trainable params (the gradient the step forms, as many
            bytes as the trainable weights).
        opt_state_bytes: the optimizer state's arrays.
        frozen_bytes: the frozen params (quantized kernels count their stored bytes).
    """

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    peak_bytes: int
    flops: float
    dot_generals: int
    param_bytes: int
    gradient_bytes: int
    opt_state_bytes: int
    frozen_bytes: int = 0

    def __str__(self) -> str:
        rows = [
            ("temporaries", human_bytes(self.temp_bytes)),
            ("arguments", human_bytes(self.argument_bytes)),
            ("outputs", human_bytes(self.output_bytes)),
            ("aliased (donated)", human_bytes(self.alias_bytes)),
            ("peak (XLA estimate)", human_bytes(self.peak_bytes)),
            ("params", human_bytes(self.param_bytes)),
            ("frozen params", human_bytes(self.frozen_bytes)),
            ("gradients (trainable)", human_bytes(self.gradient_bytes)),
            ("optimizer state", human_bytes(self.opt_state_bytes)),
            ("FLOPs", f"{self.flops:,.0f}"),
            ("matmul/conv ops (jaxpr)", f"{self.dot_generals}"),
        ]
        return table(None, rows)


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def step_cost(
    step_fn: Callable[..., Any], *args: Any, trainable: Any = None, **kwargs: Any
) -> StepCost:
    """Compile ``step_fn(*args, **kwargs)`` (nothing runs) and report what it spends.

    Args:
        step_fn: a train step, jitted (``trainer(...).step``, its donation kept) or not.
        *args, **kwargs: its arguments, arrays or ``ShapeDtypeStruct``; the first
            argument with ``.params`` and ``.opt_state`` (a ``TrainState``) gives the
            param and optimizer-state bytes.
        trainable: the mask the step trains with (default: all params trainable).

    Returns:
        A :class:`StepCost`; ``print`` it for a table.
    """
    jitted = step_fn if hasattr(step_fn, "lower") else jax.jit(step_fn)
    compiled = jitted.lower(*args, **kwargs).compile()
    mem = compiled.memory_analysis()
    get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
    jaxpr = jax.make_jaxpr(step_fn)(*args, **kwargs)
    ts = next((a for a in args if hasattr(a, "params") and hasattr(a, "opt_state")), None)
    params = getattr(ts, "params", {})
    grads = (
        param_bytes(params)
        if trainable is None or ts is None
        else trainable_bytes(params, trainable)
    )
    return StepCost(
        temp_bytes=get("temp_size_in_bytes"),
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
        peak_bytes=get("peak_memory_in_bytes"),
        flops=_flops(compiled),
        dot_generals=count_primitives(jaxpr, ("dot_general", "conv_general_dilated")),
        param_bytes=param_bytes(params) if ts is not None else 0,
        gradient_bytes=grads if ts is not None else 0,
        opt_state_bytes=param_bytes(getattr(ts, "opt_state", None)),
        frozen_bytes=param_bytes(params) - grads if ts is not None else 0,
    )


def memory_table(costs: Mapping[str, StepCost]) -> str:
    """Steps' memory side by side: frozen and trainable weights, optimizer state, temporaries.

    Weights and optimizer state are the arrays' bytes; temporaries and the peak are
    XLA's ``memory_analysis`` of the compiled step (per device).

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(64), head=nj.Dense(4))
        >>> params, _ = model.init(key, jnp.zeros((8, 32)))
        >>> batch = (jnp.zeros((8, 32)), jnp.zeros((8, 4)))
        >>> costs = {}
        >>> for name, p, m in [("full", params, None), ("head", params, nj.finetune.head_only(params))]:
        ...     tr = nj.trainer(model, nj.losses.mse, optax.adam(1e-3), trainable=m)
        ...     costs[name] = nj.finetune.step_cost(tr.step, tr.init(p), batch, trainable=m)
        >>> print(nj.finetune.memory_table(costs).splitlines()[2])
        frozen weights            0 B   8.2 KiB
    """
    rows = [
        ("frozen weights", "frozen_bytes"),
        ("trainable weights", "gradient_bytes"),
        ("optimizer state", "opt_state_bytes"),
        ("temporaries (XLA)", "temp_bytes"),
        ("peak (XLA estimate)", "peak_bytes"),
    ]
    body = [(label, *(human_bytes(getattr(c, f)) for c in costs.values())) for label, f in rows]
    return table(("", *costs), body, align="l" + "r" * len(costs))
