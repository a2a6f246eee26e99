"""Rotary position embeddings (RoPE), rotate-half convention, as Hugging Face models use them.

The inverse frequencies of every ``rope_type`` (``default``, ``linear``, ``dynamic``,
``llama3``, ``yarn``) are computed as transformers' ``modeling_rope_utils`` does, so a
checkpoint's positions mean the same thing here. Each head's first ``rotary_dim``
dimensions rotate (``rotary_dim = head_dim * partial_rotary_factor``); their two halves
form the pairs (not interleaved pairs), the remaining dimensions pass through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import ArgumentError

__all__ = ["Rotary", "rotary", "rope_frequencies", "apply_rotary"]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class Rotary(NamedTuple):
    """A rotary embedding's static settings (hashable: it closes over nothing traced).

    Attributes:
        rotary_dim: dimensions of each head that rotate (even).
        inv_freq: ``rotary_dim // 2`` inverse frequencies (float32 NumPy tuple).
        attention_scaling: cos and sin are multiplied by it (yarn; 1 elsewhere).
        dynamic: ``(theta, factor, max_position)`` for NTK-dynamic scaling, else ``None``:
            the frequencies then grow with the longest position seen.
    """

    rotary_dim: int
    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0
    dynamic: tuple[float, float, int] | None = None


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    # HF: arange(0, dim, 2) as int64 -> float32, then base ** (that / dim) in float32.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, s: Mapping[str, Any], max_position: int):
    factor = s.get("factor")
    original = s["original_max_position_embeddings"]
    if factor is None:
        factor = max_position / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention)


def rope_frequencies(
    head_dim: int,
    *,
    theta: float = 10000.0,
    partial_rotary_factor: float = 1.0,
    scaling: Mapping[str, Any] | None = None,
    max_position: int = 2048,
) -> Rotary:
    """The :class:`Rotary` settings of a Hugging Face config's rotary embedding.

    Args:
        head_dim: per-head width.
        theta: the rotary base (HF ``rope_theta``).
        partial_rotary_factor: fraction of each head's dimensions that rotate.
        scaling: HF ``rope_scaling`` / ``rope_parameters`` (``rope_type`` or ``type``:
            ``default``, ``linear``, ``dynamic``, ``llama3``, ``yarn``, with their keys).
        max_position: HF ``max_position_embeddings`` (dynamic and yarn read it).

    Returns:
        A :class:`Rotary`.

    Raises:
        ArgumentError: an unknown ``rope_type`` or a missing key it needs.

    Example:
        >>> r = nj.layers.rope.rope_frequencies(8, theta=100.0)
        >>> r.rotary_dim, np.round(r.inv_freq, 4)
        (8, array([1.    , 0.3162, 0.1   , 0.0316]))
    """
    dim = int(head_dim * partial_rotary_factor)
    if dim < 2 or dim % 2:
        raise ArgumentError(
            f"rope: head_dim * partial_rotary_factor must be an even number >= 2, got "
            f"{head_dim} * {partial_rotary_factor} = {dim}"
        )
    s = dict(scaling or {})
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ArgumentError(f"rope: rope_type must be one of {ROPE_TYPES}, got {kind!r}")
    inv_freq, attention, dynamic = _default_inv_freq(theta, dim), 1.0, None
    try:
        if kind == "linear":
            inv_freq = (inv_freq / np.float32(s["factor"])).astype(np.float32)
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
        elif kind == "yarn":
            inv_freq, attention = _yarn(theta, dim, s, max_position)
        elif kind == "dynamic":
            dynamic = (float(theta), float(s["factor"]), int(max_position))
    except KeyError as err:
        raise ArgumentError(
            f"rope: rope_type {kind!r} needs the key {err.args[0]!r} in scaling"
        ) from None
    return Rotary(dim, tuple(float(f) for f in inv_freq), float(attention), dynamic)


def rotary(config: Any) -> Rotary | None:
    """The :class:`Rotary` of a :class:`~nnjax.models.CausalLMConfig` (``None``: no rotary)."""
    if config.position != "rope":
        return None
    head_dim = config.head_dim or config.hidden_size // config.num_heads
    return rope_frequencies(
        head_dim,
        theta=config.rope_theta,
        partial_rotary_factor=config.partial_rotary_factor,
        scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        max_position=config.max_position,
    )


def _inv_freq(rot: Rotary, positions: jax.Array) -> jax.Array:
    """The inverse frequencies for this call (dynamic: grown to the longest position)."""
    if rot.dynamic is None:
        return jnp.asarray(rot.inv_freq, jnp.float32)
    theta, factor, max_position = rot.dynamic
    dim = rot.rotary_dim
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_position).astype(jnp.float32)
    base = theta * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base**exponent)


def cos_sin(rot: Rotary, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``(*positions.shape, rotary_dim)``, float32 (halves repeated)."""
    angles = positions.astype(jnp.float32)[..., None] * jax.lax.broadcast_to_rank(
        _inv_freq(rot, positions), positions.ndim + 1
    )
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb) * rot.attention_scaling, jnp.sin(emb) * rot.attention_scaling


def apply_rotary(x: jax.Array, positions: jax.Array, rot: Rotary) -> jax.Array:
    """Rotate ``x (N, T, heads, head_dim)`` by ``positions (N, T)`` (int), in ``x``'s dtype.

    ``x * cos + rotate_half(x) * sin`` on the first ``rotary_dim`` dimensions, with cos
    and sin rounded to ``x``'s dtype first (as transformers does).
    """
    cos, sin = cos_sin(rot, positions)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)  # (N, T, 1, r)
    d = rot.rotary_dim
    x_rot, x_pass = x[..., :d], x[..., d:]
    half = d // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    y = x_rot * cos + rotated * sin
    return jnp.concatenate([y, x_pass], axis=-1) if x_pass.shape[-1] else y
