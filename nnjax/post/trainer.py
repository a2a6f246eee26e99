"""The preference trainer: ``nj.trainer`` over a policy that also scores the reference.

``preference_trainer(model, optimizer, loss="dpo", reference=...)`` wraps ``model`` in a
layer that runs the policy on both sides of each pair (one forward of ``2B`` rows) and
gives the reference policy's view, and hands it with the chosen preference loss to
:func:`nnjax.trainer`: the step, masks, accumulation, ``fit``, checkpoints and logs are
the trainer's own. Batches are :func:`nnjax.data.preference_batches`'s
``(inputs (B, 2, T), targets (B, 2, T))``.

Where the reference log-probabilities come from (one argument, ``reference``):

- ``"adapters"``: the same params with the adapter leaves left out
  (:func:`nnjax.finetune.remove_adapters`), for LoRA, DoRA and IA3 runs. Nothing is
  copied: the reference forward reads the very base weights the policy uses, so the
  memory cost is one more forward's activations (no gradient through it).
- a params tree: a separate reference model (full fine-tuning), kept in the train
  state's layer state (``ts.state["reference"]``, saved in checkpoints with it). It
  costs its own bytes; quantize it (:func:`nnjax.finetune.quantize`) to pay less.
- ``"precomputed"``: :func:`precompute_reference` scores the dataset once, before
  training, into ``inputs["reference_logps"]`` ``(N, 2)``; the step then runs no
  reference forward and holds no reference weights (8 bytes per pair).

SimPO and ORPO need no reference (``reference=None``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnjax.core.combinators import Layer
from nnjax.core.errors import ArgumentError, DataError
from nnjax.data.instruct import IGNORE_INDEX
from nnjax.finetune.adapters import remove_adapters
from nnjax.post.logprobs import sequence_logprobs
from nnjax.post.losses import PREFERENCE_LOSSES, PreferenceLoss
from nnjax.training.chunked import LazyLogits, reshape_logits, take_positions
from nnjax.training.trainer import TrainerFunctions, trainer

__all__ = [
    "preference_model",
    "preference_loss",
    "preference_trainer",
    "precompute_reference",
]

_MODEL_KEYS = ("ids", "positions", "segment_ids")
_KINDS = ("adapters", "precomputed", None)


def _kind(reference: Any) -> str | None:
    """``"adapters"``, ``"precomputed"``, ``None``, or ``"params"`` for a tree."""
    if isinstance(reference, Mapping):
        return "params"
    if reference in _KINDS:
        return reference
    raise ArgumentError(
        f"reference: expected 'adapters', 'precomputed', None or a params dict, got {reference!r}"
    )


def wrapper_state(model_state: Any, reference: Any) -> dict[str, Any]:
    """``{"model": ..., "reference": ...}`` without empty entries: the trainer drops empty
    dicts from a returned state (its auxiliary-loss channel strips them), so the state
    going in must not hold them either."""
    out = {}
    if jax.tree.leaves(model_state):
        out["model"] = model_state
    if jax.tree.leaves(reference):
        out["reference"] = reference
    return out


def reference_inputs(x: dict[str, Any], policy_logits: Any) -> dict[str, Any]:
    """The reference pass's inputs: ``x``, asking for lazy logits when the policy gave them.

    The reference runs in eval mode (no dropout), where a model gives full logits; a
    model whose training outputs are :class:`~nnjax.losses.LazyLogits` (``nj.models.CausalLM``)
    takes ``lazy_logits=True`` so the reference's log-probs are chunked too.
    """
    return {**x, "lazy_logits": True} if isinstance(policy_logits, LazyLogits) else x


def _rows(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    """The model's inputs ``(B, 2, T)`` as ``(2B, T)`` rows (chosen, rejected, chosen, ...)."""
    missing = [k for k in _MODEL_KEYS if k not in inputs]
    if missing:
        raise DataError(
            f"expected preference inputs with keys {list(_MODEL_KEYS)} (nj.data.preference_batches), "
            f"missing {missing}"
        )
    shape = np.shape(inputs["ids"])
    if len(shape) != 3 or shape[1] != 2:
        raise DataError(
            f"expected preference inputs of shape (B, 2, T) (chosen, rejected), got {shape}"
        )
    return {k: jnp.reshape(inputs[k], (-1, shape[2])) for k in _MODEL_KEYS}, shape[:2]


def _scored(logits: Any, index: Any, lead: tuple[int, ...]) -> Any:
    """``logits`` ``(2B, T, V)`` as ``(*lead, R, V)`` at ``index``, or all ``T`` without one."""
    if index is None:
        return reshape_logits(logits, lead)
    return take_positions(reshape_logits(logits, lead), index)


def _scored_targets(targets: Any, index: Any) -> Any:
    """``targets`` ``(B, 2, T)`` at ``index`` ``(B, 2, R)``; :data:`IGNORE_INDEX` on its padding."""
    if index is None:
        return targets
    index = jnp.asarray(index)
    picked = jnp.take_along_axis(jnp.asarray(targets), jnp.maximum(index, 0), axis=-1)
    return jnp.where(index >= 0, picked, IGNORE_INDEX)


def preference_model(model: Layer, reference: Any = "adapters") -> Layer:
    """``model`` as a layer scoring preference pairs: the policy's logits and the reference's.

    ``apply(params, state, inputs)`` takes ``inputs`` of ``(B, 2, T)`` arrays and returns
    ``{"logits": (B, 2, T, V)}`` plus ``"reference_logits"`` (``"adapters"`` or a tree) or
    ``"reference_logps"`` ``(B, 2)`` (``"precomputed"``, passed through from the inputs).
    With ``inputs["response_index"]`` ``(B, 2, R)`` (:func:`nnjax.data.load_preference`
    gives it) the logits are those of the response positions only, ``(B, 2, R, V)``,
    and the output carries the index as ``"response_index"``: a lazy head
    (:class:`~nnjax.losses.LazyLogits`) then runs over ``R`` positions, not ``T``.
    The state is ``{"model": model's state, "reference": the tree}``, each key only when
    not empty.

    Args:
        model: a language model layer taking ``{"ids", "positions", "segment_ids"}``.
        reference: ``"adapters"``, a params tree, ``"precomputed"`` or ``None`` (module doc).
    """
    kind = _kind(reference)

    def init(key, inputs):
        x, _ = _rows(inputs)
        params, state = model.init(key, x)
        return params, wrapper_state(state, {})

    def apply(params, state, inputs, *, rng=None, train=False):
        x, (b, _) = _rows(inputs)
        logits, model_state = model.apply(params, state.get("model", {}), x, rng=rng, train=train)
        t = np.shape(x["ids"])[-1]
        index = inputs.get("response_index")
        out = {"logits": _scored(logits, index, (b, 2, t))}
        if index is not None:
            out["response_index"] = jnp.asarray(index)
        if kind in ("adapters", "params"):
            ref = remove_adapters(params) if kind == "adapters" else state.get("reference", {})
            ref_x = reference_inputs(x, logits)
            ref_logits, _ = model.apply(jax.lax.stop_gradient(ref), state.get("model", {}), ref_x)
            ref_logits = jax.tree.map(jax.lax.stop_gradient, ref_logits)
            out["reference_logits"] = _scored(ref_logits, index, (b, 2, t))
        elif kind == "precomputed":
            if "reference_logps" not in inputs:
                raise DataError(
                    "reference='precomputed' needs inputs['reference_logps'] (B, 2): "
                    "build the data with nj.post.precompute_reference"
                )
            out["reference_logps"] = jnp.asarray(inputs["reference_logps"], jnp.float32)
        return out, wrapper_state(model_state, state.get("reference", {}))

    return Layer(init, apply, getattr(model, "name", "preference"))


def _pair_logps(logits: jax.Array, targets: jax.Array):
    """``(sum, mean, count)`` of each side, ``(B, 2)``."""
    b, _, t = targets.shape
    lp = sequence_logprobs(reshape_logits(logits, (2 * b, t)), jnp.reshape(targets, (2 * b, t)))
    return [jnp.reshape(v, (b, 2)) for v in lp]


def _check_options(entry: PreferenceLoss, name: str, options: Mapping[str, Any]) -> None:
    accepted = [
        p for p, v in inspect.signature(entry.fn).parameters.items() if v.kind == v.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ArgumentError(
            f"loss_options: {unknown} are not options of the {name!r} loss; it takes {accepted}"
        )


def preference_loss(loss: str = "dpo", **options: Any):
    """``loss_fn(outputs, targets) -> (loss, metrics)`` over :func:`preference_model` outputs.

    Computes each side's sequence log-probabilities (summed or per-token mean, as
    :data:`~nnjax.post.PREFERENCE_LOSSES` says) and calls the loss with ``options``
    (``beta=0.1``, ``label_smoothing=...``). A precomputed reference holds sums; the
    means are the sums over the response lengths.
    """
    if loss not in PREFERENCE_LOSSES:
        raise ArgumentError(f"loss: expected one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
    entry = PREFERENCE_LOSSES[loss]
    _check_options(entry, loss, options)

    def loss_fn(outputs, targets):
        targets = _scored_targets(targets, outputs.get("response_index"))
        total, mean, count = _pair_logps(outputs["logits"], targets)
        pick = total if entry.logps == "sum" else mean
        args = [pick[:, 0], pick[:, 1]]
        if entry.reference:
            if "reference_logits" in outputs:
                ref_total, ref_mean, _ = _pair_logps(outputs["reference_logits"], targets)
                ref = ref_total if entry.logps == "sum" else ref_mean
            elif "reference_logps" in outputs:
                ref = outputs["reference_logps"]
                if entry.logps == "mean":
                    ref = ref / jnp.maximum(count, 1).astype(ref.dtype)
            else:
                raise ArgumentError(
                    f"the {loss!r} loss needs a reference; reference=None gives none"
                )
            args += [ref[:, 0], ref[:, 1]]
        if entry.nll:
            args.append(-jnp.sum(total[:, 0]) / jnp.maximum(jnp.sum(count[:, 0]), 1))
        return entry.fn(*args, **options)

    return loss_fn


def preference_trainer(
    model: Layer,
    optimizer: optax.GradientTransformation,
    *,
    loss: str = "dpo",
    reference: Any = "adapters",
    loss_options: Mapping[str, Any] | None = None,
    **trainer_options: Any,
) -> TrainerFunctions:
    """A train step for preference pairs: :func:`nnjax.trainer` with a preference loss.

    Args:
        model: a language model layer (``nj.models.CausalLM``), its params with
            adapters for ``reference="adapters"``.
        optimizer: an optax ``GradientTransformation``.
        loss: ``"dpo"``, ``"ipo"``, ``"hinge"``, ``"simpo"`` or ``"orpo"``.
        reference: ``"adapters"`` (the params without adapters), a reference params
            tree, ``"precomputed"`` (``inputs["reference_logps"]``), or ``None``
            (SimPO, ORPO); see the module doc for what each costs.
        loss_options: keyword options of the loss (``{"beta": 0.1}``).
        **trainer_options: passed to :func:`nnjax.trainer` (``trainable``,
            ``accumulate``, ``steps_per_call``, ``compute_dtype``, ``metrics``,
            ``check_finite``, ...).

    Returns:
        :class:`~nnjax.TrainerFunctions`; ``init(params, state=None)`` puts a reference
        tree into the state (copied, as ``init`` copies params). The metrics are the
        loss's (``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ...).

    Raises:
        ArgumentError: an unknown loss or option, a reference the loss cannot use.

    Example:
        >>> import optax
        >>> cfg = nj.models.CausalLMConfig(vocab_size=256, hidden_size=16, num_heads=2,
        ...                                mlp_hidden=32, num_layers=1)
        >>> model = nj.models.CausalLM(cfg)
        >>> recs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
        >>> batch = next(nj.data.preference_batches(recs, nj.data.ByteTokenizer(), 8, 4, eos_id=0))
        >>> params, _ = model.init(key, batch[0]["ids"][:, 0])
        >>> params, mask = nj.finetune.add_lora(params, jax.random.key(1), "**/kernel", rank=2)
        >>> tr = nj.post.preference_trainer(model, optax.adam(1e-2), trainable=mask)
        >>> ts, m = tr.step(tr.init(params), batch)
        >>> float(m["rewards/margins"])  # the first step: policy == reference
        0.0
    """
    kind = _kind(reference)
    if loss not in PREFERENCE_LOSSES:
        raise ArgumentError(f"loss: expected one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
    if PREFERENCE_LOSSES[loss].reference and kind is None:
        raise ArgumentError(f"reference: the {loss!r} loss needs a reference, got None")
    if not PREFERENCE_LOSSES[loss].reference and kind not in (None, "adapters"):
        raise ArgumentError(f"reference: the {loss!r} loss takes no reference, got {reference!r}")
    if not PREFERENCE_LOSSES[loss].reference:
        kind = None
    wrapped = preference_model(model, reference if kind is not None else None)
    fns = trainer(
        wrapped, preference_loss(loss, **dict(loss_options or {})), optimizer, **trainer_options
    )
    tree = reference if kind == "params" else {}

    def init(params: Any, state: Any = None):
        return fns.init(params, wrapper_state({} if state is None else state, tree))

    return fns._replace(init=init)


def precompute_reference(
    model: Layer,
    reference_params: Any,
    inputs: Mapping[str, Any],
    targets: Any,
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Score every pair once with the reference: ``inputs`` plus ``"reference_logps"`` ``(N, 2)``.

    The summed log-probabilities of each side's response tokens under
    ``reference_params`` (pass ``nj.finetune.remove_adapters(params)`` for an adapter
    run), computed ``batch_size`` pairs at a time; train with
    ``preference_trainer(..., reference="precomputed")`` on
    ``nj.data.batches((new_inputs, targets), ...)``.

    Args:
        model: the language model layer.
        reference_params: its reference params (may be quantized).
        inputs, targets: :func:`nnjax.data.load_preference`'s arrays ``(N, 2, T)``.
        batch_size: pairs per forward pass.

    Returns:
        A new inputs dict (the arrays of ``inputs`` and ``reference_logps`` float32 ``(N, 2)``).
    """
    wrapped = preference_model(model, None)

    @jax.jit
    def score(params, x, t):
        out, _ = wrapped.apply(params, {}, x)
        return _pair_logps(out["logits"], _scored_targets(t, out.get("response_index")))[0]

    keys = [*_MODEL_KEYS, *(["response_index"] if "response_index" in inputs else [])]
    n = len(targets)
    sums = []
    for i in range(0, n, batch_size):
        x = {k: np.asarray(inputs[k][i : i + batch_size]) for k in keys}
        sums.append(np.asarray(score(reference_params, x, np.asarray(targets[i : i + batch_size]))))
    out = dict(inputs)
    out["reference_logps"] = np.concatenate(sums).astype(np.float32)
    return out
