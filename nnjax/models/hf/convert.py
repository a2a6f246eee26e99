"""A family table applied one tensor at a time: HF tensors -> params, params -> HF tensors.

Loading checks every name and shape against the table and the model's param
shapes before reading any tensor; then each tensor is read, converted (layout,
dtype) and placed on its device / sharding before the next. Per-layer tensors are
written into their stacked leaf in place (on a CPU, into an aligned host buffer that
becomes the array without a copy; elsewhere a donated ``dynamic_update_index_in_dim``),
so no second copy of a stacked leaf is ever built: peak memory is the result plus
about one tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nnjax.core.errors import CheckpointError, LayerError
from nnjax.core.paths import flatten, leaf_paths, stack_depth, unflatten
from nnjax.finetune import quantization
from nnjax.finetune.adapters import check_adapter_shapes, merge_adapters
from nnjax.finetune.quantization import Quantization, quantize_leaf, scale_path
from nnjax.layers import quantized
from nnjax.layers.adapters import ADAPTER_KEYS
from nnjax.models.hf.files import Pending, TensorInfo
from nnjax.models.hf.tables import Slot, Table, hf_shape, ignored, layout, to_hf, to_nnjax

__all__ = ["tensors_to_params", "params_to_tensors", "split_adapters"]


def _listing(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{f' and {len(names) - n} more' if len(names) > n else ''}"


def _copy_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """One copy's shape of a (possibly stacked) leaf."""
    return tuple(shape[stack_depth(path) :])


def _copy_shapes(slot: Slot, flat_t: Mapping[str, Any]) -> list[tuple[int, ...]]:
    return [_copy_shape(p, tuple(flat_t[p].shape)) for p, _ in slot.places]


def _check_paths(slots: Mapping[str, Slot], template: Mapping[str, Any], family: str) -> None:
    """Every param copy has a tensor (a mismatch is a bug of the table, said plainly)."""
    covered = {p for s in slots.values() for p in s.logical}
    uncovered = sorted(set(leaf_paths(template)) - covered)
    if uncovered:
        raise CheckpointError(
            f"the {family} table and the model's params disagree: params without a tensor "
            f"{_listing(uncovered)}"
        )


def _check_names(
    infos: Mapping[str, TensorInfo], slots: Mapping[str, Slot], table: Table, config: Any
) -> None:
    missing = [n for n in slots if n not in infos]
    extra = [n for n in infos if n not in slots and not ignored(table, n, config)]
    if missing:
        where = sorted({infos[n].file for n in infos}) or ["the checkpoint"]
        raise CheckpointError(
            f"{', '.join(where)}: missing tensor(s) {_listing(missing)} for a "
            f"{config.family} model with {config.num_layers} layers"
        )
    if extra:
        raise CheckpointError(
            f"{infos[extra[0]].file}: unexpected tensor(s) {_listing(extra)}: no {config.family} "
            "param takes them (is config.json the checkpoint's own?)"
        )


def _check_shapes(
    infos: Mapping[str, TensorInfo], slots: Mapping[str, Slot], template: Mapping[str, Any]
) -> None:
    for name, slot in slots.items():
        want = hf_shape(slot, _copy_shapes(slot, template))
        if infos[name].shape != want:
            raise CheckpointError(
                f"{infos[name].file}: tensor {name!r} -> {slot.logical[0]}: expected "
                f"shape {want}, got {infos[name].shape}"
            )
        if not jnp.issubdtype(infos[name].dtype, jnp.floating):
            raise CheckpointError(
                f"{infos[name].file}: tensor {name!r} has dtype {infos[name].dtype}; expected floats"
            )


@functools.partial(jax.jit, donate_argnums=0)
def _set_copy(stack: jax.Array, value: jax.Array, index: tuple[jax.Array, ...]) -> jax.Array:
    return stack.at[index].set(value.astype(stack.dtype))


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(table: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(table, rows, start, axis=0)


_ALIGN = 64  # XLA:CPU takes host memory aligned so without copying it


def _on_host_cpu(where: Any) -> bool:
    """Whether a leaf placed at ``where`` lives on the one CPU device that also holds
    host memory: then a host buffer becomes the array itself (see :class:`_Buffer`)."""
    if where is None:
        return jax.default_backend() == "cpu"
    devices = getattr(where, "device_set", set())
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


class _Buffer:
    """One leaf written a part at a time without a second copy of it.

    On a CPU device (``host``): a 64-byte-aligned host array, handed to
    ``jax.device_put`` when complete, which XLA:CPU then takes as the device buffer
    without copying it, so no program is compiled per leaf shape (the process keeps
    every compiled program: docs/benchmarks.md, "QLoRA memory"). Otherwise the device
    buffer itself, updated in place by a donated program.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, where: Any, host: bool = True):
        self.where, self.host = where, host and _on_host_cpu(where)
        if self.host:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = np.empty(size + _ALIGN, np.uint8)
            start = -raw.ctypes.data % _ALIGN
            self.array: Any = raw[start : start + size].view(dtype).reshape(shape)
        else:
            self.array = jnp.zeros(shape, dtype, device=where)

    def set_copy(self, index: tuple[int, ...], value: Any) -> None:
        if self.host:
            self.array[index] = np.asarray(value, self.array.dtype)
        else:
            self.array = _set_copy(self.array, value, tuple(np.int32(i) for i in index))

    def set_rows(self, start: int, rows: Any) -> None:
        if self.host:
            self.array[start : start + np.shape(rows)[0]] = np.asarray(rows)
        else:
            self.array = _set_rows(self.array, rows, np.int32(start))

    def result(self) -> jax.Array:
        return jax.device_put(self.array, self.where) if self.host else self.array


def _widens(source: Any, target: Any) -> bool:
    """Whether every ``source`` float is exactly a ``target`` float (bf16, f16 -> f32)."""
    source, target = np.dtype(source), np.dtype(target)
    exact = {np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)}
    return source in exact and target in (np.dtype(np.float32), np.dtype(np.float64))


def _table_rows(
    name: str,
    shape: tuple[int, ...],
    read_rows: Callable[[str, int, int], np.ndarray],
    target: Any,
    where: Any,
) -> tuple[jax.Array, jax.Array]:
    """An int8-per-row token table read and quantized a chunk of rows at a time, written
    into its buffer as it goes: no second copy of the table is made. Each row's scale
    is its own, so this is the whole table's result bit for bit."""
    rows, width = shape
    step = max(1, quantization.CHUNK // width)
    q, scale = _Buffer(shape, np.int8, where), _Buffer((rows,), np.float32, where)
    for r in range(0, rows, step):
        part = np.asarray(read_rows(name, r, min(r + step, rows)), dtype=target)
        q_rows, s_rows = quantize_leaf(part, "embedding", 8, 1)
        q.set_rows(r, q_rows)
        scale.set_rows(r, s_rows)
    return q.result(), scale.result()


def _place(
    out: dict,
    stacks: dict,
    path: str,
    index: tuple,
    value: Any,
    stack: tuple,
    where: Any,
    host: bool,
) -> None:
    """``out[path]`` = ``value``, or its copy ``index`` of a ``stack`` (``stacks[path]``,
    a :class:`_Buffer` made on first use; ``host``: in host memory where it can be)."""
    if not index:
        out[path] = jax.device_put(value, where)
        return
    if path not in stacks:
        shape = (*stack, *np.shape(value))
        stacks[path] = _Buffer(shape, np.asarray(value).dtype, where, host)
    stacks[path].set_copy(index, value)


def tensors_to_params(
    infos: Mapping[str, TensorInfo],
    read: Callable[[str], np.ndarray],
    table: Table,
    config: Any,
    template: Any,
    *,
    dtype: Any = None,
    shardings: Any = None,
    quantize: Quantization | None = None,
    read_rows: Callable[[str, int, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Params shaped as ``template`` from the tensors ``infos`` describes, read one at a time.

    Args:
        infos: ``{HF name: TensorInfo}`` (headers; nothing read yet).
        read: ``read(name) -> np.ndarray`` reads one tensor.
        table: the family's table.
        config: a :class:`~nnjax.models.CausalLMConfig` (its fields pick the entries).
        template: the model's params as ``ShapeDtypeStruct``s (``jax.eval_shape`` of init).
        dtype: the params' dtype; ``None``: each tensor's own.
        shardings: a tree like ``template`` of ``Sharding``s; ``None``: the default device.
        quantize: store the leaves it selects quantized, each copy as it is read
            (cast to ``dtype`` first): the result is ``quantize(params, *quantize)``.
        read_rows: ``read_rows(name, start, stop)`` reads rows of one tensor; given, a
            token table ``quantize`` stores as int8 rows is read a chunk of rows at a time.

    Raises:
        CheckpointError: missing, unexpected or wrongly shaped tensors, named with their
            file, before any tensor is read.
    """
    flat_t = flatten(template)
    slots = layout(table, config, template)
    _check_paths(slots, template, config.family)
    _check_names(infos, slots, table, config)
    _check_shapes(infos, slots, flat_t)
    devices = flatten(shardings) if shardings is not None else {}
    plan = quantize.plan(template, "quantize") if quantize is not None else {}
    out: dict[str, jax.Array] = {}
    stacks: dict[str, _Buffer] = {}
    for name in infos:  # file order, then each file's order: each file is read front to back
        if name not in slots:
            continue
        slot = slots[name]
        first = slot.places[0][0]
        target = np.dtype(dtype) if dtype is not None else infos[name].dtype
        if plan.get(first) == "embedding" and read_rows is not None and len(slot.places) == 1:
            out[first], out[scale_path(first)] = _table_rows(
                name, infos[name].shape, read_rows, target, devices.get(first)
            )
            continue
        widths = [s[-1] for s in _copy_shapes(slot, flat_t)]
        values = to_nnjax(slot, read(name), widths)
        for (path, index), value in zip(slot.places, values, strict=True):
            where = devices.get(path)
            kind = plan.get(path)
            if kind is not None and quantize is not None:
                # the float leaf from_pretrained would hold; where that only widens (bf16
                # -> float32: exact), the quantizer widens each chunk itself instead
                v = value if _widens(np.asarray(value).dtype, target) else np.asarray(value, target)
                q, s = quantize_leaf(v, kind, quantize.bits, quantize.block_size, 0, path)
                del v
                stack = tuple(flat_t[path].shape[: len(index)])
                _place(out, stacks, path, index, q, stack, where, True)
                _place(out, stacks, scale_path(path), index, s, stack, where, True)
            else:
                stack = tuple(flat_t[path].shape[: len(index)])
                # a float model's stacks in device buffers (host ones peaked higher on a
                # 124.7M float32 load); a quantized one's small float stacks (norms,
                # biases) on the host beside its quantized ones
                value = np.asarray(value, dtype=target)
                _place(out, stacks, path, index, value, stack, where, quantize is not None)
    for path, buffer in stacks.items():
        out[path] = buffer.result()
    stacks.clear()
    return unflatten(out)


def split_adapters(
    params: Any,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """``({path: leaf} of the plain leaves, {kernel's parent: {adapter name: leaf}},
    {kernel path: its quantization scale})``."""
    base, adapters, scales = {}, {}, {}
    for path, leaf in flatten(params).items():
        parent, _, name = path.rpartition("/")
        if name in ADAPTER_KEYS:
            adapters.setdefault(parent, {})[name] = leaf
        elif name in (quantized.SCALE, quantized.ROW_SCALE):
            scales[path[: -len("_scale")]] = leaf
        else:
            base[path] = leaf
    return base, adapters, scales


class _Source(NamedTuple):
    """The params an export reads, split as :func:`split_adapters` splits them."""

    base: dict[str, Any]
    adapters: dict[str, dict[str, Any]]
    scales: dict[str, Any]
    dtype: np.dtype  # the float dtype a quantized kernel is written in


def _host_copy(src: _Source, path: str, index: tuple[int, ...]) -> np.ndarray:
    """One copy of a leaf on the host: dequantized, with the adapters beside it merged in."""

    def take(leaf):
        return leaf[index] if index else leaf

    value = take(src.base[path])
    if path in src.scales and path.endswith("/embedding"):
        value = quantized.dequantize_rows(value, src.scales[path]).astype(src.dtype)
    elif path in src.scales:
        value = quantized.dequantize(value, take(src.scales[path])).astype(src.dtype)
    parent, _, name = path.rpartition("/")
    group = src.adapters.get(parent) if name == "kernel" else None
    if group:
        value = merge_adapters({"kernel": value, **{k: take(v) for k, v in group.items()}})[
            "kernel"
        ]
    return np.asarray(jax.device_get(value))


def params_to_tensors(
    params: Any, table: Table, config: Any, template: Any, *, merge: bool = True
) -> list[Pending]:
    """The HF tensors of ``params`` in table order, each produced only when written.

    Args:
        params: params for the model ``template`` describes (adapters allowed with ``merge``).
        table, config: as :func:`tensors_to_params`.
        template: the model's params (shapes only).
        merge: fold LoRA / DoRA / IA3 adapters into their kernels as each is produced.

    Raises:
        CheckpointError: params that do not fit the model (missing, extra or wrongly
            shaped leaves), adapters that do not fit their kernels, or adapters with
            ``merge=False``.
    """
    base, adapters, scales = split_adapters(params)
    flat_t = flatten(template)
    if adapters and not merge:
        raise CheckpointError(
            f"params hold adapters at {_listing(sorted(adapters))}; pass merge_adapters=True, "
            "or write them with nj.models.hf.save_peft_adapter"
        )
    try:  # before any tensor is produced or written
        check_adapter_shapes(params)
    except LayerError as e:
        raise CheckpointError(f"params: adapters that do not fit their kernel: {e}") from None
    missing, extra = sorted(set(flat_t) - set(base)), sorted(set(base) - set(flat_t))
    if missing or extra:
        raise CheckpointError(
            f"params do not fit the {config.family} model: missing {_listing(missing)}, "
            f"not params of it {_listing(extra)}"
        )
    for path, leaf in base.items():
        shape = quantized.logical_shape(leaf, scales.get(path))
        if shape != tuple(flat_t[path].shape):
            raise CheckpointError(
                f"param {path}: expected shape {tuple(flat_t[path].shape)}, got {shape}"
            )
    embed = scales.get("tok_embed/embedding", base.get("tok_embed/embedding"))
    src = _Source(
        base, adapters, scales, np.dtype(embed.dtype if embed is not None else np.float32)
    )
    slots = layout(table, config, template)
    _check_paths(slots, template, config.family)
    out = []
    for name, slot in slots.items():
        shape = hf_shape(slot, _copy_shapes(slot, flat_t))

        def produce(slot=slot):
            return to_hf(slot, [_host_copy(src, p, index) for p, index in slot.places])

        first = slot.places[0][0]
        dtype = src.dtype if first in scales else np.dtype(base[first].dtype)
        out.append(Pending(name, shape, dtype, produce))
    return out
