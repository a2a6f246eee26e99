"""CausalLM with mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers.

The transformers models are tiny and random (tests/hf_moe.py, eager attention, 3
layers, Mixtral's window shorter than the sequence); their weights are copied by the
test's own mapping. References: transformers' float32 logits, its greedy ``generate``,
and its ``aux_loss`` with ``output_router_logits=True``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.core import aux
from tests import hf_moe

pytest.importorskip("transformers", reason="transformers builds the reference models")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {f: hf_moe.build(f) for f in hf_moe.FAMILIES}


def _ours(model):
    return hf_moe.config_of(model), jax.tree.map(jnp.asarray, hf_moe.params_of(model))


@pytest.mark.parametrize("family", hf_moe.FAMILIES)
def test_logits_and_aux_loss_equal_transformers(family, models):
    model = models[family]
    config, params = _ours(model)
    ids = hf_moe.ids((2, hf_moe.SEQ))
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_router_logits=True)
    logits, state = jax.jit(nj.models.CausalLM(config).apply)(params, {}, ids)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), rtol=2e-4, atol=2e-4)
    _, metrics = aux.losses(state)
    np.testing.assert_allclose(float(metrics["aux/load_balance"]), float(out.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("family", hf_moe.FAMILIES)
def test_greedy_generate_equals_transformers(family, models):
    model = models[family]
    config, params = _ours(model)
    prompt = hf_moe.ids((2, 5), seed=1)
    want = hf_moe.greedy(model, prompt)
    got = np.asarray(nj.models.generate(config, params, prompt, 8, temperature=0.0))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)


@pytest.mark.parametrize("replicas", [1, 2])
def test_training_objective_is_transformers_loss_with_aux(models, replicas):
    """The trainer's objective (task loss + coef * load balance) and its router gradient
    equal torch's cross-entropy + coef * transformers' ``aux_loss``, differentiated by torch;
    with ``replicas=2`` too (each row its own replica: the load-balance statistics are
    means over tokens, averaged over the replicas)."""
    model = models["qwen2_moe"]
    config, params = _ours(model)
    config = dataclasses.replace(config, router_aux_loss_coef=0.3)
    ids = hf_moe.ids((2, hf_moe.SEQ), seed=4)
    x, y = ids[:, :-1], ids[:, 1:]
    lm = nj.models.CausalLM(config)
    tr = nj.trainer(lm, nj.losses.softmax_cross_entropy, optax.sgd(1.0), replicas=replicas)
    ts, m = tr.step(tr.init(params), (x, y))
    model.zero_grad()
    out = model(torch.from_numpy(x).long(), output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]), torch.from_numpy(y).long().reshape(-1)
    )
    (ce + 0.3 * out.aux_loss).backward()
    np.testing.assert_allclose(float(m["loss"]), float(ce.detach()), rtol=1e-5)
    np.testing.assert_allclose(
        float(m["aux/load_balance"]), float(out.aux_loss.detach()), rtol=1e-5
    )
    router = params["blocks"]["stacked"]["mlp"]["router"]["kernel"]
    got = router - ts.params["blocks"]["stacked"]["mlp"]["router"]["kernel"]  # sgd(1.0)
    for i in range(config.num_layers):
        want = model.model.layers[i].mlp.gate.weight.grad.numpy().T
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-3, atol=1e-6)
