import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax import finetune as ft

X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)


def _model(n_blocks, classes):
    block = nj.residual(ln=nj.LayerNorm(), fc=nj.Dense(6), act=jnp.tanh)
    return nj.serial(blocks=nj.repeat(block, n_blocks), head=nj.Dense(classes))


def _init(n_blocks, classes, seed):
    return _model(n_blocks, classes).init(jax.random.key(seed), X)[0]


def _same(a, b):
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_load_pretrained_exact_copies_everything():
    old, new = _init(2, 10, 0), _init(2, 10, 1)
    params, rep = ft.load_pretrained(new, old)
    assert rep.ok and not rep.missing and len(rep.loaded) == len(nj.leaf_paths(old))
    for path, v in nj.paths.flatten(old).items():
        assert _same(nj.paths.flatten(params)[path], v), path


def test_strict_load_lists_missing_unexpected_and_mismatched():
    old = _init(2, 10, 0)
    old = {**old, "extra": {"kernel": jnp.zeros((2, 2))}}
    new = _init(3, 5, 1)
    with pytest.raises(nj.CheckpointError, match="strict=True") as err:
        ft.load_pretrained(new, old)
    msg = str(err.value)
    assert "missing (4, kept as initialised): blocks/2/" in msg
    assert "unexpected (1, ignored): extra/kernel" in msg
    assert (
        "mismatched shape (2, kept as initialised): head/kernel new (6, 5) vs pretrained (6, 10)"
        in msg
    )


def test_non_strict_load_into_a_deeper_model_with_a_new_head():
    old, new = _init(2, 10, 0), _init(3, 5, 1)
    params, rep = ft.load_pretrained(new, old, strict=False)
    assert sorted(rep.missing) == sorted(
        f"blocks/2/{p}" for p in ("fc/bias", "fc/kernel", "ln/bias", "ln/scale")
    )
    assert rep.mismatched == [("head/kernel", (6, 5), (6, 10)), ("head/bias", (5,), (10,))]
    k_old, k_new, k = (t["blocks"]["stacked"]["fc"]["kernel"] for t in (old, new, params))
    assert _same(k[:2], k_old) and _same(k[2], k_new[2])
    assert _same(params["head"]["kernel"], new["head"]["kernel"])
    y, _ = _model(3, 5).apply(params, {}, X)
    assert y.shape == (4, 5)


def test_load_casts_to_the_new_dtype():
    old = {"dense": {"kernel": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)}}
    new = {"dense": {"kernel": jnp.zeros((2, 3), jnp.bfloat16)}}
    params, _ = ft.load_pretrained(new, old)
    assert params["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        params["dense"]["kernel"].astype(np.float32), old["dense"]["kernel"]
    )


def test_replace_head_keeps_the_backbone():
    old = _init(2, 10, 0)
    params = ft.replace_head(
        old, jax.random.key(5), nj.Dense(5), jax.ShapeDtypeStruct((1, 6), jnp.float32)
    )
    assert jax.tree.map(jnp.shape, params["head"]) == {"kernel": (6, 5), "bias": (5,)}
    assert params["blocks"] is not None and _same(
        params["blocks"]["stacked"]["fc"]["kernel"], old["blocks"]["stacked"]["fc"]["kernel"]
    )
    assert old["head"]["kernel"].shape == (6, 10)  # the old tree is untouched
    expected, _ = nj.Dense(5).init(jax.random.key(5), jnp.zeros((1, 6)))
    assert _same(params["head"]["kernel"], expected["kernel"])
    y, _ = _model(2, 5).apply(params, {}, X)
    assert y.shape == (4, 5)
    with pytest.raises(
        nj.GlobError, match=r"no sub-tree 'classifier' in params; keys there: \['blocks', 'head'\]"
    ):
        ft.replace_head(old, jax.random.key(5), nj.Dense(5), jnp.zeros((1, 6)), path="classifier")
