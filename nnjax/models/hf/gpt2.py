"""GPT-2 checkpoints for :func:`nnjax.models.gpt.GPT` (``GPTConfig``), through the GPT-2 table.

GPT-2 is one family of the table-driven converter (:mod:`nnjax.models.hf.families`);
:func:`~nnjax.models.hf.from_pretrained` loads it as a ``CausalLM``. These functions
give the same weights as :func:`~nnjax.models.gpt.GPT` params (the same paths),
from a folder, a ``.safetensors`` file or a state dict, and back::

    config, params = nj.models.hf.load_gpt2("gpt2-folder")     # config.json + model.safetensors
    logits, _ = nj.models.GPT(config).apply(params, {}, ids)
    nj.models.hf.save_gpt2("out-folder", config, params)        # GPT2LMHeadModel.from_pretrained

GPT-2's ``Conv1D`` stores weights ``(in, out)`` as nnjax kernels do (no transpose);
``c_attn`` fuses query|key|value along ``out``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.errors import ArgumentError, CheckpointError
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.gpt import GPT, GPTConfig, causal_lm_config
from nnjax.models.hf.config_checks import check_config, read_json
from nnjax.models.hf.configs import config_from_hf, config_to_hf
from nnjax.models.hf.convert import params_to_tensors, tensors_to_params
from nnjax.models.hf.families.gpt2 import TABLE as GPT2
from nnjax.models.hf.files import TensorInfo, model_files, read_headers, read_tensor
from nnjax.models.hf.staging import save_model_folder
from nnjax.models.hf.torch_state import to_numpy

__all__ = ["gpt2_config", "gpt2_to_params", "params_to_gpt2", "load_gpt2", "save_gpt2"]

_PREFIX = "transformer."


def gpt2_config(hf_config: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a GPT-2 config (a ``config.json`` dict or a ``GPT2Config``).

    Dropout is 0 (set ``dataclasses.replace(cfg, dropout=...)`` to fine-tune with it).
    The config passes the checks :func:`~nnjax.models.hf.from_pretrained` makes (the GPT-2
    family's reader: field types and ranges, options GPT-2 in nnjax does not have), and
    ``causal_lm_config`` of the result is the config ``from_pretrained`` reads.

    Raises:
        CheckpointError: a size field is missing, or ``n_inner`` not a multiple of ``n_embd``.
        CheckpointError: a field ``from_pretrained`` refuses (named).
    """

    def get(name, default=None):
        if isinstance(hf_config, Mapping):
            return hf_config.get(name, default)
        return getattr(hf_config, name, default)

    def need(name):
        value = get(name)
        if value is None:
            raise CheckpointError(f"gpt2_config: the config has no {name!r}")
        return value

    for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        need(name)
    fields = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    config_from_hf({**fields, "model_type": "gpt2"})  # from_pretrained's checks, one reader
    n_embd = int(need("n_embd"))
    n_inner = get("n_inner") or 4 * n_embd
    if n_inner % n_embd:
        raise CheckpointError(
            f"gpt2_config: n_inner ({n_inner}) must be a multiple of n_embd ({n_embd})"
        )
    return GPTConfig(
        vocab_size=int(need("vocab_size")),
        block_size=int(need("n_positions")),
        n_layer=int(need("n_layer")),
        n_head=int(need("n_head")),
        n_embd=n_embd,
        dropout=0.0,
        mlp_ratio=n_inner // n_embd,
        bias=True,
        activation=str(get("activation_function", "gelu_new")),
        epsilon=float(get("layer_norm_epsilon", 1e-5)),
    )


def _causal(c: GPTConfig) -> CausalLMConfig:
    """The GPT-2 family's :class:`CausalLMConfig` of a :class:`GPTConfig` (the same weights)."""
    if not isinstance(c.activation, str):
        raise ArgumentError("GPT-2 export: the config's activation must be a name (gelu_new, ...)")
    return causal_lm_config(c)


def _template(config: GPTConfig) -> Any:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(GPT(config).init, jax.random.key(0), ids)[0]


def gpt2_to_params(state_dict: Mapping[str, Any], config: GPTConfig) -> dict[str, Any]:
    """:func:`~nnjax.models.gpt.GPT` params from a GPT-2 state dict.

    Args:
        state_dict: ``{name: tensor}`` with GPT-2's names, with or without the
            ``transformer.`` prefix (torch tensors or arrays); a ``lm_head.weight`` is
            ignored (GPT-2 ties it to ``wte.weight``, as transformers does).
        config: the model's config (:func:`gpt2_config`).

    Returns:
        Params for ``GPT(config)``, in the tensors' dtype.

    Raises:
        CheckpointError: a missing or unexpected tensor, a shape that does not fit
            (``tensor 'transformer.h.0.attn.c_attn.weight' -> ...: expected shape (32, 96),
            got (32, 64)``).
    """
    arrays = {}
    for name, value in state_dict.items():
        full = name if name.startswith(_PREFIX) or name == "lm_head.weight" else _PREFIX + name
        arrays[full] = to_numpy(value)
    infos = {n: TensorInfo("state dict", a.shape, a.dtype) for n, a in arrays.items()}
    return tensors_to_params(infos, arrays.__getitem__, GPT2, _causal(config), _template(config))


def params_to_gpt2(
    params: Mapping[str, Any],
    config: GPTConfig,
    *,
    prefix: str = _PREFIX,
    lm_head: bool = True,
) -> dict[str, np.ndarray]:
    """A GPT-2 state dict (NumPy arrays) from :func:`~nnjax.models.gpt.GPT` params.

    Adapters (LoRA, DoRA, IA3) beside a kernel are merged into it.

    Args:
        params: GPT params for ``config``.
        config: the model's config.
        prefix: put before every name but ``lm_head.weight`` (``""`` for ``GPT2Model``).
        lm_head: add ``lm_head.weight`` (the token table, tied).

    Returns:
        ``{name: array}`` in GPT-2's names and layouts (``torch.from_numpy`` each
        for ``model.load_state_dict``).

    Raises:
        CheckpointError: params that do not fit ``config``.
    """
    tensors = params_to_tensors(params, GPT2, _causal(config), _template(config))
    out = {prefix + t.name.removeprefix(_PREFIX): t.produce() for t in tensors}
    if lm_head:
        out["lm_head.weight"] = out[prefix + "wte.weight"]
    return out


def load_gpt2(source: Any, config: GPTConfig | None = None) -> tuple[GPTConfig, dict[str, Any]]:
    """Load a GPT-2 checkpoint into :func:`~nnjax.models.gpt.GPT` params, one tensor at a time.

    A thin alias: :func:`~nnjax.models.hf.from_pretrained` is the one way to load a
    model folder of any family, GPT-2 included; ``load_gpt2`` reads the same folder with
    the same config reader and checks (:func:`gpt2_config`) and returns a
    :class:`GPTConfig` for code written against ``nj.models.GPT``, and also takes a
    single ``.safetensors`` file or a state dict.

    Args:
        source: a ``save_pretrained`` folder (``config.json`` and ``model.safetensors``,
            sharded too), a ``.safetensors`` file, or a state dict ``{name: tensor}``.
        config: the model's config; default: read from the folder's ``config.json``
            (required for a file or a state dict).

    Returns:
        ``(config, params)``.

    Raises:
        CheckpointError: see :func:`gpt2_to_params`; a folder without weights.
        ArgumentError: no config for a file or state dict.

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
    if isinstance(source, Mapping):
        if config is None:
            raise ArgumentError("load_gpt2: pass config= (or a folder with config.json)")
        return config, gpt2_to_params(source, config)
    path = os.fspath(source)
    if os.path.isdir(path):
        if config is None:
            file = os.path.join(path, "config.json")
            hf = read_json(file)
            check_config(hf, None, file)
            config = gpt2_config(hf)
        files, weight_map = model_files(path)
    else:
        files, weight_map = [path], None
    if config is None:
        raise ArgumentError("load_gpt2: pass config= (or a folder with config.json)")
    infos = read_headers(files, weight_map)
    if not any(n.startswith(_PREFIX) for n in infos):  # saved from GPT2Model: no prefix
        infos = {_PREFIX + n: i for n, i in infos.items()}
        read = lambda n: read_tensor(n.removeprefix(_PREFIX), infos[n])
    else:
        read = lambda n: read_tensor(n, infos[n])
    params = tensors_to_params(infos, read, GPT2, _causal(config), _template(config))
    return config, params


def save_gpt2(directory: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any]) -> None:
    """Write ``config.json`` and ``model.safetensors`` as ``GPT2LMHeadModel.save_pretrained`` does.

    ``GPT2LMHeadModel.from_pretrained(directory)`` loads it (the head is tied, so
    ``lm_head.weight`` is not stored). Adapters are merged.

    Raises:
        CheckpointError: params that do not fit ``config``, a config GPT-2 cannot express.
    """
    causal = _causal(config)
    first = params["tok_embed"]["embedding"]
    hf = config_to_hf(causal, dtype=str(np.dtype(first.dtype)))
    hf["bos_token_id"] = hf["eos_token_id"] = None
    tensors = params_to_tensors(params, GPT2, causal, _template(config))
    save_model_folder(os.fspath(directory), tensors, 2**62, {"config.json": hf})
