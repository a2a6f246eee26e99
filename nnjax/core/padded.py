"""A padded batch: ``{"inputs": x, "lengths": lengths}``, the one form sequences of unequal length take.

``x`` is right-padded along its time axis (token ids ``(B, T)``, or vectors
``(B, T, C)``); sequence ``b`` is ``x[b, :lengths[b]]``. ``Embedding`` maps the
``inputs`` and hands the lengths on; the recurrent layers read them (and an optional
``initial_carry``). A layer that takes an array and gets a padded batch says so
(:func:`nnjax.core.checks.check_rank`).

Example:
    >>> from nnjax.core import padded
    >>> x = {"inputs": jnp.zeros((2, 5), jnp.int32), "lengths": jnp.array([5, 2])}
    >>> ids, rest = padded.split(x)
    >>> ids.shape, sorted(rest)
    ((2, 5), ['lengths'])
    >>> sorted(padded.join(jnp.zeros((2, 5, 8)), rest))
    ['inputs', 'lengths']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.core.checks import check_keys
from nnjax.core.errors import LayerError

__all__ = ["KEYS", "split", "join"]

KEYS = ("inputs", "lengths", "initial_carry")
"""The keys of a padded batch: ``inputs`` required, the others optional."""


def split(x: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(inputs, the other keys)`` of a padded batch; ``(x, None)`` for a plain array.

    Raises:
        LayerError: a dict without ``inputs`` or with a key not in :data:`KEYS`.
    """
    if not isinstance(x, Mapping):
        return x, None
    if "inputs" not in x:
        raise LayerError(
            f'expected an array or a padded batch {{"inputs": x, "lengths": lengths}}, got a '
            f"dict with keys {sorted(x)}"
        )
    check_keys(x, KEYS[:1], KEYS[1:], kind="input key")
    return x["inputs"], {k: v for k, v in x.items() if k != "inputs"}


def join(y: Any, rest: dict[str, Any] | None) -> Any:
    """``y`` as the ``inputs`` of a padded batch with ``rest``'s keys; ``y`` alone if None."""
    return y if rest is None else {"inputs": y, **rest}
