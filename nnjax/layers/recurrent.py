"""Recurrent layers: SimpleRNN, LSTM, GRU and Bidirectional, each a ``jax.lax.scan`` over time.

Inputs are batch-major with time second to last: ``x (..., T, C)`` (usually
``(B, T, C)``; any number of leading batch axes, or none). The apply signature is
fixed, so sequence lengths and an initial state come in through ``x``:

- ``x``: an array ``(..., T, C)``; every sequence is ``T`` steps long, the
  initial carry is zeros.
- ``{"inputs": x, "lengths": lengths, "initial_carry": carry}``: ``inputs`` is
  required, the other keys optional.

  - ``lengths (...)`` int: sequence ``b`` is valid for ``t < lengths[b]``
    (a right-padded batch). At ``t >= lengths[b]`` its carry does not change
    and its outputs are zeros, so the final carry is the state after its true
    last step. Lengths above ``T`` act as ``T``.
  - ``initial_carry``: the state before step 0, in the layer's carry format:
    SimpleRNN and GRU ``h (..., features)``; LSTM the pair ``(h, c)``, each
    ``(..., features)`` (PyTorch's ``(h0, c0)`` order); Bidirectional a dict
    ``{"forward": carry, "backward": carry}`` (either key optional).

Outputs: ``(..., T, features)`` by default; ``return_sequences=False`` gives the
output at each sequence's last valid step ``(..., features)``; with
``return_state=True``, ``y`` is the pair ``(outputs, final_carry)``.

Weights follow PyTorch's gate order, so copying them is a transpose:
``kernel = weight_ih.T``, ``recurrent_kernel = weight_hh.T``, and
``bias = bias_ih + bias_hh`` (GRU keeps ``bias = bias_ih``, ``recurrent_bias = bias_hh``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core import padded
from nnjax.core.checks import check_keys, get_param, shape_str
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import (
    Initializer,
    Layer,
    call_child,
    checked_apply,
    checked_init,
    non_empty,
)
from nnjax.layers.adapters import KERNEL_KEYS, adapted_matmul, kernel_shape
from nnjax.layers.base import add_bias, compute_dtype

__all__ = ["SimpleRNN", "LSTM", "GRU", "Bidirectional"]


def _parse_input(x: Any) -> tuple[Any, Any, Any, str]:
    """``(inputs, lengths or None, initial_carry or None, name of inputs in messages)``."""
    inputs, rest = padded.split(x)
    if rest is None:
        return x, None, None, "x"
    return inputs, rest.get("lengths"), rest.get("initial_carry"), 'x["inputs"]'


def _check_inputs(inputs: Any, what: str) -> None:
    if np.ndim(inputs) < 2:
        raise LayerError(
            f"expected {what} with at least 2 axes (..., T, C), "
            f"got {what}.shape == {shape_str(np.shape(inputs))}"
        )
    dtype = jnp.result_type(inputs)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LayerError(
            f"expected a floating-point {what}, got {what}.dtype == {dtype} "
            f"({what}.shape == {shape_str(np.shape(inputs))})"
        )


def _check_lengths(lengths: Any, inputs: Any, what: str) -> jax.Array:
    batch = np.shape(inputs)[:-2]
    if tuple(np.shape(lengths)) != tuple(batch):
        raise LayerError(
            f"expected lengths.shape == {shape_str(batch)} ({what}.shape[:-2]), "
            f"got lengths.shape == {shape_str(np.shape(lengths))} "
            f"with {what}.shape == {shape_str(np.shape(inputs))}"
        )
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise LayerError(
            f"expected integer lengths, got lengths.dtype == {jnp.result_type(lengths)} "
            f"(lengths.shape == {shape_str(np.shape(lengths))})"
        )
    return jnp.asarray(lengths)


def _initial_carry(carry: Any, n_parts: int, shape: tuple[int, ...], dtype: Any, what: str):
    """The carry as a tuple of ``n_parts`` arrays of ``shape`` in ``dtype`` (zeros if None)."""
    if carry is None:
        return tuple(jnp.zeros(shape, dtype) for _ in range(n_parts))
    if n_parts == 1:
        if tuple(np.shape(carry)) != shape:
            raise LayerError(
                f"expected initial_carry.shape == {shape_str(shape)} "
                f"({what}.shape[:-2] + (features,)), "
                f"got initial_carry.shape == {shape_str(np.shape(carry))}"
            )
        return (jnp.asarray(carry, dtype),)
    ok = isinstance(carry, tuple | list) and len(carry) == n_parts
    if not ok or any(tuple(np.shape(p)) != shape for p in carry):
        got = (
            f"(h.shape, c.shape) == ({', '.join(shape_str(np.shape(p)) for p in carry)})"
            if ok
            else f"a {type(carry).__name__}"
        )
        raise LayerError(
            f"expected initial_carry (h, c) with h.shape == c.shape == {shape_str(shape)} "
            f"({what}.shape[:-2] + (features,)), got {got}"
        )
    return tuple(jnp.asarray(p, dtype) for p in carry)


def _per_gate(init: Initializer, key: jax.Array, shape: tuple[int, int], gates: int, dtype: Any):
    """``init`` called once per gate on ``shape``, the blocks joined on the last axis."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, shape, dtype) for k in keys], axis=-1)


class _Cell(NamedTuple):
    """What sets a recurrent cell apart: its gate count, carry size and step."""

    gates: int
    n_carry: int
    step: Callable[[dict, tuple, jax.Array], tuple]
    recurrent_bias: bool = False
    forget_bias: float = 0.0


_SHARED = (
    "return_sequences",
    "return_state",
    "use_bias",
    "kernel_init",
    "recurrent_kernel_init",
    "bias_init",
    "unroll",
    "dtype",
    "param_dtype",
    "name",
)


def _shared(args: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments every cell passes through to :func:`_recurrent` unchanged.

    The cells call this with ``locals()``: their signatures stay explicit (docs, type
    hints) while the pass-through is written once.
    """
    return {k: args[k] for k in _SHARED}


def _recurrent(
    features: int,
    cell: _Cell,
    *,
    use_bias: bool,
    kernel_init: Initializer,
    recurrent_kernel_init: Initializer,
    bias_init: Initializer,
    return_sequences: bool,
    return_state: bool,
    unroll: int,
    dtype: Any,
    param_dtype: Any,
    name: str,
) -> Layer:
    """The scan shared by every cell: ``step(p, carry, xp_t) -> carry``, ``carry[0]`` is the output.

    ``xp_t`` is the hoisted input projection ``x_t @ kernel + bias`` for one step
    ``(..., gates * features)``; ``p`` holds the recurrent params in the compute dtype.
    """
    # Over 80 lines only through the closures it returns (init, apply; the longest is 52 lines): a
    # layer's functions close over its constructor's arguments.
    if features < 1:
        raise ArgumentError(f"{name}: features must be >= 1, got {features}")
    gates, n_carry, step, recurrent_bias, forget_bias = cell
    H, G = features, gates * features
    keys = ["kernel", "recurrent_kernel"]
    if use_bias:
        keys += ["bias", *(["recurrent_bias"] if recurrent_bias else [])]

    def init(key, x):
        inputs, _, _, what = _parse_input(x)
        _check_inputs(inputs, what)
        k_kernel, k_rec, k_bias, k_rbias = jax.random.split(key, 4)
        c = np.shape(inputs)[-1]
        params = {
            "kernel": _per_gate(kernel_init, k_kernel, (c, H), gates, param_dtype),
            "recurrent_kernel": _per_gate(recurrent_kernel_init, k_rec, (H, H), gates, param_dtype),
        }
        if use_bias:
            bias = bias_init(k_bias, (G,), param_dtype)
            if forget_bias:
                bias = bias.at[H : 2 * H].add(forget_bias)
            params["bias"] = bias
            if recurrent_bias:
                params["recurrent_bias"] = bias_init(k_rbias, (G,), param_dtype)
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        inputs, lengths, carry0, what = _parse_input(x)
        _check_inputs(inputs, what)
        check_keys(params, keys, KERNEL_KEYS)
        k_shape = kernel_shape(params)
        shape = np.shape(inputs)
        if len(k_shape) != 2 or k_shape[0] != shape[-1]:
            raise LayerError(
                f"expected {what}.shape[-1] == {k_shape[0] if k_shape else '?'} "
                f"(kernel {shape_str(k_shape)}), got {what}.shape == {shape_str(shape)}"
            )
        if k_shape[1] != G:
            raise LayerError(
                f"expected param 'kernel' with shape {shape_str((shape[-1], G))}, "
                f"got {shape_str(k_shape)}"
            )
        batch, T = shape[:-2], shape[-2]
        dtype_ = compute_dtype(inputs, dtype, param_dtype)
        p = {"recurrent_kernel": get_param(params, "recurrent_kernel", (H, G)).astype(dtype_)}
        if use_bias and recurrent_bias:
            p["recurrent_bias"] = get_param(params, "recurrent_bias", (G,)).astype(dtype_)
        carry = _initial_carry(carry0, n_carry, (*batch, H), dtype_, what)

        # The input projection of every step in one matmul; only h @ recurrent_kernel
        # stays inside the scan.
        xp = adapted_matmul(params, jnp.asarray(inputs, dtype_), dtype_)  # (..., T, G)
        if use_bias:
            xp = add_bias(xp, get_param(params, "bias", (G,)))
        xs = jnp.moveaxis(xp, -2, 0)  # (T, ..., G)
        masks = None
        if lengths is not None:
            lengths = _check_lengths(lengths, inputs, what)
            t = jnp.arange(T).reshape((T,) + (1,) * len(batch))
            masks = (t < lengths[None])[..., None]  # (T, ..., 1)

        def body(carry, xs_t):
            xp_t, m = xs_t
            new = step(p, carry, xp_t)
            out = new[0]
            if m is not None:
                new = tuple(jnp.where(m, n, c) for n, c in zip(new, carry, strict=True))
                out = jnp.where(m, out, jnp.zeros_like(out))
            return new, (out if return_sequences else None)

        carry, ys = jax.lax.scan(body, carry, (xs, masks), length=T, unroll=unroll)
        y = carry[0] if ys is None else jnp.moveaxis(ys, 0, -2)  # None: not return_sequences
        if return_state:
            y = (y, carry[0] if n_carry == 1 else carry)
        return y, state

    return Layer(init, apply, name)


def SimpleRNN(
    features: int,
    *,
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
    return_sequences: bool = True,
    return_state: bool = False,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    unroll: int = 1,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "rnn",
) -> Layer:
    """An Elman RNN: ``h_t = activation(x_t @ kernel + h_{t-1} @ recurrent_kernel + bias)``.

    Equal to ``torch.nn.RNN(nonlinearity="tanh", batch_first=True)`` with
    ``bias = bias_ih + bias_hh``. Inputs, lengths, initial carry and outputs as in
    the module docstring; the carry is ``h (..., features)``.

    Args:
        features: hidden size ``H``.
        activation: the cell nonlinearity.
        return_sequences: output every step ``(..., T, H)``; else the last valid step ``(..., H)``.
        return_state: ``y`` is ``(outputs, final h)``.
        use_bias: add a bias.
        kernel_init, recurrent_kernel_init, bias_init: ``jax.nn.initializers`` functions.
        unroll: steps per scan iteration (``jax.lax.scan``'s ``unroll``).
        dtype: computation (and carry) dtype; ``None`` keeps a float input's dtype.
        param_dtype: dtype of the params.

    Params:
        kernel: ``(C, H)``.
        recurrent_kernel: ``(H, H)``.
        bias: ``(H,)`` if ``use_bias``.

    Raises:
        LayerError: input rank < 2, ``x.shape[-1]`` off the kernel, lengths or
            initial carry of the wrong shape.

    Example:
        >>> params, _ = nj.SimpleRNN(8).init(key, jnp.zeros((2, 5, 3)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (8,), 'kernel': (3, 8), 'recurrent_kernel': (8, 8)}
    """

    def step(p, carry, xp):
        (h,) = carry
        return (activation(xp + h @ p["recurrent_kernel"]),)

    return _recurrent(features, _Cell(1, 1, step), **_shared(locals()))


def LSTM(
    features: int,
    *,
    return_sequences: bool = True,
    return_state: bool = False,
    use_bias: bool = True,
    forget_bias: float = 1.0,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    unroll: int = 1,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "lstm",
) -> Layer:
    """A long short-term memory layer, gates fused in one matrix in PyTorch's order ``i, f, g, o``.

    ``[i, f, g, o] = x_t @ kernel + h @ recurrent_kernel + bias``;
    ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``, ``h' = sigmoid(o) * tanh(c')``.
    Equal to ``torch.nn.LSTM(batch_first=True)`` with ``bias = bias_ih + bias_hh``.
    The carry is the pair ``(h, c)``, each ``(..., features)``.

    Args:
        features: hidden size ``H``.
        forget_bias: added to the forget gate's bias at init (1.0, as Jozefowicz et
            al. 2015 and Keras' ``unit_forget_bias``; 0.0 for none).
        kernel_init, recurrent_kernel_init: called once per gate, on ``(C, H)`` and
            ``(H, H)``, so each gate's recurrent block is orthogonal.
        Others: as :func:`SimpleRNN`.

    Params:
        kernel: ``(C, 4H)``.
        recurrent_kernel: ``(H, 4H)``.
        bias: ``(4H,)`` if ``use_bias``.

    Example:
        >>> params, _ = nj.LSTM(8).init(key, jnp.zeros((2, 5, 3)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (32,), 'kernel': (3, 32), 'recurrent_kernel': (8, 32)}
    """

    def step(p, carry, xp):
        h, c = carry
        i, f, g, o = jnp.split(xp + h @ p["recurrent_kernel"], 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    return _recurrent(features, _Cell(4, 2, step, forget_bias=forget_bias), **_shared(locals()))


def GRU(
    features: int,
    *,
    return_sequences: bool = True,
    return_state: bool = False,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    unroll: int = 1,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "gru",
) -> Layer:
    """A gated recurrent unit in PyTorch's formulation, gates in the order ``r, z, n``.

    With ``[a_r, a_z, a_n] = x_t @ kernel + bias`` and
    ``[b_r, b_z, b_n] = h @ recurrent_kernel + recurrent_bias``:
    ``r = sigmoid(a_r + b_r)``, ``z = sigmoid(a_z + b_z)``,
    ``n = tanh(a_n + r * b_n)``, ``h' = (1 - z) * n + z * h``.
    Equal to ``torch.nn.GRU(batch_first=True)`` with ``bias = bias_ih``,
    ``recurrent_bias = bias_hh``. The carry is ``h (..., features)``.

    Args:
        features: hidden size ``H``.
        Others: as :func:`LSTM` (no ``forget_bias``).

    Params:
        kernel: ``(C, 3H)``.
        recurrent_kernel: ``(H, 3H)``.
        bias: ``(3H,)`` if ``use_bias``.
        recurrent_bias: ``(3H,)`` if ``use_bias``.

    Example:
        >>> params, _ = nj.GRU(8).init(key, jnp.zeros((2, 5, 3)))
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (24,), 'kernel': (3, 24), 'recurrent_bias': (24,), 'recurrent_kernel': (8, 24)}
    """

    def step(p, carry, xp):
        (h,) = carry
        hp = h @ p["recurrent_kernel"]
        if "recurrent_bias" in p:
            hp = hp + jax.lax.broadcast_to_rank(p["recurrent_bias"], hp.ndim)
        a_r, a_z, a_n = jnp.split(xp, 3, axis=-1)
        b_r, b_z, b_n = jnp.split(hp, 3, axis=-1)
        r = jax.nn.sigmoid(a_r + b_r)
        z = jax.nn.sigmoid(a_z + b_z)
        n = jnp.tanh(a_n + r * b_n)
        return ((1 - z) * n + z * h,)

    return _recurrent(features, _Cell(3, 1, step, recurrent_bias=True), **_shared(locals()))


_MERGES: dict[str | None, Callable[[jax.Array, jax.Array], Any]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "mean": lambda a, b: (a + b) / 2,
    None: lambda a, b: (a, b),
}


def _reverse_in_length(y: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Reverse ``y (..., T, F)`` in time, within each sequence's valid prefix ``t < lengths``."""
    if lengths is None:
        return jnp.flip(y, axis=-2)
    T = np.shape(y)[-2]
    n = jnp.clip(lengths, 0, T)[..., None]  # (..., 1)
    t = jax.lax.broadcast_to_rank(jnp.arange(T), n.ndim)
    idx = jnp.where(t < n, n - 1 - t, t)  # (..., T); an involution
    return jnp.take_along_axis(y, idx[..., None], axis=-2)


def Bidirectional(
    forward_layer: Layer,
    backward_layer: Layer | None = None,
    *,
    merge: str | None = "concat",
    name: str = "bidirectional",
) -> Layer:
    """Run one recurrent layer forward in time and another on each sequence reversed, and merge.

    The backward layer sees each sequence reversed within its own length (for a
    padded batch only the valid prefix is reversed, so padding stays at the end)
    and its outputs are reversed back, so both outputs line up in time. Both
    layers must be configured alike (``return_sequences``, ``return_state``);
    with ``return_sequences=False`` the backward output is its state after
    reading the whole sequence backwards (its output at ``t = 0``), as in
    ``torch.nn.LSTM(bidirectional=True)``'s ``h_n``.

    Args:
        forward_layer: a recurrent layer (SimpleRNN, LSTM, GRU).
        backward_layer: the layer for the reversed direction; ``None`` uses a
            second copy of ``forward_layer`` (its own params).
        merge: ``"concat"`` (on features), ``"sum"``, ``"mul"``, ``"mean"``, or
            ``None`` for the pair ``(forward, backward)``.

    Input as in the module docstring; ``initial_carry`` is
    ``{"forward": carry, "backward": carry}`` (either key optional). With
    ``return_state`` the final carry has the same form.

    Params:
        forward: the forward layer's params.
        backward: the backward layer's params.

    Example:
        >>> params, _ = nj.Bidirectional(nj.GRU(8)).init(key, jnp.zeros((2, 5, 3)))
        >>> jax.tree.map(jnp.shape, params)["backward"]
        {'bias': (24,), 'kernel': (3, 24), 'recurrent_bias': (24,), 'recurrent_kernel': (8, 24)}
    """
    if merge not in _MERGES:
        raise ArgumentError(f"Bidirectional: merge must be one of {list(_MERGES)}, got {merge!r}")
    backward_layer = forward_layer if backward_layer is None else backward_layer
    children = {"forward": forward_layer, "backward": backward_layer}

    def init(key, x):
        keys = dict(zip(children, jax.random.split(key), strict=True))
        out = {k: call_child(k, checked_init, child, keys[k], x) for k, child in children.items()}
        return {k: p for k, (p, _) in out.items()}, non_empty(**{k: s for k, (_, s) in out.items()})

    def apply(params, state, x, *, rng=None, train=False):
        check_keys(params, list(children))
        check_keys(state, [], list(children), kind="state")
        inputs, lengths, carry0, what = _parse_input(x)
        _check_inputs(inputs, what)
        if lengths is not None:
            lengths = _check_lengths(lengths, inputs, what)
        if carry0 is not None:
            if not isinstance(carry0, Mapping):
                raise LayerError(
                    "expected initial_carry as a dict {'forward': ..., 'backward': ...}, "
                    f"got a {type(carry0).__name__}"
                )
            check_keys(carry0, [], list(children), kind="initial_carry key")
        rngs = dict(
            zip(children, [None, None] if rng is None else jax.random.split(rng), strict=True)
        )
        seqs = {"forward": inputs, "backward": _reverse_in_length(inputs, lengths)}
        outs, carries, states = {}, {}, {}
        for k, child in children.items():
            xk: Any = seqs[k]
            if lengths is not None or (carry0 is not None and k in carry0):
                xk = {"inputs": xk}
                if lengths is not None:
                    xk["lengths"] = lengths
                if carry0 is not None and k in carry0:
                    xk["initial_carry"] = carry0[k]
            y, states[k] = call_child(
                k, checked_apply, child, params[k], state.get(k, {}), xk, rng=rngs[k], train=train
            )
            if isinstance(y, tuple):
                y, carries[k] = y
            outs[k] = y
        if len(carries) == 1:
            raise LayerError(
                "expected both directions to return their state (return_state) or neither, "
                f"got only {list(carries)}"
            )
        f, b = outs["forward"], outs["backward"]
        if np.shape(f)[:-1] != np.shape(b)[:-1]:
            raise LayerError(
                "expected both directions to return alike (return_sequences), "
                f"got forward {shape_str(np.shape(f))} and backward {shape_str(np.shape(b))}"
            )
        if np.ndim(b) == np.ndim(inputs):  # a sequence: put it back in forward time
            b = _reverse_in_length(b, lengths)
        y = _MERGES[merge](f, b)
        if carries:
            y = (y, carries)
        return y, non_empty(**states)

    return Layer(init, apply, name)
