"""The errors nnjax raises, by kind: catch ``nj.NNJaxError`` for all, or one kind.

Every kind but :class:`TrainingDiverged` and :class:`BuildError` is also a ``ValueError`` (and
:class:`ArgumentError` a ``TypeError``), so code that catches those keeps working.
Each message names what was wrong: the layer path, the argument, the file.

=======================  ===================================================================
``LayerError``           a layer's input, params or state (message starts with the layer path)
``ShapeError``           targets, labels or batch arrays of the wrong shape, dtype or range
``DataError``            data that cannot be read or batched (a corrupt file, bad lengths)
``ArgumentError``        a bad argument: a float for an int, a size <= 0, counts that do not divide
``GlobError``            a path glob that matches nothing, or groups that overlap
``MaskError``            a trainable mask that does not fit the params or selects nothing
``OptimizerStateError``  an optimizer state built by another optimizer or over other params
``CheckpointError``      a checkpoint that is missing, corrupt or does not fit
``ShardingError``        a sharding that does not fit the mesh or the array
``TrainingDiverged``     a non-finite loss or train state (a ``FloatingPointError``)
``BuildError``           a native kernel that cannot be built here (a ``RuntimeError``)
=======================  ===================================================================
"""

from __future__ import annotations

__all__ = [
    "NNJaxError",
    "LayerError",
    "ShapeError",
    "ArgumentError",
    "GlobError",
    "MaskError",
    "OptimizerStateError",
    "CheckpointError",
    "DataError",
    "TrainingDiverged",
    "ShardingError",
    "BuildError",
]


class NNJaxError(Exception):
    """Base class of every error nnjax raises on purpose."""


class LayerError(NNJaxError, ValueError):
    """Bad input, params or state for a layer, raised at trace time.

    ``path`` is the layer's position in the model (``("blocks", "3", "attn")``);
    combinators prepend their child's name as the error travels up, so the
    message reads ``blocks/3/attn: expected ..., got ...``.
    """

    def __init__(self, detail: str, path: tuple[str, ...] = ()):
        self.detail = detail
        self.path = tuple(path)
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{'/'.join(self.path)}: {self.detail}" if self.path else self.detail

    def within(self, name: str) -> LayerError:
        """The same error, one level further from the root (``name`` prepended)."""
        return type(self)(self.detail, (name, *self.path))

    def __reduce__(self):
        return type(self), (self.detail, self.path)


class GlobError(NNJaxError, ValueError):
    """A path glob (mask, rule, group) that matches no leaf, or groups that overlap."""


class ShapeError(NNJaxError, ValueError):
    """Targets, labels or batch arrays of the wrong shape, dtype or range for a loss, a
    metric or the trainer (``expected labels.shape == logits.shape[:-1] == (4,), ...``)."""


class ArgumentError(NNJaxError, ValueError, TypeError):
    """A bad argument to a public function, named in the message: a float where an int
    is expected, a size that is zero or negative, step counts that do not divide."""


class MaskError(NNJaxError, ValueError):
    """A trainable mask that does not fit the params (a path without an entry, a leaf
    that is not a bool, copies that do not fit the stacked axes) or selects nothing."""


class OptimizerStateError(NNJaxError, ValueError):
    """An optimizer state that is not this trainer's: another optimizer's, or one built
    over other trainable params (another mask). The message starts with ``opt_state:``."""


class CheckpointError(NNJaxError, ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the target structure."""


class DataError(NNJaxError, ValueError):
    """Data that cannot be read or batched: a corrupt file, mismatched array lengths."""


class TrainingDiverged(NNJaxError, FloatingPointError):  # noqa: N818 (the name users know)
    """A step's loss (or the trainer's ``finite`` metric) was not finite.

    Attributes:
        step: the first bad step, counted from 1 (``step_000005`` is the state after step 5).
        checkpoint: the path of the last good checkpoint (left intact), or None.
    """

    def __init__(self, step: int, checkpoint: str | None, detail: str = "non-finite loss"):
        self.step, self.checkpoint, self.detail = step, checkpoint, detail
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"training diverged: {detail} at step {step}; {where}")

    def __reduce__(self):
        return type(self), (self.step, self.checkpoint, self.detail)


class ShardingError(NNJaxError, ValueError):
    """A sharding that does not fit: an axis not divisible by its mesh axes, an unknown
    mesh axis, a spec longer than the array's rank, or axis sizes that miss the devices."""


class BuildError(NNJaxError, RuntimeError):
    """A native kernel (``nnjax.kernels``) that cannot be built: no C++ compiler, or the
    compiler failed (its output is in the message). The layers catch it and compute with
    XLA's operations instead."""
