"""Rule presets: data parallel, FSDP (ZeRO-3), Megatron tensor parallelism for the GPT block,
expert parallelism for mixtures of experts.

Each preset is a plain rules dict (print it, edit it, add rules in front of it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnjax.core.errors import ShardingError
from nnjax.core.paths import STACKED
from nnjax.layers.adapters import ADAPTERS
from nnjax.sharding.mesh import axis_size

__all__ = [
    "data_parallel_rules",
    "fsdp_spec",
    "fsdp_rules",
    "column_parallel",
    "row_parallel",
    "tensor_parallel_rules",
    "GATED_COLUMN",
    "GATED_ROW",
    "expert_parallel",
    "expert_parallel_rules",
]

COLUMN = ("attn/query", "attn/key", "attn/value", "mlp/fc")
ROW = ("attn/out", "mlp/proj")
GATED_COLUMN = ("attn/query", "attn/key", "attn/value", "mlp/gate", "mlp/up")
GATED_ROW = ("attn/out", "mlp/down")
"""The path tails of a gated-MLP decoder (Llama, Qwen, Mistral, Gemma: ``nj.models.CausalLM``)."""


def data_parallel_rules() -> dict[str, Any]:
    """Every parameter replicated: ``{"**": P()}``. Pair with ``shard_batch`` on ``data``."""
    return {"**": P()}


def _fsdp(path: str, shape: tuple[int, ...], mesh: Mesh, *, axis: str, min_size: int) -> P:
    del path
    n = axis_size(mesh, axis)
    size = 1
    for d in shape:
        size *= d
    fits = [i for i, d in enumerate(shape) if d % n == 0]
    if size < min_size or not fits or n == 1:
        return P()
    dim = max(fits, key=lambda i: (shape[i], -i))  # the largest; the first among equals
    return P(*(None,) * dim, axis)


def fsdp_spec(axis: str = "data", min_size: int = 2**14) -> Any:
    """A spec function for FSDP: split the largest dimension divisible by the ``axis`` size.

    Leaves with fewer than ``min_size`` elements, or with no dimension divisible
    by the axis size, stay replicated. For a stacked leaf, the dimension is picked
    among the per-copy dimensions.
    """
    return functools.partial(_fsdp, axis=axis, min_size=min_size)


def fsdp_rules(axis: str = "data", min_size: int = 2**14) -> dict[str, Any]:
    """Fully sharded data parallel (ZeRO-3): params and optimizer state split along ``axis``.

    Use the same ``axis`` for the batch; XLA all-gathers each weight where it is
    used and reduce-scatters its gradient.

    Args:
        axis: the mesh axis to split along (the data axis).
        min_size: leaves smaller than this (elements) are replicated.

    Returns:
        ``{"**": fsdp_spec(axis, min_size)}``.
    """
    return {"**": fsdp_spec(axis, min_size)}


def _split_spec(path: str, shape: tuple[int, ...], split: str, axis: str) -> P:
    """The spec that splits the ``split`` axis (``"in"`` or ``"out"``) of a kernel-side leaf.

    The kernel ``(..., in, out)`` (a Conv kernel's ``in`` is its channel axis), the
    bias ``(out,)`` and the adapters (their shapes over ``in``/``out``/``r`` from
    :data:`nnjax.layers.adapters.ADAPTERS`); anything else (the quantization scale)
    is replicated.
    """
    leaf = path.rpartition("/")[2]
    names = {"kernel": ("in", "out"), "bias": ("out",)}.get(leaf)
    if names is None:
        names = next((k.leaves[leaf] for k in ADAPTERS.values() if leaf in k.leaves), ())
    if split not in names or len(names) > len(shape):
        return P()
    spec: list[str | None] = [None] * len(shape)
    spec[len(shape) - len(names) + names.index(split)] = axis
    return P(*spec)


def _column(path: str, shape: tuple[int, ...], mesh: Mesh, *, axis: str) -> P:
    del mesh
    return _split_spec(path, shape, "out", axis)


def _row(path: str, shape: tuple[int, ...], mesh: Mesh, *, axis: str) -> P:
    del mesh
    return _split_spec(path, shape, "in", axis)


def column_parallel(axis: str = "model") -> Any:
    """Spec function for a Dense whose *outputs* are split along ``axis``.

    ``kernel (in, out)`` -> ``P(None, axis)``, ``bias``, ``ia3_scale``,
    ``dora_magnitude`` ``(out,)`` -> ``P(axis)``, LoRA ``lora_b (r, out)`` ->
    ``P(None, axis)``, ``lora_a (in, r)`` replicated.
    """
    return functools.partial(_column, axis=axis)


def row_parallel(axis: str = "model") -> Any:
    """Spec function for a Dense whose *inputs* are split along ``axis``.

    ``kernel (in, out)`` -> ``P(axis, None)``, ``lora_a (in, r)`` -> ``P(axis, None)``;
    ``bias``, ``lora_b``, ``ia3_scale`` replicated (XLA all-reduces the partial
    products before the bias is added).
    """
    return functools.partial(_row, axis=axis)


def _kv_column(path: str, shape: tuple[int, ...], mesh: Mesh, *, axis: str, kv_heads: int) -> P:
    # Grouped-query attention with fewer k/v heads than devices (or not a multiple): each
    # device keeps every k/v head (they are small) rather than a slice of one head's dims.
    if kv_heads % axis_size(mesh, axis):
        return P()
    return _column(path, shape, mesh, axis=axis)


def tensor_parallel_rules(
    axis: str = "model",
    *,
    column: Iterable[str] = COLUMN,
    row: Iterable[str] = ROW,
    kv_heads: int | None = None,
) -> dict[str, Any]:
    """Megatron-style tensor parallelism for the GPT block; everything else replicated.

    The attention's ``query``/``key``/``value`` and the MLP's ``fc`` are column-parallel
    (each device computes some heads, some hidden units), ``out`` and ``proj`` are
    row-parallel (each device multiplies its slice, XLA all-reduces the sums): one
    all-reduce per sub-block in the forward pass. Heads split evenly when
    ``num_heads`` is divisible by the ``axis`` size. LoRA and other adapters beside
    these kernels follow (see :func:`column_parallel`, :func:`row_parallel`).

    Args:
        axis: the mesh axis for the model dimension.
        column: Dense layers (path tails) to split on their outputs.
        row: Dense layers (path tails) to split on their inputs.
        kv_heads: the key/value head count of grouped-query attention: ``attn/key`` and
            ``attn/value`` are split by heads when it is a multiple of the ``axis`` size,
            else replicated. ``None``: split like ``query``.

    Returns:
        ``{"**/attn/query/*": column_parallel(axis), ..., "**/mlp/proj/*":
        row_parallel(axis), "**": P()}``. Each glob must match: for a model without
        attention pass ``column=("mlp/fc",), row=("mlp/proj",)``; for a gated MLP (Llama,
        ``nj.models.CausalLM``) ``column=GATED_COLUMN, row=GATED_ROW``.
    """
    rules: dict[str, Any] = {f"**/{c}/*": column_parallel(axis) for c in column}
    for kv in ("attn/key", "attn/value"):
        if kv_heads is not None and f"**/{kv}/*" in rules:
            rules[f"**/{kv}/*"] = functools.partial(_kv_column, axis=axis, kv_heads=kv_heads)
    rules.update({f"**/{r}/*": row_parallel(axis) for r in row})
    rules["**"] = P()
    return rules


def _expert(path: str, shape: tuple[int, ...], mesh: Mesh, *, axis: str) -> P:
    del mesh
    segs = path.split("/")
    stacks = [i for i, s in enumerate(segs) if s == STACKED or s.startswith(f"{STACKED}[")]
    at = [j for j, i in enumerate(stacks) if i > 0 and segs[i - 1] == "experts"]
    if not at:
        raise ShardingError(
            f"expert_parallel: {path!r} (shape {tuple(shape)}) is not a stacked expert leaf "
            f"(.../experts/{STACKED}/...)"
        )
    return P(*(None,) * at[-1], axis)


def expert_parallel(axis: str = "expert") -> Any:
    """Spec function splitting the experts' stacked axis along ``axis`` (each device holds
    ``E / n`` whole experts); a ``whole_leaf`` spec (see :mod:`nnjax.sharding.rules`).

    ``blocks/stacked/moe/experts/stacked/gate/kernel (L, E, d, f)`` -> ``P(None, axis)``;
    the experts' adapters and quantization scales (stacked the same way) follow.
    """
    fn = functools.partial(_expert, axis=axis)
    fn.whole_leaf = True  # type: ignore[attr-defined]
    return fn


def expert_parallel_rules(axis: str = "expert", rules: Any = None) -> dict[str, Any]:
    """Expert parallelism: every leaf under ``experts/`` split on the experts' axis.

    The other leaves follow ``rules`` (default: replicated), so expert parallelism
    composes with data parallelism on another mesh axis, or with tensor parallelism of
    the attention. Use the MoE layer's ``dispatch="capacity"`` on such a mesh: its
    batched product over the experts' axis stays on the devices that hold each expert,
    and the partitioner moves tokens between devices instead of weights.

    Args:
        axis: the mesh axis the experts are split over; the number of experts must be a
            multiple of its size.
        rules: rules for everything else (first match wins after the experts' rule).

    Returns:
        ``{"**/experts/*/**": expert_parallel(axis), **rules}`` (``rules`` default ``{"**": P()}``).

    Example:
        >>> from jax.sharding import AbstractMesh
        >>> moe = nj.layers.MoE(4, 2, 16)
        >>> params = jax.eval_shape(moe.init, key, jnp.zeros((2, 8)))[0]
        >>> mesh = AbstractMesh((2,), ("expert",))
        >>> specs = nj.sharding.param_specs(params, mesh, nj.sharding.expert_parallel_rules())
        >>> print(specs["experts"]["stacked"]["gate"]["kernel"], specs["router"]["kernel"])
        P('expert',) P()
    """
    return {"**/experts/*/**": expert_parallel(axis), **(rules or {"**": P()})}
