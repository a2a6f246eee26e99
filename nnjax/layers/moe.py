"""Mixture of experts: a softmax top-k router, experts stacked on an axis of their own, dispatch.

``MoE(num_experts, top_k, features)`` maps ``(..., d) -> (..., d)``: each token goes
through the ``top_k`` experts its router picks (gated MLPs, as Mixtral and Qwen-MoE),
their outputs summed with the router's weights; optionally a shared expert every token
goes through, scaled by a sigmoid gate (Qwen2-MoE).

The experts' params are stacked under ``experts/stacked`` (leading axis ``E``), the key
``repeat`` uses, so each expert has a logical path of its own
(``moe/experts/3/gate/kernel``; inside a ``repeat`` ``blocks/2/moe/experts/3/gate/kernel``)
and globs, masks, LoRA, quantization and sharding rules select experts as they select
layers. An expert is the ordinary :func:`~nnjax.layers.transformer.MLP`, so adapters and
quantized kernels beside its kernels are used.

Dispatch (``dispatch=``):

- ``"sorted"`` (default): the ``(token, expert)`` pairs are sorted by expert and each
  expert's run padded to a multiple of a block of rows; a ``lax.scan`` over the blocks
  multiplies each block by its one expert's kernels. Every token is computed only through
  its chosen experts (plus padding of at most ``E * (block - 1)`` rows), no token is
  dropped. This is the CPU path: XLA:CPU lowers ``jax.lax.ragged_dot`` as a dense
  product masked per group (every row through every expert), measured 10x a plain
  matmul of the same rows. The block is 128 rows, fewer when there are few tokens per
  expert (decoding one token uses blocks of one row: the 2 chosen experts' kernels).
- ``"capacity"``: GShard's dispatch: each expert takes at most ``ceil(capacity_factor *
  tokens * top_k / E)`` tokens (later ones are dropped: their expert output is 0), the
  experts run as one batched product over ``(E, capacity, d)``. With an expert-parallel
  mesh (:func:`nnjax.sharding.expert_parallel_rules`: the ``E`` axis split over devices)
  this is the path to use: XLA's SPMD partitioner keeps each expert's product on the
  device holding it and moves tokens (all-to-all) instead of weights; the sorted path
  would gather each block's expert weights to every device.
- ``"dense"``: every token through every expert, weighted by the routing (zero for the
  experts not chosen): ``E / top_k`` times the work; a reference for tests and toy sizes.

The router's statistics go into the auxiliary-loss channel (:mod:`nnjax.core.aux`):
``state["aux"]["load_balance"]`` (``tokens``: fraction of tokens routed to each expert,
summed over the ``top_k`` slots; ``probs``: mean router probability; the loss is ``E *
sum(tokens * probs)``, transformers' ``load_balancing_loss_func``) and
``state["aux"]["router_z"]`` (``value``: mean squared log-sum-exp of the router logits),
each with its ``weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.aux import AUX
from nnjax.core.checks import check_keys, check_rank
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Initializer, Layer, call_child
from nnjax.core.paths import STACKED
from nnjax.layers.dense import Dense
from nnjax.layers.transformer import MLP

__all__ = ["MoE", "route", "DISPATCHES"]

DISPATCHES = ("sorted", "capacity", "dense")


def route(
    logits: jax.Array, top_k: int, *, normalize: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax top-k routing: ``(weights (N, k) float32, experts (N, k) int32, probs (N, E))``.

    ``probs = softmax(logits)`` in float32; ``experts`` are the ``top_k`` largest (ties to
    the lower index, as ``torch.topk``), ``weights`` their probabilities, renormalised to
    sum to one with ``normalize`` (Mixtral, Qwen3-MoE's ``norm_topk_prob``).

    Example:
        >>> w, e, p = nj.layers.route(jnp.array([[0.0, 2.0, 1.0]]), 2, normalize=True)
        >>> e.tolist(), [round(v, 3) for v in w[0].tolist()]
        ([[1, 2]], [0.731, 0.269])
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def _block_rows(m: int, num_experts: int, block: int) -> int:
    """Rows per block: ``block``, or the power of two below ``m / E`` when that is smaller."""
    per_expert = max(1, m // num_experts)
    return int(min(block, 2 ** int(math.log2(per_expert))))


def _take(tree: Any, e: jax.Array) -> Any:
    return jax.tree.map(lambda a: a[e], tree)


def _sorted(expert: Callable, params: Any, x, experts, weights, block: int):
    """Sorted, block-padded dispatch (see the module doc): ``(N, d) -> (N, d)``."""
    n, d = x.shape
    k = experts.shape[-1]
    num = jax.tree.leaves(params)[0].shape[0]
    m = n * k
    b = _block_rows(m, num, block)
    # A block holds one expert's rows; sum_e ceil(n_e / b) is at most this many blocks.
    nb = min(m, (m + min(num, m) * (b - 1)) // b)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (m,) pair index, grouped by expert
    sizes = jnp.bincount(flat, length=num)
    padded = (sizes + b - 1) // b * b
    pad_end = jnp.cumsum(padded)
    first = jnp.cumsum(sizes) - sizes
    sorted_e = flat[order]
    dest = pad_end[sorted_e] - padded[sorted_e] + jnp.arange(m) - first[sorted_e]
    src = jnp.full((nb * b,), m, jnp.int32).at[dest].set(order.astype(jnp.int32))
    token = jnp.where(src < m, src // k, n)  # padding rows read a zero row
    xs = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token].reshape(nb, b, d)
    block_e = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(nb) * b, side="right"), num - 1)

    def body(_, xs_e):
        xb, e = xs_e
        return None, expert(_take(params, e), xb)

    _, ys = jax.lax.scan(body, None, (xs, block_e))
    row_of_pair = jnp.zeros((m,), jnp.int32).at[order].set(dest.astype(jnp.int32))
    ys = ys.reshape(nb * b, d)[row_of_pair].reshape(n, k, d)
    return jnp.sum(ys * weights[..., None].astype(ys.dtype), axis=1)


def _capacity(expert: Callable, params: Any, x, experts, weights, factor: float):
    """GShard dispatch with a capacity per expert; pairs over it are dropped."""
    n, d = x.shape
    k = experts.shape[-1]
    num = jax.tree.leaves(params)[0].shape[0]
    cap = max(1, min(n * k, math.ceil(factor * n * k / num)))
    # Slot-major priority (every token's first choice before any second choice), as GShard.
    flat = experts.T.reshape(-1)  # (k * n,)
    onehot = jax.nn.one_hot(flat, num, dtype=jnp.int32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # rank within its expert
    keep = pos < cap
    token = jnp.tile(jnp.arange(n), k)
    slot = jnp.where(keep, pos, cap)  # cap: out of range, dropped by the scatter
    buf = jnp.zeros((num, cap, d), x.dtype).at[flat, slot].set(x[token], mode="drop")
    ys = jax.vmap(expert)(params, buf)  # (E, cap, d)
    out = ys.at[flat, slot].get(mode="fill", fill_value=0)  # (k * n, d)
    w = (weights.T.reshape(-1) * keep).astype(out.dtype)
    return jnp.sum((out * w[:, None]).reshape(k, n, d), axis=0)


def _dense(expert: Callable, params: Any, x, experts, weights):
    """Every token through every expert, weighted by the routing (0 for unchosen experts)."""
    num = jax.tree.leaves(params)[0].shape[0]
    ys = jax.vmap(expert, in_axes=(0, None))(params, x)  # (E, N, d)
    combine = jnp.sum(jax.nn.one_hot(experts, num, dtype=weights.dtype) * weights[..., None], 1)
    return jnp.einsum("end,ne->nd", ys, combine.astype(ys.dtype))


def MoE(
    num_experts: int,
    top_k: int,
    features: int,
    *,
    normalize_top_k: bool = False,
    shared_features: int | None = None,
    shared_gate: bool = True,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    dispatch: str = "sorted",
    block_size: int = 128,
    capacity_factor: float = 1.25,
    aux_loss_weight: float = 0.0,
    z_loss_weight: float = 0.0,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "moe",
) -> Layer:
    """A mixture of gated-MLP experts with a softmax top-k router, ``(..., d) -> (..., d)``.

    ``y = sum_{e in top_k(x)} w_e(x) * expert_e(x)`` with ``w = softmax(x @ router)`` at
    the chosen experts (renormalised with ``normalize_top_k``), plus
    ``sigmoid(x @ shared_expert_gate) * shared_expert(x)`` with ``shared_features``.
    Each expert is ``down(activation(gate(x)) * up(x))``. See the module doc for the
    dispatches and the auxiliary statistics.

    Args:
        num_experts: ``E``.
        top_k: experts per token.
        features: each expert's hidden width (HF ``moe_intermediate_size``).
        normalize_top_k: renormalise the chosen probabilities to sum to one (Mixtral;
            HF ``norm_topk_prob``).
        shared_features: the hidden width of a shared expert every token goes through
            (Qwen2-MoE); ``None``: none.
        shared_gate: scale the shared expert by ``sigmoid(x @ shared_expert_gate)``.
        activation: the experts' nonlinearity.
        dispatch: ``"sorted"``, ``"capacity"`` or ``"dense"`` (module doc).
        block_size: rows per block of the sorted dispatch.
        capacity_factor: the capacity dispatch's slack over an even split.
        aux_loss_weight: weight of the load-balancing loss in the objective (HF
            ``router_aux_loss_coef``); 0 reports it as a metric only.
        z_loss_weight: weight of the router z-loss (ST-MoE); 0 reports it only.
        kernel_init, dtype, param_dtype: for every Dense and expert.
        name: default name in a combinator.

    Params:
        router: ``kernel (d, E)``.
        experts/stacked: ``gate``, ``up`` ``kernel (E, d, features)``, ``down`` ``kernel
            (E, features, d)``; logical paths ``experts/{e}/gate/kernel``.
        shared_expert: ``gate``, ``up``, ``down`` kernels (with ``shared_features``);
        shared_expert_gate: ``kernel (d, 1)`` (with ``shared_gate``).

    State (returned by apply; init gives ``{}``): ``aux`` (see :mod:`nnjax.core.aux`).

    Raises:
        ArgumentError: ``top_k`` outside ``[1, num_experts]``, an unknown dispatch.
        LayerError: input without a feature axis, params of another structure.

    Example:
        >>> moe = nj.layers.MoE(4, 2, 16)
        >>> params, state = moe.init(key, jnp.zeros((2, 5, 8)))
        >>> jax.tree.map(jnp.shape, params["experts"]["stacked"]["gate"])
        {'kernel': (4, 8, 16)}
        >>> y, state = moe.apply(params, state, jnp.ones((2, 5, 8)))
        >>> y.shape, sorted(state["aux"])
        ((2, 5, 8), ['load_balance', 'router_z'])
    """
    if not 1 <= top_k <= num_experts:
        raise ArgumentError(f"MoE: top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if dispatch not in DISPATCHES:
        raise ArgumentError(f"MoE: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    dense_kw: dict[str, Any] = dict(
        use_bias=False, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype
    )
    router = Dense(num_experts, **dense_kw)
    expert = MLP(features, gated=True, activation=activation, **dense_kw)
    shared = (
        None
        if shared_features is None
        else MLP(shared_features, gated=True, activation=activation, **dense_kw)
    )
    gate = Dense(1, **dense_kw) if shared is not None and shared_gate else None
    keys = ["router", "experts"] + ([] if shared is None else ["shared_expert"])
    keys += [] if gate is None else ["shared_expert_gate"]

    def init(key, x):
        check_rank(x, 1, "(..., d)")
        k_router, k_experts, k_shared, k_gate = jax.random.split(key, 4)
        params = {"router": call_child("router", router.init, k_router, x)[0]}
        one = jax.ShapeDtypeStruct((1, np.shape(x)[-1]), jnp.result_type(x))
        stacked = jax.vmap(lambda k: expert.init(k, one)[0])(
            jax.random.split(k_experts, num_experts)
        )
        params["experts"] = {STACKED: stacked}
        if shared is not None:
            params["shared_expert"] = call_child("shared_expert", shared.init, k_shared, x)[0]
        if gate is not None:
            params["shared_expert_gate"] = call_child("shared_expert_gate", gate.init, k_gate, x)[0]
        return params, {}

    def run_expert(p, h):
        return expert.apply(p, {}, h)[0]

    def run_dispatch(stacked, h, chosen, weights):
        if dispatch == "sorted":
            return _sorted(run_expert, stacked, h, chosen, weights, block_size)
        if dispatch == "capacity":
            return _capacity(run_expert, stacked, h, chosen, weights, capacity_factor)
        return _dense(run_expert, stacked, h, chosen, weights)

    def apply(params, state, x, *, rng=None, train=False):
        del rng, train
        check_rank(x, 1, "(..., d)")
        check_keys(params, keys)
        check_keys(params["experts"], [STACKED], kind="param")
        check_keys(state, [], [AUX], kind="state")
        lead, d = np.shape(x)[:-1], np.shape(x)[-1]
        h = jnp.reshape(x, (-1, d))
        logits, _ = call_child("router", router.apply, params["router"], {}, h)  # (N, E)
        weights, chosen, probs = route(logits, top_k, normalize=normalize_top_k)
        stacked = params["experts"][STACKED]
        if jax.tree.leaves(stacked)[0].shape[0] != num_experts:
            raise LayerError(
                f"experts: expected {num_experts} stacked experts, got "
                f"{jax.tree.leaves(stacked)[0].shape[0]}"
            )
        y = call_child("experts", run_dispatch, stacked, h, chosen, weights)
        if shared is not None:
            s, _ = call_child("shared_expert", shared.apply, params["shared_expert"], {}, h)
            if gate is not None:
                g, _ = call_child(
                    "shared_expert_gate", gate.apply, params["shared_expert_gate"], {}, h
                )
                s = jax.nn.sigmoid(g) * s
            y = y + s.astype(y.dtype)
        n = h.shape[0]
        counts = jnp.zeros((num_experts,), jnp.float32).at[chosen.reshape(-1)].add(1.0)
        z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        aux = {
            "load_balance": {
                "tokens": counts / n,
                "probs": jnp.mean(probs, axis=0),
                "weight": jnp.asarray(aux_loss_weight, jnp.float32),
            },
            "router_z": {
                "value": jnp.mean(jnp.square(z)),
                "weight": jnp.asarray(z_loss_weight, jnp.float32),
            },
        }
        return jnp.reshape(y, (*lead, d)), {AUX: aux}

    return Layer(init, apply, name)
