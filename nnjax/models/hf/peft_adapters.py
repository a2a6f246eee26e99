"""LoRA (and DoRA) adapters in PEFT's folder format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter by the module it adapts: the HF tensor ``model.layers.3.self_attn.q_proj.weight``
gets ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` ``(r, in)`` and
``...lora_B.weight`` ``(out, r)`` (DoRA adds ``...lora_magnitude_vector`` ``(out,)``), and
the update is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``). nnjax keeps ``lora_a (in, r)``, ``lora_b (r, out)`` with the
scale already folded into ``lora_a`` (:mod:`nnjax.finetune.adapters`), so an export
writes ``lora_A = lora_a.T`` and ``lora_alpha = r`` (scale 1: exact, nothing to
unfold), and an import folds the file's scale into ``lora_a``.

All families are covered. GPT-2's ``Conv1D`` modules (``c_attn``, ``attn.c_proj``,
``c_fc``, ``mlp.c_proj``) hold ``(in, out)`` weights, but PEFT's tensors have the same
``(r, in)`` / ``(out, r)`` shapes there (``fan_in_fan_out=True`` only transposes the
merged update). ``c_attn`` fuses query | key | value: an export stacks their three
``lora_a`` into one ``A (3r, in)`` with a block-diagonal ``B (3d, 3r)`` (zero blocks for
parts without an adapter; exact), written as ``rank_pattern`` / ``alpha_pattern``
``{"c_attn": 3r}``; an import gives each of query / key / value the whole ``A`` and its
rows of ``B``. Phi-3's ``qkv_proj`` (query | key | value of unequal widths: grouped-query
k/v are narrower) and ``gate_up_proj`` (gate | up) are written and read the same way,
each part taking its own width. Mixed stacks (Gemma 2/3) need nothing more: a module's
adapter is found through its logical path ``blocks/{i}/...``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import CheckpointError
from nnjax.core.paths import flatten, stack_depth, unflatten
from nnjax.layers import quantized
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.hf.config_checks import check_adapter_config, read_json
from nnjax.models.hf.convert import split_adapters
from nnjax.models.hf.families import family_of
from nnjax.models.hf.files import Pending, TensorInfo, read_headers, read_tensor, write_file
from nnjax.models.hf.staging import commit_files, staging, write_json
from nnjax.models.hf.tables import Slot, layout

__all__ = ["save_peft_adapter", "load_peft_adapter"]

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# PEFT options that change what the tensors mean beyond LoRA / DoRA on nn.Linear weights
_UNSUPPORTED = (
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "use_bdlora",
)
_SUFFIXES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_magnitude_vector": "dora",
}


def _kernel_slots(config: CausalLMConfig) -> list[tuple[str, Slot, tuple[str, ...]]]:
    """``(HF module name, slot, kernels' physical parent paths)`` of every kernel tensor
    (three parents for GPT-2's ``c_attn``), in table order."""
    from nnjax.models.hf.pretrained import param_template  # lazily: pretrained imports convert

    table = family_of(config.family, "config.family").table
    out = []
    for name, slot in layout(table, config, param_template(config)).items():
        if name.endswith(".weight") and all(p.endswith("/kernel") for p in slot.logical):
            parents = tuple(p.rpartition("/")[0] for p, _ in slot.places)
            out.append((name.removesuffix(".weight"), slot, parents))
    return out


def _index(slot: Slot) -> tuple[int, ...]:
    """The copy the slot's kernels are (the same for each of its parts)."""
    return slot.places[0][1]


def _widths(flat: Mapping[str, Any], parents: tuple[str, ...]) -> list[int]:
    """Each part's output width (q | k | v of a fused tensor: grouped-query k/v are narrower)."""
    return [
        int(quantized.logical_shape(flat[f"{p}/kernel"], flat.get(f"{p}/{quantized.SCALE}"))[-1])
        for p in parents
    ]


def _copy(leaf: Any, index: tuple[int, ...]) -> np.ndarray:
    return np.asarray(jax.device_get(leaf[index] if index else leaf))


def save_peft_adapter(
    path: str | os.PathLike,
    config: CausalLMConfig,
    params: Mapping[str, Any],
    *,
    base_model_name_or_path: str | None = None,
) -> list[str]:
    """Write the params' LoRA / DoRA adapters as a PEFT LoRA adapter folder.

    ``peft.PeftModel.from_pretrained(model, path)`` on the transformers model of the
    same weights gives the same outputs as nnjax with the adapters. ``target_modules``
    are the module names that carry adapters (``q_proj``, ``v_proj``, ...),
    ``lora_alpha = r`` (nnjax's ``lora_a`` already holds the scale).

    Args:
        path: the folder (created). Only ``adapter_config.json`` and
            ``adapter_model.safetensors`` are replaced (each once complete); a model's
            weights in the same folder are never touched.
        config: the model's config (its family names the modules).
        params: ``CausalLM(config)`` params with adapters (``nj.finetune.add_lora``).
        base_model_name_or_path: recorded in ``adapter_config.json``.

    Returns:
        The files written.

    Raises:
        CheckpointError: no LoRA adapters, IA3 adapters (PEFT's IA3 is another
            format: merge them), DoRA on only some modules, ranks that differ between
            modules, a module PEFT cannot name, or DoRA on GPT-2's fused ``c_attn``.

    Example:
        >>> config = nj.models.hf.config_from_hf({"model_type": "llama", "vocab_size": 100,
        ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4})
        >>> params, _ = nj.models.CausalLM(config).init(key, jnp.zeros((1, 1), jnp.int32))
        >>> params, mask = nj.finetune.add_lora(params, key, ["**/query/kernel", "**/value/kernel"])
        >>> nj.models.hf.save_peft_adapter("adapter", config, params)
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    _, adapters, _ = split_adapters(params)
    slots = _kernel_slots(config)
    parents_of = {p for _, _, parents in slots for p in parents}
    if not adapters:
        raise CheckpointError("save_peft_adapter: params hold no adapters (nj.finetune.add_lora)")
    bad = [
        p
        for p, g in adapters.items()
        if p not in parents_of or "lora_a" not in g or "ia3_scale" in g
    ]
    if bad:
        raise CheckpointError(
            f"save_peft_adapter: adapters at {sorted(bad)} have no PEFT LoRA form (IA3, a module "
            f"PEFT cannot name in a {config.family} model, or DoRA without LoRA); merge them "
            "with nj.finetune.merge_adapters and save_pretrained instead"
        )
    ranks = {p: int(np.shape(g["lora_a"])[-1]) for p, g in adapters.items()}
    doras = {"dora_magnitude" in g for g in adapters.values()}
    if len(set(ranks.values())) > 1 or len(doras) > 1:
        raise CheckpointError(
            f"save_peft_adapter: one rank and one kind per adapter file; got ranks {ranks}, "
            f"DoRA on some modules only: {len(doras) > 1}"
        )
    r = next(iter(ranks.values()))
    flat = flatten(params)
    tensors = []
    fused = {}  # {module name: its rank}, for PEFT's rank_pattern when it is not r
    targets = set()
    for name, slot, parents in slots:
        groups = [adapters.get(p) for p in parents]
        if not any(groups):
            continue
        short = name.rpartition(".")[2]
        targets.add(short)
        if len(parents) > 1:
            fused[short] = r * len(parents)
        widths = _widths(flat, parents)
        tensors += _module_tensors(PREFIX + name, groups, _index(slot), r, widths)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # scale 1: nnjax's lora_a holds alpha / r already
        "rank_pattern": fused,
        "alpha_pattern": fused,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        # Conv1D (GPT-2): PEFT sets it True anyway
        "fan_in_fan_out": family_of(config.family, "config.family").peft_fan_in_fan_out,
        "use_rslora": False,
        "use_dora": doras == {True},
        "modules_to_save": None,
        "inference_mode": True,
    }
    folder = os.fspath(path)
    with staging(folder) as staged:  # the folder's own files (a model's weights) stay untouched
        write_file(os.path.join(staged, WEIGHTS), tensors)
        write_json(os.path.join(staged, CONFIG), adapter_config)
        read_headers([os.path.join(staged, WEIGHTS)], None)
        commit_files(staged, folder, [WEIGHTS, CONFIG])
    return [CONFIG, WEIGHTS]


def _module_tensors(
    key: str, groups: list[Any], layer: tuple[int, ...], r: int, n_outs: list[int]
) -> list[Pending]:
    """PEFT's tensors of one module from the adapter groups of its parts (``None``: none).

    One part: ``lora_A = lora_a.T``, ``lora_B = lora_b.T``. Several (GPT-2's ``c_attn``):
    ``A`` stacks the parts' ``lora_a.T`` along the rank and ``B`` is block-diagonal, so
    ``B @ A`` is the parts' updates side by side; a part without adapter gives zeros.
    """
    some = next(g for g in groups if g is not None)
    n_in, dtype = np.shape(some["lora_a"])[-2], np.dtype(some["lora_a"].dtype)
    dora = "dora_magnitude" in some

    def a_() -> np.ndarray:
        return np.concatenate(
            [_copy(g["lora_a"], layer).T if g else np.zeros((r, n_in), dtype) for g in groups]
        )

    def b_() -> np.ndarray:
        b = np.zeros((sum(n_outs), r * len(groups)), np.dtype(some["lora_b"].dtype))
        for k, g in enumerate(groups):
            if g:
                rows = slice(sum(n_outs[:k]), sum(n_outs[: k + 1]))
                b[rows, k * r : (k + 1) * r] = _copy(g["lora_b"], layer).T
        return b

    out = [
        Pending(f"{key}.lora_A.weight", (r * len(groups), n_in), dtype, a_),
        Pending(f"{key}.lora_B.weight", (sum(n_outs), r * len(groups)),
                np.dtype(some["lora_b"].dtype), b_),
    ]  # fmt: skip
    if dora:
        if len(groups) > 1:
            raise CheckpointError(f"save_peft_adapter: DoRA on the fused {key} is not supported")
        m = some["dora_magnitude"]
        out.append(
            Pending(f"{key}.lora_magnitude_vector", (sum(n_outs),), np.dtype(m.dtype),
                    lambda: _copy(m, layer))
        )  # fmt: skip
    return out


def _pattern(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name's tail."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _read_config(folder: str) -> dict[str, Any]:
    # fan_in_fan_out is not checked: PEFT sets it from the module's type (True for GPT-2's
    # Conv1D, False for nn.Linear), and the tensors' shapes and meaning do not depend on it
    file = os.path.join(folder, CONFIG)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} does not exist (not a PEFT adapter folder?)")
    cfg = read_json(file)
    check_adapter_config(cfg, file)
    checks = {
        "peft_type": ("LORA", cfg.get("peft_type")),
        "bias": ("none", cfg.get("bias", "none")),
        "modules_to_save": (None, cfg.get("modules_to_save") or None),
    }
    for key in _UNSUPPORTED:
        if cfg.get(key):
            checks[key] = (None, cfg[key])
    for key, (want, got) in checks.items():
        if got != want:
            raise CheckpointError(f"{file}: {key}={got!r} is not supported (only {want!r})")
    return cfg


def _group_tensors(infos: Mapping[str, TensorInfo], modules: Mapping[str, Any], where: str):
    """``{(kernel parents, copy index): {"lora_a" | "lora_b" | "dora": HF key}}``."""
    groups: dict[tuple[tuple[str, ...], tuple[int, ...]], dict[str, str]] = {}
    for key in infos:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        module = key.removeprefix(PREFIX).removesuffix(suffix or "")
        if suffix is None or not key.startswith(PREFIX) or module not in modules:
            raise CheckpointError(
                f"{where}: tensor {key!r} is not a LoRA tensor of a module of this model"
            )
        groups.setdefault(modules[module], {})[_SUFFIXES[suffix]] = key
    for (parent, layer), g in groups.items():
        if "lora_a" not in g or "lora_b" not in g:
            raise CheckpointError(f"{where}: {parent} (copy {layer}) lacks lora_A or lora_B")
    return groups


def _check_shapes(
    by_parent: Mapping[str, Mapping[tuple[int, ...], tuple[dict[str, str], slice, int]]],
    flat: Mapping[str, Any],
    infos: Mapping[str, TensorInfo],
    where: str,
) -> None:
    """Each tensor's shape and dtype from its header against the kernel it adapts.

    Raises:
        CheckpointError: naming the tensor, its shape or dtype and the kernel's.
    """
    for parent, layers in by_parent.items():
        kernel, scale = flat[f"{parent}/kernel"], flat.get(f"{parent}/{quantized.SCALE}")
        n_in, n_out = quantized.logical_shape(kernel, scale)[-2:]
        for g, _, total in layers.values():
            r = infos[g["lora_a"]].shape[0] if infos[g["lora_a"]].shape else 0
            want = {"lora_a": (r, n_in), "lora_b": (total, r), "dora": (total,)}
            for kind, key in g.items():
                info = infos[key]
                fused = f" in a fused {total}" if total != n_out else ""
                if info.shape != want[kind] or r < 1:
                    raise CheckpointError(
                        f"{where}: {key} has shape {info.shape}, expected {want[kind]} for "
                        f"{parent}/kernel ({n_in}, {n_out}){fused} and rank {r} (from lora_A)"
                    )
                if not jnp.issubdtype(info.dtype, jnp.floating):
                    raise CheckpointError(
                        f"{where}: {key} has dtype {info.dtype}, expected a floating-point one"
                    )


def load_peft_adapter(
    path: str | os.PathLike, config: CausalLMConfig, params: Mapping[str, Any]
) -> dict[str, Any]:
    """``params`` with the LoRA (or DoRA) adapters of a PEFT adapter folder beside their kernels.

    The file's scale (``lora_alpha / r``, ``alpha_pattern`` / ``rank_pattern`` per module,
    ``lora_alpha / sqrt(r)`` with ``use_rslora``) is folded into ``lora_a``. A stacked
    kernel gets adapters for every layer: layers the file does not adapt get zeros
    (and, with DoRA, their kernel's column norms), so they change nothing; ranks that
    differ between layers are zero-padded to the largest. Train them with
    ``nj.finetune.adapter_mask(params)``.

    Raises:
        CheckpointError: a missing folder / file, a PEFT option nnjax does not model
            (``bias`` training, ``modules_to_save``, a non-LoRA type),
            a tensor for no module of the model, a shape that does not fit, or DoRA on
            GPT-2's fused ``c_attn``.

    Example:
        >>> config = nj.models.hf.config_from_hf({"model_type": "qwen3", "vocab_size": 100,
        ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4, "head_dim": 8})
        >>> base, _ = nj.models.CausalLM(config).init(key, jnp.zeros((1, 1), jnp.int32))
        >>> params, _ = nj.finetune.add_lora(base, key, "**/mlp/*/kernel", rank=4)
        >>> files = nj.models.hf.save_peft_adapter("adapter", config, params)
        >>> back = nj.models.hf.load_peft_adapter("adapter", config, base)
        >>> back["blocks"]["stacked"]["mlp"]["down"]["lora_a"].shape
        (2, 64, 4)
    """
    folder = os.fspath(path)
    cfg = _read_config(folder)
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{weights} does not exist")
    infos = read_headers([weights], None)
    modules = {name: (parents, _index(slot)) for name, slot, parents in _kernel_slots(config)}
    groups = _group_tensors(infos, modules, weights)
    flat = flatten(params)
    # {kernel parent: {copy: (tensor keys, this part's rows of B, all parts' width)}}
    by_parent: dict[str, dict[tuple[int, ...], tuple[dict[str, str], slice, int]]] = {}
    for (parents, layer), g in groups.items():
        if "dora" in g and len(parents) > 1:
            raise CheckpointError(f"{weights}: DoRA on the fused {g['dora']} is not supported")
        widths = _widths(flat, parents)
        for k, parent in enumerate(parents):
            rows = slice(sum(widths[:k]), sum(widths[: k + 1]))
            by_parent.setdefault(parent, {})[layer] = (g, rows, sum(widths))
    _check_shapes(by_parent, flat, infos, weights)  # every tensor, before any is read
    for parent, layers in by_parent.items():
        kernel, scale = flat[f"{parent}/kernel"], flat.get(f"{parent}/{quantized.SCALE}")
        w = kernel if scale is None else quantized.dequantize(kernel, scale)
        n_in, n_out = np.shape(w)[-2:]
        rank = max(infos[g["lora_a"]].shape[0] for g, _, _ in layers.values())
        lead = tuple(np.shape(w)[: stack_depth(parent)])
        a = np.zeros((*lead, n_in, rank), np.float32)
        b = np.zeros((*lead, rank, n_out), np.float32)
        dora = any("dora" in g for g, _, _ in layers.values())
        m = np.array(jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2)))
        for idx, (g, rows, _) in layers.items():
            ta, tb = (
                read_tensor(g["lora_a"], infos[g["lora_a"]]),
                read_tensor(g["lora_b"], infos[g["lora_b"]]),
            )
            r = ta.shape[0]
            tb = tb[rows]  # this part's rows of a fused (q|k|v) B
            module = g["lora_a"].removeprefix(PREFIX).removesuffix(".lora_A.weight")
            alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
            factor = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            a[(*idx, slice(None), slice(0, r))] = factor * ta.astype(np.float32).T
            b[(*idx, slice(0, r), slice(None))] = tb.astype(np.float32).T
            if "dora" in g:
                m[idx] = read_tensor(g["dora"], infos[g["dora"]]).astype(np.float32)
        dtype = jnp.float32 if scale is not None else kernel.dtype  # as nj.finetune.add_lora
        flat[f"{parent}/lora_a"] = jnp.asarray(a, dtype)
        flat[f"{parent}/lora_b"] = jnp.asarray(b, dtype)
        if dora:
            flat[f"{parent}/dora_magnitude"] = jnp.asarray(m, dtype)
    return unflatten(flat)
