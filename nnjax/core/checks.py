"""The checks with one message format, used by layers, losses, metrics and the trainer.

Messages read ``expected x.shape[-1] == 64 (kernel (64, 10)), got x.shape == (8, 32)``;
combinators prepend the layer's path (``dense_1: expected ...``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.core  # for type checkers: jax's __init__ loads jax.core only under a private name
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import ArgumentError, LayerError, ShapeError

__all__ = [
    "shape_str",
    "check_array",
    "check_rank",
    "check_float",
    "check_keys",
    "get_param",
    "check_int",
    "check_number",
    "check_bool",
    "check_ids",
    "labels_in_range",
]


def shape_str(shape: Iterable[int]) -> str:
    """``(8, 32)``: a shape as error messages print it."""
    return str(tuple(int(d) for d in shape))


def check_array(x: Any) -> None:
    """``x`` is an array, not a dict: a padded batch reaching a layer that takes arrays says so."""
    if isinstance(x, Mapping):
        raise LayerError(
            f"expected an array x, got a dict with keys {sorted(x)}. A padded batch "
            '{"inputs": ids, "lengths": lengths} goes first into Embedding, which hands the '
            "lengths on to a recurrent layer (LSTM, GRU, SimpleRNN, Bidirectional) that reads "
            'them; any other layer takes the array alone (x["inputs"])'
        )


def check_rank(x: Any, min_rank: int, what: str) -> None:
    """``x`` must have at least ``min_rank`` axes (``what`` says which, e.g. ``(..., features)``)."""
    check_array(x)
    if np.ndim(x) < min_rank:
        raise LayerError(
            f"expected x with at least {min_rank} axes {what}, got x.shape == {shape_str(np.shape(x))}"
        )


def check_float(x: Any) -> None:
    check_array(x)
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LayerError(
            f"expected a floating-point x, got x.dtype == {dtype} (x.shape == {shape_str(np.shape(x))})"
        )


def check_keys(
    tree: Mapping[str, Any],
    required: Iterable[str],
    optional: Iterable[str] = (),
    kind: str = "param",
) -> None:
    """``tree`` holds every ``required`` key and nothing beyond ``required + optional``."""
    required = list(required)
    missing = [k for k in required if k not in tree]
    if missing:
        raise LayerError(f"missing {kind}(s) {missing}; got keys {sorted(tree)}")
    extra = sorted(set(tree) - set(required) - set(optional))
    if extra:
        raise LayerError(f"unexpected {kind}(s) {extra}; expected {sorted(required)}")


def get_param(params: Mapping[str, Any], name: str, shape: tuple[int, ...] | None = None) -> Any:
    """``params[name]``, with a LayerError naming the key (and the shape, if given) when it is off."""
    if name not in params:
        raise LayerError(f"missing param {name!r}; got keys {sorted(params)}")
    value = params[name]
    if shape is not None and tuple(np.shape(value)) != tuple(shape):
        raise LayerError(
            f"expected param {name!r} with shape {shape_str(shape)}, got {shape_str(np.shape(value))}"
        )
    return value


def _scalar(value: Any, kinds: Any) -> Any:
    """``value`` as a Python number when it is a Python / NumPy / JAX (concrete, 0-d)
    scalar of one of the NumPy ``kinds`` (``np.integer``, ``np.floating``), else None."""
    if isinstance(value, bool | np.bool_ | jax.core.Tracer):
        return None
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        if np.ndim(value) != 0 or not any(jnp.issubdtype(value.dtype, k) for k in kinds):
            return None
        return value.item()
    if isinstance(value, int) and np.integer in kinds:
        return value
    if isinstance(value, int | float) and np.floating in kinds:
        return value
    return None


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or an ArgumentError naming ``name``: ``batch_size: expected an int >= 1, got 64.0 (float)``.

    Python, NumPy and (0-d, concrete) JAX integers pass alike; floats (even ``64.0``),
    bools and strings do not, so a computed size that went fractional is caught where
    it is given.
    """
    number = _scalar(value, (np.integer,))
    if number is None:
        raise ArgumentError(
            f"{name}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if number < minimum:
        raise ArgumentError(f"{name}: expected an int >= {minimum}, got {number}")
    return int(number)


def check_number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a finite float in the interval, or an ArgumentError naming ``name``:
    ``top_p: expected a finite number in (0, 1], got 1.5``.

    Python, NumPy and (0-d, concrete) JAX ints and floats pass alike; bools, strings,
    NaN and infinities do not.
    """
    number = _scalar(value, (np.integer, np.floating))
    lo = "" if low is None else f"{'(' if open_low else '['}{low}"
    hi = "" if high is None else f"{high}{')' if open_high else ']'}"
    where = f" in {lo}, {hi}" if lo and hi else f" {'>' if open_low else '>='} {low}" if lo else ""
    where += f" {'<' if open_high else '<='} {high}" if hi and not lo else ""
    x = float("nan") if number is None else float(number)
    bad = not math.isfinite(x)
    if low is not None:
        bad = bad or (x <= low if open_low else x < low)
    if high is not None:
        bad = bad or (x >= high if open_high else x > high)
    if bad:
        raise ArgumentError(f"{name}: expected a finite number{where}, got {value!r}")
    return x


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is True or False (NumPy's too), else an ArgumentError naming ``name``."""
    if not isinstance(value, bool | np.bool_):
        raise ArgumentError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_ids(value: Any, name: str, vocab: int) -> tuple[int, ...]:
    """A token id or a sequence of them, each an int in ``[0, vocab)``, as a tuple of ints.

    Raises:
        ArgumentError: naming ``name``: a string, a float, a bool, an id outside the vocabulary.
    """
    many = not (isinstance(value, str) or _scalar(value, (np.integer,)) is not None)
    try:
        items = list(value) if many else [value]
    except TypeError:
        items = [value]
    ids = [_scalar(i, (np.integer,)) for i in items]
    if isinstance(value, str) or any(i is None or not 0 <= i < vocab for i in ids):
        raise ArgumentError(f"{name}: expected token ids in [0, {vocab}), got {value!r}")
    return tuple(int(i) for i in ids)  # type: ignore[arg-type]


def labels_in_range(labels: Any, num_classes: int, counted: Any = None) -> Any:
    """Class labels must lie in ``[0, num_classes)`` where they count, as ``Embedding``'s ids.

    Concrete labels (an eager call) are checked here: a :class:`ShapeError` names the
    first bad label and its index. Traced labels (inside ``jit``, a train step) cannot
    be: the result is then a bool array, True where the label is in range or does not
    count, and the caller makes the other positions NaN, so a bad label shows up as a
    NaN loss (which ``check_finite`` and ``fit`` refuse), never as a wrong class.

    Args:
        labels: integer labels ``(...)``.
        num_classes: ``C``.
        counted: optional bool ``(...)``: only True positions are checked.

    Returns:
        None for concrete labels that pass, else the bool array ``(...)``.
    """
    if isinstance(labels, jax.core.Tracer) or isinstance(counted, jax.core.Tracer):
        ok = (labels >= 0) & (labels < num_classes)
        return ok if counted is None else ok | ~jnp.asarray(counted, bool)
    values = np.asarray(labels)
    bad = (values < 0) | (values >= num_classes)
    if counted is not None:
        bad &= np.asarray(counted, bool)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ShapeError(
            f"expected labels in [0, {num_classes}) (logits.shape[-1] == {num_classes}), "
            f"got {int(values[where])} at labels{list(where)}"
        )
    return None
