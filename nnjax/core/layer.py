"""The layer contract: the ``Layer`` type, plain callables as layers, calling a child.

A :class:`Layer` is a NamedTuple of two pure functions and a default name::

    params, state = layer.init(key, x)          # x: an array or jax.ShapeDtypeStruct
    y, state = layer.apply(params, state, x, rng=None, train=False)

Combinators call their children through :func:`call_child` (an error inside gains
the child's name in its path) with :func:`checked_init` and :func:`checked_apply`: a
child that breaks the contract (apply returns ``y`` alone, init returns params
alone, apply takes no ``rng``/``train``) gets a :class:`LayerError` that says so.
The checks run while tracing: the jitted step does not pay for them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from nnjax.core.errors import ArgumentError, LayerError

__all__ = [
    "Layer",
    "as_layer",
    "call_child",
    "non_empty",
    "output_shape",
    "Params",
    "State",
    "Initializer",
]

Params = dict[str, Any]
State = dict[str, Any]
Initializer = Callable[..., Any]
"""A ``jax.nn.initializers`` function: ``init(key, shape, dtype) -> array``."""


class Layer(NamedTuple):
    """A layer: ``init(key, x) -> (params, state)`` and ``apply(params, state, x, *, rng, train) -> (y, state)``.

    ``name`` is the default name a combinator gives this child (``dense`` gives
    ``dense_0``, ``dense_1``, ...).
    """

    init: Callable[..., tuple[Params, State]]
    apply: Callable[..., tuple[Any, State]]
    name: str


def as_layer(obj: Layer | Callable[[Any], Any]) -> Layer:
    """A :class:`Layer` as is; a plain callable (``jax.nn.relu``) as a parameter-free layer."""
    if isinstance(obj, Layer):
        return obj
    if not callable(obj):
        raise ArgumentError(f"expected a Layer or a callable, got {type(obj).__name__}: {obj!r}")
    fn = obj

    def init(key, x):
        del key, x
        return {}, {}

    def apply(params, state, x, *, rng=None, train=False):
        del params, rng, train
        return fn(x), state

    return Layer(init, apply, getattr(fn, "__name__", type(fn).__name__).strip("<>"))


def output_shape(layer: Layer, params: Params, state: State, x: Any) -> Any:
    """Shape and dtype (``ShapeDtypeStruct`` pytree) of ``layer.apply``'s output, without FLOPs."""

    def forward(p, s, x):
        return checked_apply(layer, p, s, x)[0]

    return jax.eval_shape(forward, params, state, x)


def call_child(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for the child ``name``: a LayerError from it gains ``name`` in its path.

    Every layer built from other layers calls its children through this, so an error
    deep in a model reads ``blocks/attn/query: expected ...``.

    Example:
        >>> dense = nj.Dense(4)
        >>> params, _ = nj.call_child("head", dense.init, key, jnp.zeros((2, 3)))
        >>> try:
        ...     nj.call_child("head", dense.apply, params, {}, jnp.zeros((2, 5)))
        ... except nj.LayerError as err:
        ...     print(err)
        head: expected x.shape[-1] == 3 (kernel (3, 4)), got x.shape == (2, 5)
    """
    try:
        return fn(*args, **kwargs)
    except LayerError as err:
        raise err.within(name) from None


def non_empty(**trees: Any) -> dict[str, Any]:
    """The named trees that are not empty: how a layer collects its children's params or state.

    Example:
        >>> nj.non_empty(attn={"kernel": 1}, act={}, norm={"scale": 2})
        {'attn': {'kernel': 1}, 'norm': {'scale': 2}}
    """
    return {name: tree for name, tree in trees.items() if tree}


CONTRACT = (
    "a layer's init(key, x) returns (params, state) and its apply(params, state, x, *, "
    "rng=None, train=False) returns (y, state); params and state are dicts ({} when empty)"
)
"""The layer contract in one sentence, as contract errors state it."""


def _what(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _breaks(fn: Callable[..., Any], detail: str) -> LayerError:
    name = getattr(fn, "__qualname__", repr(fn))
    return LayerError(f"{name} breaks the layer contract: {detail}; {CONTRACT}")


def _pair(fn: Callable[..., Any], out: Any, what: str, first: str) -> tuple[Any, Any]:
    """``out`` as ``(first, state)``, or a LayerError naming ``fn`` and the contract."""
    if not (isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise _breaks(fn, f"{what} returned {_what(out)}, expected ({first}, state)")
    if first == "params" and not isinstance(out[0], Mapping):
        raise _breaks(fn, f"init returned params as {_what(out[0])}, expected a dict")
    return out[0], out[1]


def _takes_rng_and_train(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: trust it
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return {"rng", "train"} <= names


def checked_init(layer: Layer, key: jax.Array, x: Any) -> tuple[Params, State]:
    """``layer.init(key, x)``, with a LayerError stating the contract if it is broken."""
    return _pair(layer.init, layer.init(key, x), "init", "params")


def checked_apply(
    layer: Layer,
    params: Params,
    state: State,
    x: Any,
    *,
    rng: jax.Array | None = None,
    train: bool = False,
) -> tuple[Any, State]:
    """``layer.apply(params, state, x, rng=rng, train=train)``, checked like :func:`checked_init`.

    Example:
        >>> def bad_apply(params, state, x, *, rng=None, train=False):
        ...     return x  # forgot the state
        >>> bad = nj.Layer(lambda key, x: ({}, {}), bad_apply, "mine")
        >>> try:
        ...     nj.serial(bad).apply({}, {}, jnp.zeros(2))
        ... except nj.LayerError as err:
        ...     print(str(err)[:77])
        mine_0: bad_apply breaks the layer contract: apply returned an array of shape
    """
    if not _takes_rng_and_train(layer.apply):
        raise _breaks(layer.apply, "apply does not take the keyword arguments rng and train")
    return _pair(layer.apply, layer.apply(params, state, x, rng=rng, train=train), "apply", "y")
