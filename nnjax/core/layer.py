"""The layer contract: the ``Layer`` type, plain callables as layers, calling a child.

A :class:`Layer` is a NamedTuple of two pure functions and a default name::

    params, state = layer.init(key, x)          # x: an array or jax.ShapeDtypeStruct
    y, state = layer.apply(params, state, x, rng=None, train=False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from nnjax.core.errors import LayerError

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
        raise TypeError(f"expected a Layer or a callable, got {type(obj).__name__}: {obj!r}")
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
        return layer.apply(p, s, x, rng=None, train=False)[0]

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
