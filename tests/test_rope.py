"""Rotary embeddings against transformers' own rotary classes and apply_rotary_pos_emb."""

import jax.numpy as jnp
import numpy as np
import pytest

from nnjax.layers.rope import apply_rotary, cos_sin, rope_frequencies

HEAD_DIM, MAX_POS = 16, 32
VARIANTS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "mscale": 0.7,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
    },
}


def _hf_rotary(variant, theta=500.0, partial=1.0):
    import transformers as tr
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    params = {**VARIANTS[variant], "rope_theta": theta, "partial_rotary_factor": partial}
    config = tr.GPTNeoXConfig(
        hidden_size=HEAD_DIM * 2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POS,
        rope_parameters=params,
    )
    return GPTNeoXRotaryEmbedding(config), params


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_frequencies_and_cos_sin_match_transformers(torch, variant, partial):
    ref, params = _hf_rotary(variant, partial=partial)
    rot = rope_frequencies(
        HEAD_DIM, theta=500.0, partial_rotary_factor=partial, scaling=params, max_position=MAX_POS
    )
    assert rot.rotary_dim == int(HEAD_DIM * partial)
    np.testing.assert_allclose(rot.inv_freq, ref.original_inv_freq.numpy(), rtol=1e-6)
    assert rot.attention_scaling == pytest.approx(ref.attention_scaling)
    # dynamic: positions past max_position_embeddings grow the base (both sides)
    for length in (MAX_POS // 2, 3 * MAX_POS):
        positions = np.arange(length)[None]
        x = torch.zeros(1, 1, length, HEAD_DIM)
        cos_ref, sin_ref = ref(x, torch.from_numpy(positions))
        cos, sin = cos_sin(rot, jnp.asarray(positions))
        np.testing.assert_allclose(cos, cos_ref.numpy(), rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(sin, sin_ref.numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rotary_matches_rotate_half_convention(torch, partial):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    ref, params = _hf_rotary("llama3", partial=partial)
    rot = rope_frequencies(
        HEAD_DIM, theta=500.0, partial_rotary_factor=partial, scaling=params, max_position=MAX_POS
    )
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 3, HEAD_DIM)).astype(np.float32)  # (N, T, heads, hd)
    positions = np.stack([np.arange(5), np.arange(7, 12)]).astype(np.int32)
    cos, sin = ref(torch.zeros(1), torch.from_numpy(positions))
    qt = torch.from_numpy(q).transpose(1, 2)  # HF: (N, heads, T, hd)
    expected, _ = apply_rotary_pos_emb(qt, qt, cos, sin)
    got = apply_rotary(jnp.asarray(q), jnp.asarray(positions), rot)
    np.testing.assert_allclose(got, expected.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match=r"rope_type must be one of .* got 'longrope'"):
        rope_frequencies(8, scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match=r"rope_type 'llama3' needs the key 'low_freq_factor'"):
        rope_frequencies(8, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"must be an even number >= 2, got 8 \* 0.25 = 2|even"):
        rope_frequencies(8, partial_rotary_factor=0.1)
