"""What the mixture-of-experts families share: expert tensor entries and config fields.

Mixtral, Qwen2-MoE and Qwen3-MoE are Llama-shaped decoders whose MLP is (on some or all
layers) a :func:`nnjax.layers.MoE`: a router ``blocks/{i}/mlp/router/kernel`` and
experts ``blocks/{i}/mlp/experts/{e}/{gate,up,down}/kernel``, saved by transformers one
``nn.Linear`` per expert (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnjax.core.errors import CheckpointError
from nnjax.models.hf.families.common import kinds_in, kinds_out, llama_entries
from nnjax.models.hf.tables import Entry

__all__ = ["attention_entries", "expert_entries", "dense_entries", "moe_in", "moe_out"]

_L, _B = "model.layers.{i}", "blocks/{i}"


def attention_entries() -> tuple[Entry, ...]:
    """The Llama entries without the dense MLP's (embeddings, norms, attention, head)."""
    return tuple(e for e in llama_entries() if ".mlp." not in e.hf)


def dense_entries() -> tuple[Entry, ...]:
    """The dense MLP of the layers without experts (present in a mixed stack only)."""
    return tuple(
        Entry(f"{_L}.mlp.{n}_proj.weight", (f"{_B}/mlp/{n}/kernel",), True, when="layer_types")
        for n in ("gate", "up", "down")
    )


def expert_entries(
    module: str = "mlp", names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> tuple[Entry, ...]:
    """The router and the experts: HF ``{module}.gate`` and ``{module}.experts.{e}.{name}``
    for nnjax's ``gate``, ``up``, ``down`` (Mixtral: ``block_sparse_moe``, ``w1, w3, w2``)."""
    router = Entry(
        f"{_L}.{module}.gate.weight", (f"{_B}/mlp/router/kernel",), True, when="num_experts"
    )
    return (
        router,
        *(
            Entry(
                f"{_L}.{module}.experts.{{e}}.{hf}.weight",
                (f"{_B}/mlp/experts/{{e}}/{ours}/kernel",),
                True,
                when="num_experts",
            )
            for hf, ours in zip(names, ("gate", "up", "down"), strict=True)
        ),
    )


def shared_entries() -> tuple[Entry, ...]:
    """Qwen2-MoE's shared expert and its gate."""
    experts = tuple(
        Entry(
            f"{_L}.mlp.shared_expert.{n}_proj.weight",
            (f"{_B}/mlp/shared_expert/{n}/kernel",),
            True,
            when="shared_expert_hidden",
        )
        for n in ("gate", "up", "down")
    )
    gate = Entry(
        f"{_L}.mlp.shared_expert_gate.weight",
        (f"{_B}/mlp/shared_expert_gate/kernel",),
        True,
        when="shared_expert_hidden",
    )
    return (*experts, gate)


def _aux_coef(hf: Mapping[str, Any]) -> float:
    # transformers adds the load-balancing loss to the loss only with output_router_logits
    return float(hf.get("router_aux_loss_coef", 0.001)) if hf.get("output_router_logits") else 0.0


def moe_in(
    hf: Mapping[str, Any], where: str, *, num_experts: int, moe_hidden: int
) -> dict[str, Any]:
    """The MoE fields, and Qwen-MoE's dense layers (``decoder_sparse_step``,
    ``mlp_only_layers``) as a ``dense`` layer kind."""
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise CheckpointError(
            f"{where}: router_jitter_noise = {hf['router_jitter_noise']} is not supported "
            "(nnjax's router has no jitter); set it to 0"
        )
    n = int(hf["num_hidden_layers"])
    step = int(hf.get("decoder_sparse_step") or 1)
    only = {int(i) for i in hf.get("mlp_only_layers") or ()}
    types = [
        "moe" if num_experts > 0 and i not in only and (i + 1) % step == 0 else "dense"
        for i in range(n)
    ]
    fields = {
        "num_experts": num_experts,
        "num_experts_per_tok": int(hf.get("num_experts_per_tok", 2)),
        "moe_hidden": moe_hidden,
        "normalize_top_k": bool(hf.get("norm_topk_prob", False)),
        "router_aux_loss_coef": _aux_coef(hf),
    }
    return {**fields, **kinds_in(types, {"dense": {"num_experts": 0}}, base="moe")}


def moe_out(c: Any) -> dict[str, Any]:
    """The inverse of :func:`moe_in` (dense layers written as ``mlp_only_layers``)."""
    types, configs = kinds_out(c, "moe" if c.num_experts else "dense")
    kinds = {t: cfg.num_experts > 0 for t, cfg in configs.items()}
    return {
        "num_experts_per_tok": c.num_experts_per_tok,
        "norm_topk_prob": c.normalize_top_k,
        "router_aux_loss_coef": c.router_aux_loss_coef or 0.001,
        "output_router_logits": c.router_aux_loss_coef > 0,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, t in enumerate(types) if not kinds[t]],
    }
