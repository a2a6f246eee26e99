"""Logits that are never materialised: a language model's loss over vocabulary chunks.

A language model's head turns hidden states ``(B, T, d)`` into logits ``(B, T, V)``;
at ``V = 151,936`` and ``T = 2,048`` that is 1.2 GB of float32, and its gradient as much
again. :class:`LazyLogits` holds the head's input and weight instead; the losses
(:func:`nnjax.losses.softmax_cross_entropy`) and :func:`token_log_probs` take it and
loop over vocabulary chunks (``lax.fori_loop``, a custom VJP), holding one ``(N,
chunk)`` block of logits at a time, forward and backward. Anything else that reads it
(``jnp.argmax(outputs, -1)``, ``outputs[:, -1]``, ``np.asarray``) gets the full logits.

Example:
    >>> h = jax.random.normal(key, (2, 5, 8))
    >>> w = jax.random.normal(key, (8, 50))
    >>> lazy = nj.losses.LazyLogits(h, w)
    >>> labels = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, -100]])
    >>> a = nj.losses.softmax_cross_entropy(lazy, labels, ignore_index=-100)
    >>> b = nj.losses.softmax_cross_entropy(h @ w, labels, ignore_index=-100)
    >>> bool(jnp.allclose(a, b, atol=1e-5))
    True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import shape_str
from nnjax.core.errors import ArgumentError, ShapeError
from nnjax.layers.base import transposed_copy

__all__ = [
    "LazyLogits",
    "chunked_token_nll",
    "token_log_probs",
    "reshape_logits",
    "take_positions",
    "DEFAULT_CHUNK_ELEMENTS",
]

# One chunk of logits, or of the head's weight, holds about this many float32 elements
# (8 MiB): smaller chunks lowered the peak of a Qwen2-0.5B-shaped DPO step and did not
# slow it (docs/benchmarks.md, "Preference tuning").
DEFAULT_CHUNK_ELEMENTS = 1 << 21


@jax.tree_util.register_pytree_node_class
class LazyLogits:
    """Logits ``hidden @ weight`` (soft-capped), computed only where read.

    Args:
        hidden: ``(..., d)`` the head's input (after the final norm).
        weight: ``(d, V)`` a head kernel, or ``(V, d)`` a tied token table with
            ``transposed=True``.
        transposed: ``weight`` is ``(V, d)``.
        softcap: logits are ``softcap * tanh(z / softcap)`` (Gemma 2); ``None``: plain.
        scale: ``(V,)`` with an int8 ``weight`` (a quantized table's per-row or head's
            per-column scales): the head is ``weight * scale`` per vocabulary entry,
            dequantized one chunk at a time; ``None``: ``weight`` is float.

    ``shape`` is ``(..., V)``; ``dtype`` the computation's. A pytree (its arrays are the
    leaves), so it passes through ``jit`` and ``jax.tree.map``.
    """

    def __init__(
        self,
        hidden: Any,
        weight: Any,
        *,
        transposed: bool = False,
        softcap: float | None = None,
        scale: Any = None,
    ) -> None:
        self.hidden = hidden
        self.weight = weight
        self.transposed = transposed
        self.softcap = softcap
        self.scale = scale

    def tree_flatten(self):
        return (self.hidden, self.weight, self.scale), (self.transposed, self.softcap)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children[:2], transposed=aux[0], softcap=aux[1], scale=children[2])

    @property
    def vocab_size(self) -> int:
        return int(np.shape(self.weight)[0 if self.transposed else 1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*np.shape(self.hidden)[:-1], self.vocab_size)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> Any:
        return jnp.result_type(self.hidden, self.weight if self.scale is None else self.scale)

    def materialize(self) -> jax.Array:
        """The full logits ``(..., V)``."""
        w = self.weight.T if self.transposed else self.weight
        z = jnp.asarray(self.hidden) @ jnp.asarray(w, self.dtype)
        if self.scale is not None:
            z = z * jax.lax.broadcast_to_rank(jnp.asarray(self.scale, self.dtype), z.ndim)
        if self.softcap is not None:
            z = self.softcap * jnp.tanh(z / self.softcap)
        return z

    def __jax_array__(self) -> jax.Array:
        return self.materialize()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.materialize(), dtype)

    def __getitem__(self, index: Any) -> jax.Array:
        return self.materialize()[index]

    def __repr__(self) -> str:
        return f"LazyLogits(shape={shape_str(self.shape)}, dtype={self.dtype})"


def reshape_logits(logits: Any, lead: tuple[int, ...]) -> Any:
    """Logits ``(..., V)`` with their leading axes reshaped to ``lead``: ``(*lead, V)``.

    An array is reshaped; :class:`LazyLogits` stay lazy (their hidden states are
    reshaped), so splitting a batch's rows into pairs never materialises the logits.

    Example:
        >>> lazy = nj.losses.LazyLogits(jnp.zeros((4, 3, 8)), jnp.zeros((8, 50)))
        >>> nj.losses.reshape_logits(lazy, (2, 2, 3)).shape
        (2, 2, 3, 50)
    """
    if isinstance(logits, LazyLogits):
        hidden = jnp.reshape(logits.hidden, (*lead, np.shape(logits.hidden)[-1]))
        return LazyLogits(
            hidden,
            logits.weight,
            transposed=logits.transposed,
            softcap=logits.softcap,
            scale=logits.scale,
        )
    return jnp.reshape(logits, (*lead, np.shape(logits)[-1]))


def take_positions(logits: Any, index: Any) -> Any:
    """The logits at ``index`` along the position axis: ``(..., T, V)`` -> ``(..., R, V)``.

    ``index`` is int ``(..., R)`` with the leading axes of ``logits``; an entry ``-1``
    (padding) reads position 0, so a caller masks it. :class:`LazyLogits` stay lazy
    (their hidden states are gathered), so a loss over a few positions of a long
    sequence (a preference pair's response tokens) computes the head only there.

    Example:
        >>> lazy = nj.losses.LazyLogits(jnp.arange(12.0).reshape(1, 3, 4), jnp.eye(4))
        >>> nj.losses.take_positions(lazy, jnp.array([[2, 0]])).materialize()[0, :, 0].tolist()
        [8.0, 0.0]
    """
    safe = jnp.maximum(jnp.asarray(index), 0)[..., None]
    if isinstance(logits, LazyLogits):
        return LazyLogits(
            jnp.take_along_axis(logits.hidden, safe, axis=-2),
            logits.weight,
            transposed=logits.transposed,
            softcap=logits.softcap,
            scale=logits.scale,
        )
    return jnp.take_along_axis(jnp.asarray(logits), safe, axis=-2)


def _chunk_size(n: int, vocab: int, chunk_size: int | None, d: int = 1) -> int:
    if chunk_size is None:  # a chunk holds (n, c) logits and the (d, c) slice of the head
        chunk_size = max(128, DEFAULT_CHUNK_ELEMENTS // max(n, d, 1) // 128 * 128)
    if chunk_size < 1:
        raise ArgumentError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(chunk_size, vocab)


def _chunk(w, i, c, vocab, transposed, scale=None):
    """Columns ``[start, start + c)`` of the head (``start`` clamped so the last chunk fits)
    as ``(d, c)`` (dequantized by ``scale``'s chunk when given), ``start``, and which of
    them are new (not in an earlier chunk)."""
    start = jnp.minimum(i * c, vocab - c)
    if transposed:
        wc = jax.lax.dynamic_slice_in_dim(w, start, c, axis=0).T
    else:
        wc = jax.lax.dynamic_slice_in_dim(w, start, c, axis=1)
    if scale is not None:  # int8: one chunk in float at a time, never the whole head
        wc = wc.astype(scale.dtype) * jax.lax.dynamic_slice_in_dim(scale, start, c)[None, :]
    cols = (start + jnp.arange(c))[None, :]
    return wc, cols, cols >= i * c  # (1, c) each


def _logits(h, wc, softcap):
    z = jax.lax.dot_general(
        h, wc.astype(h.dtype), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


def _forward(h, w, scale, labels, c, transposed, smoothing, softcap):
    vocab = w.shape[0 if transposed else 1]
    n = h.shape[0]

    def body(i, carry):
        m, s, zy, zsum = carry
        wc, cols, new = _chunk(w, i, c, vocab, transposed, scale)
        z = _logits(h, wc, softcap)
        zm = jnp.where(new, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(zm, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zm - m_new[:, None]), axis=-1)
        hit = new & (cols == labels[:, None])
        zy = zy + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        if smoothing:
            zsum = zsum + jnp.sum(jnp.where(new, z, 0.0), axis=-1)
        return m_new, s, zy, zsum

    zeros = jnp.zeros((n,), jnp.float32)
    init = (jnp.full((n,), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    m, s, zy, zsum = jax.lax.fori_loop(0, -(-vocab // c), body, init)
    lse = m + jnp.log(s)
    nll = lse - (1.0 - smoothing) * zy - (smoothing / vocab) * zsum
    return nll, lse


def _dequantized(w, scale, transposed):
    """The head as float: ``w`` itself, or an int8 ``w`` times its per-entry ``scale``
    (only inside a gather or a reduction, which XLA fuses: no float copy of ``w``)."""
    if scale is None:
        return w
    return w.astype(scale.dtype) * (scale[:, None] if transposed else scale[None, :])


def _forward_and_dh(h, w, scale, labels, c, transposed, smoothing):
    """:func:`_forward` that also returns ``d nll / d h`` per row ``(N, d)`` float32 (for
    a unit cotangent), accumulated chunk by chunk with the same online rescaling as the
    softmax's normaliser: the backward pass then scales it instead of recomputing the
    logits (one ``(N, d) x (d, V)`` product fewer). No soft cap, no weight gradient."""
    vocab = w.shape[0 if transposed else 1]
    n, d = h.shape

    def body(i, carry):
        m, s, zy, zsum, acc = carry
        wc, cols, new = _chunk(w, i, c, vocab, transposed, scale)
        z = _logits(h, wc, None)
        zm = jnp.where(new, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(zm, axis=-1))
        e = jnp.exp(zm - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        s = s * rescale + jnp.sum(e, axis=-1)
        acc = acc * rescale[:, None] + jax.lax.dot_general(
            e.astype(h.dtype), wc.astype(h.dtype), (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        zy = zy + jnp.sum(jnp.where(new & (cols == labels[:, None]), z, 0.0), axis=-1)
        if smoothing:
            zsum = zsum + jnp.sum(jnp.where(new, z, 0.0), axis=-1)
        return m_new, s, zy, zsum, acc

    zeros = jnp.zeros((n,), jnp.float32)
    init = (jnp.full((n,), -jnp.inf, jnp.float32), zeros, zeros, zeros, jnp.zeros((n, d)))
    m, s, zy, zsum, acc = jax.lax.fori_loop(0, -(-vocab // c), body, init)
    lse = m + jnp.log(s)
    nll = lse - (1.0 - smoothing) * zy - (smoothing / vocab) * zsum
    if transposed:
        w_y = jnp.take(w, labels, axis=0)
        w_y = w_y if scale is None else w_y.astype(scale.dtype) * scale[labels][:, None]
    else:
        w_y = jnp.take(w, labels, axis=1)
        w_y = (w_y if scale is None else w_y.astype(scale.dtype) * scale[labels][None, :]).T
    dh = acc / s[:, None] - (1.0 - smoothing) * w_y.astype(jnp.float32)
    if smoothing:
        w_sum = jnp.sum(_dequantized(w, scale, transposed), axis=1 - int(transposed))
        w_sum = w_sum.astype(jnp.float32)
        dh = dh - (smoothing / vocab) * w_sum[None, :]
    return nll, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _nll(h, w, scale, labels, c, transposed, smoothing, softcap):
    return _forward(h, w, scale, labels, c, transposed, smoothing, softcap)[0]


def _nll_fwd(h, w, scale, labels, c, transposed, smoothing, softcap):
    # symbolic_zeros: h, w, labels arrive as CustomVJPPrimal; a frozen head (LoRA) skips
    # its weight gradient, a whole (N, d) x (d, V) product.
    need_dw = w.perturbed
    if scale is not None and (scale.perturbed or need_dw):
        raise ArgumentError(
            "LazyLogits: an int8 head (weight with scale) is frozen: no gradient with "
            "respect to its weight or scale is computed; differentiate the hidden states "
            "only, or dequantize the head first (nj.finetune.dequantize)"
        )
    h, w, labels = h.value, w.value, labels.value
    scale = None if scale is None else scale.value
    if not need_dw and softcap is None:  # d nll / d h in the forward loop
        nll, dh = _forward_and_dh(h, w, scale, labels, c, transposed, smoothing)
        return nll, (h, w, scale, labels, None, None, dh)
    nll, lse = _forward(h, w, scale, labels, c, transposed, smoothing, softcap)
    return nll, (h, w, scale, labels, lse, () if need_dw else None, None)


def _nll_bwd(c, transposed, smoothing, softcap, res, g):
    h, w, scale, labels, lse, need_dw, dh_unit = res
    vocab = w.shape[0 if transposed else 1]
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    g = g.astype(jnp.float32)
    if dh_unit is not None:
        return (g[:, None] * dh_unit).astype(h.dtype), None, None, None

    def body(i, carry):
        dh, dw = carry
        wc, cols, new = _chunk(w, i, c, vocab, transposed, scale)
        z = _logits(h, wc, softcap)
        p = jnp.exp(z - lse[:, None])
        target = (1.0 - smoothing) * (cols == labels[:, None]) + smoothing / vocab
        dz = jnp.where(new, (p - target) * g[:, None], 0.0)
        if softcap is not None:
            dz = dz * (1.0 - jnp.square(z / softcap))
        dzh = dz.astype(h.dtype)
        dh = dh + jax.lax.dot_general(
            dzh, wc.astype(h.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        if dw is not None:
            start = jnp.minimum(i * c, vocab - c)
            if transposed:  # (c, d)
                part = jax.lax.dot_general(
                    transposed_copy(dzh),
                    h,
                    (((1,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )
                old = jax.lax.dynamic_slice_in_dim(dw, start, c, axis=0)
                dw = jax.lax.dynamic_update_slice_in_dim(dw, old + part, start, axis=0)
            else:  # (d, c)
                part = jax.lax.dot_general(
                    ht, dzh, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
                )
                old = jax.lax.dynamic_slice_in_dim(dw, start, c, axis=1)
                dw = jax.lax.dynamic_update_slice_in_dim(dw, old + part, start, axis=1)
        return dh, dw

    ht = transposed_copy(h)  # (d, N): see nnjax.layers.base.transposed_copy
    dh0 = jnp.zeros(h.shape, jnp.float32)
    dw0 = None if need_dw is None else jnp.zeros(w.shape, jnp.float32)
    dh, dw = jax.lax.fori_loop(0, -(-vocab // c), body, (dh0, dw0))
    return dh.astype(h.dtype), None if dw is None else dw.astype(w.dtype), None, None


_nll.defvjp(_nll_fwd, _nll_bwd, symbolic_zeros=True)


def chunked_token_nll(
    logits: LazyLogits,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> jax.Array:
    """Per-position cross-entropy ``(...)`` of lazy logits ``(..., V)``, one vocabulary
    chunk at a time (forward and gradient never hold more than ``(N, chunk)`` logits).

    Args:
        logits: a :class:`LazyLogits`.
        labels: ``(...)`` integer ids in ``[0, V)`` (clean them of ``ignore_index`` first:
            a label outside the range gives a finite, meaningless value).
        label_smoothing: ``eps``: the target is ``(1 - eps) * onehot + eps / V``.
        chunk_size: vocabulary columns per chunk; ``None``: about
            ``DEFAULT_CHUNK_ELEMENTS / max(N, d)`` (a multiple of 128: a chunk's logits
            ``(N, c)`` and its slice of the head ``(d, c)`` both stay near that size).

    Returns:
        float32 ``(...)``: ``logsumexp(z) - (1 - eps) z[label] - eps mean(z)``.
    """
    if not isinstance(logits, LazyLogits):
        raise ArgumentError(f"chunked_token_nll takes LazyLogits, got {type(logits).__name__}")
    h = jnp.asarray(logits.hidden)
    if np.shape(labels) != np.shape(h)[:-1]:
        raise ShapeError(
            f"expected labels.shape == logits.shape[:-1] == {shape_str(np.shape(h)[:-1])}, "
            f"got labels.shape == {shape_str(np.shape(labels))}"
        )
    lead = np.shape(h)[:-1]
    h2 = jnp.reshape(h, (-1, np.shape(h)[-1]))
    c = _chunk_size(h2.shape[0], logits.vocab_size, chunk_size, h2.shape[1])
    nll: Any = _nll(
        h2,
        jnp.asarray(logits.weight),
        None if logits.scale is None else jnp.asarray(logits.scale),
        jnp.reshape(jnp.asarray(labels, jnp.int32), (-1,)),
        c,
        logits.transposed,
        float(label_smoothing),
        None if logits.softcap is None else float(logits.softcap),
    )
    return jnp.reshape(nll, lead)


def token_log_probs(logits: Any, labels: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """``log softmax(logits)[label]`` at every position ``(...)``, float32 (or wider).

    ``logits`` is ``(..., V)`` (an array, or :class:`LazyLogits`, then computed chunk by
    chunk); ``labels`` ``(...)`` ids in ``[0, V)``. Differentiable; the building block of
    sequence log-probabilities (preference losses).
    """
    if isinstance(logits, LazyLogits):
        return -chunked_token_nll(logits, labels, chunk_size=chunk_size)
    if np.shape(labels) != np.shape(logits)[:-1]:
        raise ShapeError(
            f"expected labels.shape == logits.shape[:-1] == "
            f"{shape_str(np.shape(logits)[:-1])}, got labels.shape == {shape_str(np.shape(labels))}"
        )
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 kept
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(labels)[..., None], axis=-1)[..., 0]
