"""Weights people already have: Hugging Face GPT-2 checkpoints and PyTorch ``state_dict`` s.

GPT-2 (``transformers``' ``GPT2LMHeadModel``, a ``save_pretrained`` folder, its
``model.safetensors`` or its ``state_dict``) loads into :func:`nnjax.models.gpt.GPT`
params and exports back::

    config, params = nj.models.hf.load_gpt2("gpt2-folder")     # config.json + model.safetensors
    logits, _ = nj.models.GPT(config).apply(params, {}, ids)
    nj.models.hf.save_gpt2("out-folder", config, params)        # GPT2LMHeadModel.from_pretrained

GPT-2's ``Conv1D`` stores weights ``(in, out)`` as nnjax kernels do (no transpose);
``c_attn`` fuses query|key|value along ``out``. Any other PyTorch model loads by a
name map with :func:`load_torch_state_dict` (``nn.Linear``/``nn.Conv*d`` weights are
transposed to nnjax's ``(..., in, out)`` kernels). Every tensor's shape is checked;
an error names the tensor, the expected and the found shape.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import CheckpointError
from nnjax.core.paths import STACKED, flatten, unflatten
from nnjax.models.gpt import GPT, GPTConfig

__all__ = [
    "gpt2_config",
    "gpt2_to_params",
    "params_to_gpt2",
    "load_gpt2",
    "save_gpt2",
    "load_torch_state_dict",
    "to_torch_state_dict",
]

_BUFFERS = ("attn.bias", "attn.masked_bias")  # GPT-2's causal-mask buffers in older files
_TRANSFORMS = ("auto", "none", "transpose")


# --- shared: arrays, logical paths, assembly -----------------------------------------


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device), jax or NumPy array as a NumPy array."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError:  # bfloat16 has no NumPy dtype in torch
            return value.float().numpy()
    return np.asarray(value)


def _logical(path: str, index: tuple[int, ...]) -> str:
    """``blocks/stacked/attn/...`` with copy ``(3,)`` -> ``blocks/3/attn/...``."""
    it = iter(index)
    return "/".join(str(next(it)) if key == STACKED else key for key in path.split("/"))


def _assemble(
    template: Mapping[str, Any],
    values: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    *,
    strict: bool,
) -> dict[str, Any]:
    """Params shaped as ``template`` from ``values`` keyed by logical path.

    A stacked leaf is filled copy by copy. Each value's shape is checked (the error
    names its source tensor). A leaf with no value is an error if ``strict``; else it
    keeps ``template``'s value.
    """
    out, missing, used = {}, [], set()
    for path, leaf in flatten(template).items():
        shape = tuple(np.shape(leaf))
        n = path.split("/").count(STACKED)
        dtype = np.dtype(leaf.dtype)
        arr = None
        for index in itertools.product(*(range(s) for s in shape[:n])):
            logical = _logical(path, index)
            if logical not in values:
                missing.append(logical)
                continue
            value = values[logical]
            if tuple(value.shape) != shape[n:]:
                raise CheckpointError(
                    f"tensor {sources[logical]!r} -> {logical}: expected shape "
                    f"{shape[n:]}, got {tuple(value.shape)}"
                )
            if arr is None:
                arr = np.array(leaf, dtype=dtype) if not strict else np.zeros(shape, dtype)
            arr[index] = value.astype(dtype)
            used.add(logical)
        if arr is not None:
            out[path] = jnp.asarray(arr)
        elif not strict:
            out[path] = leaf
    if strict and missing:
        raise CheckpointError(
            f"no tensor for param(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    unused = sorted(set(values) - used)
    if unused:
        raise CheckpointError(
            f"tensor(s) {[sources[u] for u in unused]} map to path(s) {unused} that are not params"
        )
    return unflatten(out)


def _read_logical(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{logical path: NumPy array}`` (stacked copies split)."""
    out = {}
    for path, leaf in flatten(params).items():
        arr = np.asarray(jax.device_get(leaf))
        n = path.split("/").count(STACKED)
        for index in itertools.product(*(range(s) for s in arr.shape[:n])):
            out[_logical(path, index)] = arr[index]
    return out


# --- GPT-2 ---------------------------------------------------------------------------


def gpt2_config(hf_config: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a GPT-2 config (a ``config.json`` dict or a ``GPT2Config``).

    Dropout is 0 (set ``dataclasses.replace(cfg, dropout=...)`` to fine-tune with it).

    Raises:
        ValueError: ``n_inner`` not a multiple of ``n_embd``, or an unknown activation.
    """

    def get(name, default=None):
        if isinstance(hf_config, Mapping):
            return hf_config.get(name, default)
        return getattr(hf_config, name, default)

    n_embd = int(get("n_embd"))
    n_inner = get("n_inner") or 4 * n_embd
    if n_inner % n_embd:
        raise ValueError(
            f"gpt2_config: n_inner ({n_inner}) must be a multiple of n_embd ({n_embd})"
        )
    return GPTConfig(
        vocab_size=int(get("vocab_size")),
        block_size=int(get("n_positions")),
        n_layer=int(get("n_layer")),
        n_head=int(get("n_head")),
        n_embd=n_embd,
        dropout=0.0,
        mlp_ratio=n_inner // n_embd,
        bias=True,
        activation=str(get("activation_function", "gelu_new")),
        epsilon=float(get("layer_norm_epsilon", 1e-5)),
    )


def _gpt2_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT-2 tensor names (no ``transformer.`` prefix) and their shapes for ``c``."""
    d, h = c.n_embd, c.mlp_ratio * c.n_embd
    shapes = {"wte.weight": (c.vocab_size, d), "wpe.weight": (c.block_size, d)}
    for i in range(c.n_layer):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, h),
                p + "mlp.c_fc.bias": (h,),
                p + "mlp.c_proj.weight": (h, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def _gpt2_paths(name: str) -> list[str]:
    """nnjax logical path(s) of a GPT-2 tensor name (``c_attn`` gives three)."""
    if name == "wte.weight":
        return ["tok_embed/embedding"]
    if name == "wpe.weight":
        return ["pos_embed/embedding"]
    parts = name.split(".")
    leaf = {"weight": "kernel", "bias": "bias"}[parts[-1]]
    if parts[0] == "ln_f":
        return [f"ln_f/{'scale' if leaf == 'kernel' else 'bias'}"]
    i, module = parts[1], ".".join(parts[2:-1])
    if module in ("ln_1", "ln_2"):
        return [f"blocks/{i}/{module}/{'scale' if leaf == 'kernel' else 'bias'}"]
    if module == "attn.c_attn":
        return [f"blocks/{i}/attn/{p}/{leaf}" for p in ("query", "key", "value")]
    target = {"attn.c_proj": "attn/out", "mlp.c_fc": "mlp/fc", "mlp.c_proj": "mlp/proj"}[module]
    return [f"blocks/{i}/{target}/{leaf}"]


def _strip(state_dict: Mapping[str, Any]) -> tuple[dict[str, tuple[str, Any]], Any]:
    """``({name without 'transformer.': (original name, tensor)}, lm_head or None)``."""
    out, lm_head = {}, None
    for original, value in state_dict.items():
        if original == "lm_head.weight":
            lm_head = value
            continue
        name = original.removeprefix("transformer.")
        if name.endswith(_BUFFERS) and name.count(".") == 3:  # h.{i}.attn.bias: a mask buffer
            continue
        if name in out:
            raise CheckpointError(
                f"tensors {out[name][0]!r} and {original!r} are the same GPT-2 tensor"
            )
        out[name] = (original, value)
    return out, lm_head


def gpt2_to_params(state_dict: Mapping[str, Any], config: GPTConfig) -> dict[str, Any]:
    """:func:`~nnjax.models.gpt.GPT` params from a GPT-2 state dict.

    Args:
        state_dict: ``{name: tensor}`` with GPT-2's names, with or without the
            ``transformer.`` prefix (torch tensors or arrays); ``lm_head.weight``, if
            present, must equal ``wte.weight`` (GPT-2 ties them).
        config: the model's config (:func:`gpt2_config`).

    Returns:
        Params for ``GPT(config)``, float32 (or the dtype ``GPT(config).init`` gives).

    Raises:
        CheckpointError: a missing or unexpected tensor, a shape that does not fit
            (``tensor 'h.0.attn.c_attn.weight': expected shape (32, 96), got (32, 64)``),
            an ``lm_head.weight`` that is not the token table.
    """
    tensors, lm_head = _strip(state_dict)
    shapes = _gpt2_shapes(config)
    prefix = (
        "transformer." if any(o.startswith("transformer.") for o, _ in tensors.values()) else ""
    )
    missing = [prefix + n for n in shapes if n not in tensors]
    unexpected = [o for n, (o, _) in tensors.items() if n not in shapes]
    if missing or unexpected:
        raise CheckpointError(
            f"GPT-2 state dict does not fit {config}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    values, sources = {}, {}
    for name, want in shapes.items():
        original, tensor = tensors[name]
        arr = _numpy(tensor)
        if tuple(arr.shape) != want:
            raise CheckpointError(
                f"tensor {original!r}: expected shape {want}, got {tuple(arr.shape)}"
            )
        paths = _gpt2_paths(name)
        parts = np.split(arr, len(paths), axis=-1)  # c_attn: q | k | v along out
        for path, part in zip(paths, parts, strict=True):
            values[path], sources[path] = part, original
    if lm_head is not None:
        head = _numpy(lm_head)
        if head.shape != values["tok_embed/embedding"].shape or not np.array_equal(
            head, values["tok_embed/embedding"]
        ):
            raise CheckpointError(
                f"tensor 'lm_head.weight' {tuple(head.shape)} is not the token table "
                "wte.weight: GPT's head is tied to it"
            )
    template = jax.eval_shape(
        GPT(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )[0]
    return _assemble(template, values, sources, strict=True)


def params_to_gpt2(
    params: Mapping[str, Any],
    config: GPTConfig,
    *,
    prefix: str = "transformer.",
    lm_head: bool = True,
) -> dict[str, np.ndarray]:
    """A GPT-2 state dict (NumPy arrays) from :func:`~nnjax.models.gpt.GPT` params.

    Merge adapters first (``nj.finetune.merge_adapters``): GPT-2 has no place for them.

    Args:
        params: GPT params for ``config``.
        config: the model's config.
        prefix: put before every name but ``lm_head.weight`` (``""`` for ``GPT2Model``).
        lm_head: add ``lm_head.weight`` (the token table, tied).

    Returns:
        ``{name: array}`` in GPT-2's names and layouts (``torch.from_numpy`` each
        for ``model.load_state_dict``).

    Raises:
        CheckpointError: params that do not fit ``config`` (or hold adapters).
    """
    logical = _read_logical(params)
    out = {}
    for name, want in _gpt2_shapes(config).items():
        paths = _gpt2_paths(name)
        for p in paths:
            if p not in logical:
                raise CheckpointError(f"params have no {p!r} (for GPT-2 tensor {name!r})")
        arr = np.concatenate([logical.pop(p) for p in paths], axis=-1)
        if arr.shape != want:
            raise CheckpointError(
                f"param(s) {paths} -> tensor {name!r}: expected shape {want}, got {arr.shape}"
            )
        out[prefix + name] = arr
    if logical:
        raise CheckpointError(
            f"params {sorted(logical)[:10]} have no GPT-2 tensor (merge adapters first)"
        )
    if lm_head:
        out["lm_head.weight"] = out[prefix + "wte.weight"]
    return out


def _hf_config(config: GPTConfig) -> dict[str, Any]:
    if not isinstance(config.activation, str):
        raise ValueError("save_gpt2: the config's activation must be a name (gelu_new, gelu, ...)")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_ratio * config.n_embd,
        "activation_function": config.activation,
        "layer_norm_epsilon": config.epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _safetensors_files(directory: str) -> list[str]:
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    raise CheckpointError(f"no model.safetensors (or its index) in {directory!r}")


def load_gpt2(source: Any, config: GPTConfig | None = None) -> tuple[GPTConfig, dict[str, Any]]:
    """Load a GPT-2 checkpoint into :func:`~nnjax.models.gpt.GPT` params.

    Args:
        source: a ``save_pretrained`` folder (``config.json`` and ``model.safetensors``,
            sharded too), a ``.safetensors`` file, or a state dict ``{name: tensor}``.
        config: the model's config; default: read from the folder's ``config.json``
            (required for a file or a state dict).

    Returns:
        ``(config, params)``.

    Raises:
        CheckpointError: see :func:`gpt2_to_params`; a folder without weights.
        ValueError: no config for a file or state dict.

    Example:
        A tiny random GPT-2 saved by transformers stands in for a downloaded one:

        >>> import transformers
        >>> hf_config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
        >>> transformers.GPT2LMHeadModel(hf_config).save_pretrained("gpt2-tiny")
        >>> config, params = nj.models.hf.load_gpt2("gpt2-tiny")
        >>> out = nj.models.generate(config, params, jnp.array([[1, 2]]), 5, temperature=0)
        >>> out.shape
        (1, 7)
    """
    from safetensors.numpy import load_file

    if isinstance(source, Mapping):
        state_dict = source
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            if config is None:
                with open(os.path.join(path, "config.json")) as f:
                    config = gpt2_config(json.load(f))
            files = _safetensors_files(path)
        else:
            files = [path]
        state_dict = {}
        for file in files:
            state_dict.update(load_file(file))
    if config is None:
        raise ValueError("load_gpt2: pass config= (or a folder with config.json)")
    return config, gpt2_to_params(state_dict, config)


def save_gpt2(directory: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any]) -> None:
    """Write ``config.json`` and ``model.safetensors`` as ``GPT2LMHeadModel.save_pretrained`` does.

    ``GPT2LMHeadModel.from_pretrained(directory)`` loads it (the head is tied, so
    ``lm_head.weight`` is not stored).
    """
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = params_to_gpt2(params, config, lm_head=False)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(_hf_config(config), f, indent=2)


# --- any PyTorch model by a name map -------------------------------------------------


def _entry(name: str, value: Any) -> tuple[str, str]:
    path, transform = (value, "auto") if isinstance(value, str) else tuple(value)
    if transform not in _TRANSFORMS:
        raise ValueError(
            f"name_map[{name!r}]: transform must be one of {_TRANSFORMS}, got {transform!r}"
        )
    return path, transform


def _to_jax_layout(arr: np.ndarray, path: str, transform: str) -> np.ndarray:
    """torch ``Linear (out, in)`` / ``Conv (out, in, *window)`` -> ``(in, out)`` / ``(*window, in, out)``."""
    if transform == "none" or (transform == "auto" and not path.endswith("kernel")):
        return arr
    if arr.ndim < 2:
        return arr
    if transform == "transpose":
        return arr.T
    return np.transpose(arr, (*range(2, arr.ndim), 1, 0))


def _to_torch_layout(arr: np.ndarray, path: str, transform: str) -> np.ndarray:
    if transform == "none" or (transform == "auto" and not path.endswith("kernel")):
        return arr
    if arr.ndim < 2:
        return arr
    if transform == "transpose":
        return arr.T
    nd = arr.ndim
    return np.transpose(arr, (nd - 1, nd - 2, *range(nd - 2)))


def load_torch_state_dict(
    params: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    name_map: Mapping[str, Any],
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """``params`` with leaves taken from a PyTorch ``state_dict`` by a name map.

    Args:
        params: the nnjax params to fill (their shapes and dtypes are the target).
        state_dict: ``{torch name: tensor}`` (``module.state_dict()``; arrays work too).
        name_map: ``{torch name: nnjax logical path}`` (``"blocks/3/attn/query/kernel"``
            addresses one copy of a stacked leaf), or ``{torch name: (path, transform)}``
            with ``transform`` ``"auto"`` (default: a ``.../kernel`` target is moved from
            torch's ``(out, in, *window)`` to ``(*window, in, out)``, so ``nn.Linear`` and
            ``nn.Conv*d`` weights land right; other leaves as they are), ``"none"``
            (GPT-2's ``Conv1D``) or ``"transpose"``.
        strict: every param must get a tensor and every tensor in ``state_dict`` must be
            mapped; with ``strict=False`` unmapped params keep their values and unmapped
            tensors are ignored.

    Returns:
        New params (same structure, dtypes of ``params``).

    Raises:
        CheckpointError: a mapped tensor missing from ``state_dict``, a shape that does
            not fit (``tensor '0.weight' -> dense_0/kernel: expected shape (4, 8), got
            (8, 5)``), a path that is not a param, or (``strict``) anything unmapped.

    Example:
        >>> import torch
        >>> params, _ = nj.serial(nj.Dense(8), jax.nn.relu, nj.Dense(2)).init(key, jnp.zeros((1, 4)))
        >>> torch_net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = nj.models.hf.load_torch_state_dict(params, torch_net.state_dict(), {
        ...     "0.weight": "dense_0/kernel", "0.bias": "dense_0/bias",
        ...     "2.weight": "dense_1/kernel", "2.bias": "dense_1/bias"})
        >>> np.allclose(params["dense_1"]["kernel"], torch_net[2].weight.detach().numpy().T)
        True
    """
    absent = [n for n in name_map if n not in state_dict]
    if absent:
        raise CheckpointError(f"name_map names tensor(s) {absent} that are not in the state dict")
    if strict:
        unmapped = [n for n in state_dict if n not in name_map]
        if unmapped:
            raise CheckpointError(
                f"state dict tensor(s) {unmapped} have no entry in name_map (or pass strict=False)"
            )
    values, sources = {}, {}
    for name, value in name_map.items():
        path, transform = _entry(name, value)
        if path in values:
            raise ValueError(f"name_map maps both {sources[path]!r} and {name!r} to {path!r}")
        values[path] = _to_jax_layout(_numpy(state_dict[name]), path, transform)
        sources[path] = name
    return _assemble(params, values, sources, strict=strict)


def to_torch_state_dict(
    params: Mapping[str, Any], name_map: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_torch_state_dict`: ``{torch name: NumPy array}`` in torch layouts.

    Raises:
        CheckpointError: a mapped path that is not a param.
    """
    logical = _read_logical(params)
    out = {}
    for name, value in name_map.items():
        path, transform = _entry(name, value)
        if path not in logical:
            raise CheckpointError(f"name_map[{name!r}] = {path!r} is not a param path")
        out[name] = np.ascontiguousarray(_to_torch_layout(logical[path], path, transform))
    return out
