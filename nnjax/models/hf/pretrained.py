"""Hugging Face model folders in and out: Llama, Qwen2, Qwen3, Mistral, Gemma, GPT-2.

``from_pretrained`` reads a ``save_pretrained`` folder (``config.json``, ``model.safetensors``
or shards with ``model.safetensors.index.json``, ``generation_config.json``) into a
:class:`~nnjax.models.CausalLMConfig` and params for :func:`nnjax.models.CausalLM`;
``save_pretrained`` writes one that ``transformers.AutoModelForCausalLM`` loads. Both
stream one tensor at a time (see :mod:`nnjax.models.hf.convert`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nnjax.core.checks import check_bool
from nnjax.core.errors import ArgumentError, CheckpointError
from nnjax.finetune.quantization import Quantization
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.hf.config_checks import read_json as _read_json
from nnjax.models.hf.configs import config_from_hf, config_to_hf
from nnjax.models.hf.convert import params_to_tensors, tensors_to_params
from nnjax.models.hf.families import family_of
from nnjax.models.hf.files import model_files, parse_size, read_headers, read_rows, read_tensor
from nnjax.models.hf.staging import save_model_folder
from nnjax.models.hf.tokenizer import Tokenizer

__all__ = ["from_pretrained", "save_pretrained", "load_config", "param_template"]


def load_config(path: str | os.PathLike) -> CausalLMConfig:
    """The :class:`CausalLMConfig` of an HF folder's ``config.json`` (+ ``generation_config.json``).

    Raises:
        CheckpointError: no folder or ``config.json``, an unsupported ``model_type``.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r} is not a folder")
    file = os.path.join(folder, "config.json")
    hf = _read_json(file)
    generation_file = os.path.join(folder, "generation_config.json")
    generation = _read_json(generation_file) if os.path.isfile(generation_file) else None
    return config_from_hf(hf, generation, where=file)


def param_template(config: CausalLMConfig) -> dict[str, Any]:
    """``CausalLM(config)``'s params as ``ShapeDtypeStruct``s (no memory, no FLOPs)."""
    from nnjax.models.causal_lm import CausalLM  # lazily: nnjax.models imports hf

    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(CausalLM(config).init, jax.random.key(0), ids)[0]


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    quantize: Quantization | None = None,
) -> tuple[CausalLMConfig, dict[str, Any]]:
    """Load a local Hugging Face model folder as ``(config, params)`` for ``nj.models.CausalLM``.

    Names and layouts are mapped by the family's table
    (:mod:`nnjax.models.hf.families`); per-layer tensors fill the ``blocks/stacked/...``
    leaves. One tensor is in host memory at a time, placed (cast to ``dtype``, put
    on its sharding) before the next is read: peak host memory is about the params
    plus the largest tensor.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (or
            ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``);
            ``model_type`` one of llama, mistral, qwen2, qwen3, gemma, gpt2.
        dtype: the params' dtype (``jnp.bfloat16``); ``None``: the checkpoint's.
        mesh: place each leaf on this mesh, by ``rules``.
        rules: sharding rules (``nj.sharding.tensor_parallel_rules()``); default with a
            mesh: replicated.
        quantize: a :class:`nnjax.finetune.Quantization` (the arguments of
            :func:`nnjax.finetune.quantize`: which kernels, ``bits``, ``block_size``,
            which token tables as int8 rows): each selected tensor is read, cast to
            ``dtype``, quantized in chunks and only the quantized leaf kept, so the float
            model never exists whole; a token table is read a chunk of rows at a time.
            The params equal ``quantize(from_pretrained(path, dtype=dtype), *quantize)``
            bit for bit. Not with ``mesh`` (quantize after loading there).

    Returns:
        ``(config, params)``; ``config.extra`` keeps the ``config.json`` fields for export.

    Raises:
        CheckpointError: no folder, no ``config.json`` or weights; an unsupported
            ``model_type``; missing, unexpected or wrongly shaped tensors; a truncated
            file; an index entry that is a path rather than a file name of the folder
            (``../x``, ``/x``: refused before reading anything). Files that are symlinks
            (Hugging Face's cache: ``snapshots/<rev>/*`` link into ``../../blobs/``) are
            followed, single files and shards alike.
            Each names the file and the tensor.
        ShardingError, GlobError: rules that do not fit the params.
        ArgumentError, GlobError: a ``quantize`` that is not a ``Quantization``, bad
            ``bits`` / ``block_size``, globs that select nothing (each named, before any
            tensor is read); ``quantize`` with ``mesh``.

    Example:
        A tiny random Llama saved by transformers stands in for a downloaded one:

        >>> import transformers
        >>> c = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> transformers.LlamaForCausalLM(c).save_pretrained("llama-tiny")
        >>> config, params = nj.models.hf.from_pretrained("llama-tiny")
        >>> config.num_kv_heads, params["blocks"]["stacked"]["attn"]["key"]["kernel"].shape
        (2, (2, 32, 16))
        >>> logits, _ = nj.models.CausalLM(config).apply(params, {}, jnp.array([[1, 2, 3]]))
        >>> logits.shape
        (1, 3, 100)

        Loaded as a QLoRA base: NF4 block kernels, the token table as int8 rows:

        >>> q = nj.finetune.Quantization("blocks/**/kernel", bits=4, embeddings="tok_embed/embedding")
        >>> config, params = nj.models.hf.from_pretrained("llama-tiny", quantize=q)
        >>> params["blocks"]["stacked"]["mlp"]["up"]["kernel"].dtype, params["tok_embed"]["embedding"].dtype
        (dtype('uint8'), dtype('int8'))
    """
    if rules is not None and mesh is None:
        raise ArgumentError("from_pretrained: rules= needs mesh=")
    if quantize is not None:
        if not isinstance(quantize, Quantization):
            raise ArgumentError(
                "from_pretrained: quantize must be an nj.finetune.Quantization(include, "
                f"exclude, bits, block_size, embeddings) or None, got {quantize!r}"
            )
        if mesh is not None:
            raise ArgumentError(
                "from_pretrained: quantize= with mesh= is not supported; load on the mesh, "
                "then nj.finetune.quantize"
            )
        quantize = quantize.checked("from_pretrained: quantize")
    config = load_config(path)
    template = param_template(config)
    if quantize is not None:  # globs checked against the model before any file is read
        quantize.plan(template, "from_pretrained: quantize")
    files, weight_map = model_files(os.fspath(path))
    infos = read_headers(files, weight_map)
    shardings = None
    if mesh is not None:
        from nnjax.sharding import param_shardings

        shardings = param_shardings(template, mesh, rules or {"**": jax.sharding.PartitionSpec()})
    params = tensors_to_params(
        infos,
        lambda n: read_tensor(n, infos[n]),
        family_of(config.family, "config.json").table,
        config,
        template,
        dtype=dtype,
        shardings=shardings,
        quantize=quantize,
        read_rows=lambda n, a, b: read_rows(n, infos[n], a, b),
    )
    return config, params


def _generation_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: hf[k] for k in keys if hf.get(k) is not None}


def save_pretrained(
    path: str | os.PathLike,
    config: CausalLMConfig,
    params: Mapping[str, Any],
    *,
    max_shard_size: int | str = "5GB",
    merge_adapters: bool = True,
    tokenizer: Tokenizer | None = None,
) -> list[str]:
    """Write an HF model folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``config.json``, ``generation_config.json`` (when the config names special
    ids) and ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards of at
    most ``max_shard_size`` plus ``model.safetensors.index.json``. Tensors are produced
    and written one at a time (peak memory: about one tensor beyond the params,
    whatever the shard size), in the params' dtype.

    Args:
        path: the folder (created). Earlier weight files in it are replaced atomically:
            the new set is written beside them and moved in only when complete, so
            whatever fails, the folder holds a loadable model (the old or the new).
        config: the model's config; ``config.family`` picks the HF architecture.
        params: ``CausalLM(config)`` params.
        max_shard_size: bytes, or ``"500MB"`` / ``"2GiB"``.
        merge_adapters: fold LoRA / DoRA / IA3 adapters into the exported kernels
            (``False``: adapters are an error; save them with :func:`save_peft_adapter`).
        tokenizer: also write its files (``tokenizer.json``, ``tokenizer_config.json``
            with the special tokens and chat template, ``chat_template.jinja``; see
            ``Tokenizer.save``), after the weights, so the folder is complete on its
            own: ``AutoTokenizer.from_pretrained(path)`` reads it.

    Returns:
        The weight files written (names inside ``path``).

    Raises:
        CheckpointError: a family that cannot express the config, params that do not fit
            it, a dtype safetensors cannot hold; the folder's earlier files are kept then.

    Example:
        >>> config = nj.models.hf.config_from_hf({"model_type": "qwen2", "vocab_size": 100,
        ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4, "num_key_value_heads": 2})
        >>> params, _ = nj.models.CausalLM(config).init(key, jnp.zeros((1, 1), jnp.int32))
        >>> nj.models.hf.save_pretrained("qwen2-tiny", config, params, max_shard_size="64KB")
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """
    parse_size(max_shard_size)  # checked before any work
    check_bool(merge_adapters, "merge_adapters")
    tok = params["tok_embed"]
    hf = config_to_hf(
        config, dtype=str(np.dtype(tok.get("embedding_scale", tok["embedding"]).dtype))
    )
    table = family_of(config.family, "config.family").table
    tensors = params_to_tensors(params, table, config, param_template(config), merge=merge_adapters)
    folder = os.fspath(path)
    jsons = {"config.json": hf, "generation_config.json": _generation_config(hf)}
    written = save_model_folder(
        folder, tensors, max_shard_size, {k: v for k, v in jsons.items() if v}
    )
    if tokenizer is not None:
        tokenizer.save(folder)
    return written
