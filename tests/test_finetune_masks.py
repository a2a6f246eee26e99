import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax import finetune as ft
from nnjax.training.losses import mse
from nnjax.training.trainer import trainer


def _shapes_params():
    """A params tree of zeros: an embedding, 3 stacked blocks, a final norm and a head."""
    shapes = {
        "embed": {"kernel": (4, 8), "bias": (8,)},
        "blocks": {
            "stacked": {
                "ln_1": {"scale": (3, 8), "bias": (3, 8)},
                "attn": {"query": {"kernel": (3, 8, 8), "bias": (3, 8)}},
            }
        },
        "ln_f": {"scale": (8,), "bias": (8,)},
        "head": {"kernel": (8, 2), "bias": (2,)},
    }
    return jax.tree.map(jnp.zeros, shapes, is_leaf=lambda s: isinstance(s, tuple))


def _model():
    block = nj.residual(ln=nj.LayerNorm(), fc=nj.Dense(8), act=jnp.tanh)
    return nj.serial(embed=nj.Dense(8), blocks=nj.repeat(block, 3), head=nj.Dense(2))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    return x, y


def _bits(x):
    return np.asarray(x).tobytes()


def test_mask_include_exclude_and_stacked_copies():
    p = _shapes_params()
    m = ft.mask(p, include="**", exclude=["blocks/0/**", "embed/**"])
    assert m["embed"] == {"kernel": False, "bias": False}
    assert m["head"] == {"kernel": True, "bias": True}
    np.testing.assert_array_equal(
        m["blocks"]["stacked"]["attn"]["query"]["kernel"], [False, True, True]
    )
    assert m["blocks"]["stacked"]["attn"]["query"]["kernel"].dtype == np.bool_
    # every copy selected collapses to a plain bool
    assert ft.mask(p, "blocks/*/ln_1/*")["blocks"]["stacked"]["ln_1"] == {
        "scale": True,
        "bias": True,
    }
    assert jax.tree.structure(ft.mask(p)) == jax.tree.structure(p)


def test_mask_glob_matching_nothing_lists_near_paths():
    p = _shapes_params()
    with pytest.raises(
        nj.GlobError,
        match=r"include glob 'haed/\*\*' matches no parameter path; near paths: \['head/",
    ):
        ft.mask(p, "haed/**")
    with pytest.raises(nj.GlobError, match=r"exclude glob 'blocks/7/\*\*' matches no"):
        ft.mask(p, "**", exclude="blocks/7/**")


def test_union_intersect_invert_per_copy():
    p = _shapes_params()
    a = ft.mask(p, ["blocks/0/**", "head/**"])
    b = ft.mask(p, ["blocks/1/**", "head/kernel"])
    q = lambda m: m["blocks"]["stacked"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(q(ft.union(a, b)), [True, True, False])
    assert q(ft.intersect(a, b)) is False
    assert ft.intersect(a, b)["head"] == {"kernel": True, "bias": False}
    np.testing.assert_array_equal(q(ft.invert(a)), [False, True, True])
    assert ft.invert(ft.mask(p)) == jax.tree.map(lambda _: False, p)


def test_report_counts_and_bytes_against_hand_count():
    p = _shapes_params()
    m = ft.mask(p, ["blocks/2/**", "head/**"])
    rep = ft.report(p, m)
    groups = {g.group: g for g in rep.groups}
    per_block = 8 + 8 + 64 + 8  # ln scale, ln bias, query kernel, query bias
    assert groups["blocks"] == ("blocks", per_block, 2 * per_block, 4 * per_block, 8 * per_block)
    assert groups["head"] == ("head", 18, 0, 72, 0)
    assert groups["embed"] == ("embed", 0, 40, 0, 160)
    total_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
    assert rep.total.trainable == per_block + 18 == ft.trainable_count(p, m)
    assert rep.total.trainable + rep.total.frozen == total_count
    assert ft.trainable_bytes(p, m) == 4 * (per_block + 18)
    text = str(rep)
    assert text.splitlines()[0].split() == [
        "group",
        "trainable",
        "frozen",
        "trainable",
        "bytes",
        "frozen",
        "bytes",
        "trainable",
        "%",
    ]
    assert "total" in text.splitlines()[-1] and f"{total_count - per_block - 18:,}" in text


def test_report_rejects_a_mask_of_the_wrong_copies():
    p = _shapes_params()
    m = ft.mask(p)
    m["blocks"]["stacked"]["ln_1"]["scale"] = np.array([True, False])
    with pytest.raises(
        nj.MaskError, match=r"over the 1 stacked axes .* \(shape \(3, 8\)\), got shape \(2,\)"
    ):
        ft.report(p, m)


def test_presets():
    p = _shapes_params()
    assert ft.head_only(p) == ft.mask(p, "head/**")
    bit = ft.bias_only(p)
    assert bit["head"] == {"kernel": False, "bias": True}
    assert bit["blocks"]["stacked"]["attn"]["query"] == {"kernel": False, "bias": True}
    norms = ft.norms_only(p)
    assert norms["ln_f"] == {"scale": True, "bias": True}
    assert norms["blocks"]["stacked"]["ln_1"] == {"scale": True, "bias": True}
    assert ft.trainable_count(p, norms) == 16 + 3 * 16
    with pytest.raises(nj.GlobError, match="norms_only: no norm parameters"):
        ft.norms_only({"dense_0": {"kernel": jnp.zeros((2, 2))}})
    last = ft.last_k_blocks(p, 2, also="head/**")
    np.testing.assert_array_equal(last["blocks"]["stacked"]["ln_1"]["scale"], [False, True, True])
    assert last["head"]["kernel"] is True and last["embed"]["kernel"] is False
    with pytest.raises(ValueError, match=r"expected 1 <= k <= 3"):
        ft.last_k_blocks(p, 4)


def test_last_k_blocks_unstacked_orders_by_number():
    z = jnp.zeros((2,))
    p = {"blocks": {f"block_{i}": {"bias": z} for i in (0, 1, 2, 10, 11)}}
    m = ft.last_k_blocks(p, 2)
    assert [k for k, v in m["blocks"].items() if v["bias"]] == ["block_10", "block_11"]
    assert ft.block_names(p) == ["block_0", "block_1", "block_2", "block_10", "block_11"]


def test_progressive_unfreezing_schedule():
    p = _shapes_params()
    sched = ft.progressive_unfreezing(
        p, ["head/**", "blocks/2/**", ["blocks/1/**", "ln_f/**"]], every=2
    )
    q = lambda m: m["blocks"]["stacked"]["attn"]["query"]["kernel"]
    assert sched(0) == sched(1) == ft.head_only(p)
    np.testing.assert_array_equal(q(sched(2)), [False, False, True])
    np.testing.assert_array_equal(q(sched(4)), [False, True, True])
    assert sched(4)["ln_f"]["scale"] is True and sched(99)["head"]["kernel"] is True
    assert sched(4)["embed"]["kernel"] is False
    with pytest.raises(nj.GlobError):
        ft.progressive_unfreezing(p, ["head/**", "nothing/**"])


@pytest.mark.parametrize(
    "tx", [optax.adam(1e-2), optax.adamw(1e-2, weight_decay=0.5)], ids=["adam", "adamw"]
)
def test_trainer_keeps_frozen_leaves_bit_identical_and_moves_trainable(tx):
    model = _model()
    x, y = _data()
    params, state = model.init(jax.random.key(0), x)
    m = ft.union(ft.bias_only(params), ft.head_only(params))
    tr = trainer(model, mse, tx, trainable=m)  # AdamW never decays a frozen leaf
    ts = tr.init(params, state)
    for _ in range(5):
        ts, _ = tr.step(ts, (x, y))
    flat_m, flat_old, flat_new = (nj.paths.flatten(t) for t in (m, params, ts.params))
    for path, trainable in flat_m.items():
        same = _bits(flat_old[path]) == _bits(flat_new[path])
        assert same != trainable, path


def test_adam_state_bytes_are_twice_the_trainable_bytes():
    model = _model()
    x, _ = _data()
    params, state = model.init(jax.random.key(0), x)
    m = ft.mask(params, "**", exclude="blocks/**")
    tr = trainer(model, mse, optax.adam(1e-3), trainable=m)
    ts = tr.init(params, state)
    float_bytes = sum(
        leaf.nbytes
        for leaf in jax.tree.leaves(ts.opt_state)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    )
    hand = 4 * (4 * 8 + 8 + 8 * 2 + 2)  # embed and head, float32
    assert ft.trainable_bytes(params, m) == hand
    assert float_bytes == 2 * hand


def test_trainer_with_stacked_copy_mask_keeps_other_copies():
    model = _model()
    x, y = _data()
    params, state = model.init(jax.random.key(0), x)
    m = ft.last_k_blocks(params, 1)
    tr = trainer(model, mse, optax.sgd(1e-1), trainable=m)
    ts = tr.init(params, state)
    for _ in range(3):
        ts, _ = tr.step(ts, (x, y))
    old = params["blocks"]["stacked"]["fc"]["kernel"]
    new = ts.params["blocks"]["stacked"]["fc"]["kernel"]
    assert _bits(old[:2]) == _bits(new[:2])
    assert not np.allclose(old[2], new[2])
    assert _bits(params["head"]["kernel"]) == _bits(ts.params["head"]["kernel"])


@pytest.mark.parametrize("bits", [8, 4])
def test_report_counts_logical_parameters_of_quantized_kernels(bits):
    """A quantized model has the float model's parameter count (an NF4 byte holds two
    values, scales are not parameters); its bytes are what the leaves store."""
    model = nj.serial(nj.Dense(7), head=nj.Dense(3))
    p, _ = model.init(jax.random.key(0), jnp.zeros((1, 5)))
    q = ft.quantize(p, "dense_0/kernel", bits=bits)
    m = ft.mask(q, "head/**")
    float_rep, rep = ft.report(p, ft.mask(p, "head/**")), ft.report(q, m)
    assert rep.total.trainable + rep.total.frozen == 5 * 7 + 7 + 7 * 3 + 3
    assert rep.total[:3] == float_rep.total[:3]
    stored = sum(x.nbytes for x in jax.tree.leaves(q))
    assert rep.total.trainable_bytes + rep.total.frozen_bytes == stored
