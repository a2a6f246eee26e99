"""Combinators: naming, composition, repeat, remat, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nnjax as nj


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_serial_names_children_by_kind_then_keyword():
    model = nj.serial(
        nj.Dense(8), jax.nn.relu, nj.Dense(8), nj.LayerNorm(), nj.Dense(4), head=nj.Dense(3)
    )
    params, state = model.init(jax.random.key(0), jnp.zeros((2, 5)))
    assert list(params) == ["dense_0", "dense_1", "layernorm_0", "dense_2", "head"]
    assert state == {}
    assert _shapes(params["dense_1"]) == {"kernel": (8, 8), "bias": (8,)}


def test_serial_equals_manual_composition():
    d1, d2 = nj.Dense(6), nj.Dense(3)
    model = nj.serial(d1, jnp.tanh, d2)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    params, state = model.init(jax.random.key(0), x)
    y, _ = model.apply(params, state, x)
    p0, p1 = jax.tree.map(np.asarray, (params["dense_0"], params["dense_1"]))
    h = np.tanh(np.asarray(x) @ p0["kernel"] + p0["bias"])
    expected = h @ p1["kernel"] + p1["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_init_makes_no_real_forward_pass():
    # eval_shape of init on a model far too large to allocate (~69 GB of float32).
    big = nj.serial(
        nj.Dense(16384), nj.Dense(16384), nj.Dense(16384), blocks=nj.repeat(nj.Dense(16384), 60)
    )
    params, _ = jax.eval_shape(
        big.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16384), jnp.float32)
    )
    assert nj.count_params(params) == 63 * (16384 * 16384 + 16384)


def test_fan_out_gives_every_child_the_input_and_combines():
    model = nj.fan_out(
        nj.Dense(3), nj.Dense(2), extra=jnp.tanh, combine=lambda ys: jnp.concatenate(ys, -1)
    )
    x = jax.random.normal(jax.random.key(1), (4, 5))
    params, state = model.init(jax.random.key(0), x)
    assert list(params) == ["dense_0", "dense_1"]
    y, _ = model.apply(params, state, x)
    p0, p1 = jax.tree.map(np.asarray, (params["dense_0"], params["dense_1"]))
    x = np.asarray(x)
    expected = np.concatenate(
        [x @ p0["kernel"] + p0["bias"], x @ p1["kernel"] + p1["bias"], np.tanh(x)], -1
    )
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_residual_adds_input_and_projection_shortcut():
    x = jax.random.normal(jax.random.key(1), (4, 5))
    model = nj.residual(nj.Dense(5), jnp.tanh)
    params, state = model.init(jax.random.key(0), x)
    y, _ = model.apply(params, state, x)
    p, x = jax.tree.map(np.asarray, (params["dense_0"], x))
    np.testing.assert_allclose(y, x + np.tanh(x @ p["kernel"] + p["bias"]), rtol=1e-6, atol=1e-6)

    proj = nj.residual(nj.Dense(7), shortcut=nj.Dense(7, use_bias=False))
    params, state = proj.init(jax.random.key(0), x)
    y, _ = proj.apply(params, state, x)
    p, shortcut = jax.tree.map(np.asarray, (params["dense_0"], params["shortcut"]))
    expected = x @ shortcut["kernel"] + x @ p["kernel"] + p["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_residual_shape_change_without_shortcut_is_an_error():
    model = nj.serial(nj.Dense(5), block=nj.residual(nj.Dense(7)))
    with pytest.raises(
        nj.LayerError,
        match=r"block: residual branch changes the shape: input \(4, 5\), branch output \(4, 7\)",
    ):
        model.init(jax.random.key(0), jnp.zeros((4, 5)))


@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_repeat_equals_blocks_applied_in_turn(unroll):
    block = nj.serial(nj.Dense(5), jnp.tanh, nj.LayerNorm())
    n = 4
    model = nj.repeat(block, n, unroll=unroll)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    params, state = model.init(jax.random.key(0), x)
    assert _shapes(params)["stacked"]["dense_0"]["kernel"] == (n, 5, 5)
    y, _ = model.apply(params, state, x)
    h = x
    for i in range(n):
        p_i = jax.tree.map(lambda a, i=i: a[i], params["stacked"])
        h, _ = block.apply(p_i, {}, h)
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    # the n copies are independently initialised
    k = params["stacked"]["dense_0"]["kernel"]
    assert not np.allclose(k[0], k[1])


def test_repeat_paths_expand_per_copy():
    model = nj.serial(blocks=nj.repeat(nj.Dense(4), 3), head=nj.Dense(2))
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    assert sorted(nj.leaf_paths(params)) == [
        "blocks/0/bias",
        "blocks/0/kernel",
        "blocks/1/bias",
        "blocks/1/kernel",
        "blocks/2/bias",
        "blocks/2/kernel",
        "head/bias",
        "head/kernel",
    ]


def test_repeat_rejects_shape_changing_layer():
    with pytest.raises(nj.LayerError, match=r"repeat: the layer must keep its input's shape"):
        nj.repeat(nj.Dense(7), 2).init(jax.random.key(0), jnp.zeros((2, 5)))


@pytest.mark.parametrize("cpu_remat", [False, True])
def test_repeat_traces_body_a_fixed_number_of_times(cpu_remat):
    # Once for the scan, never once per copy; with cpu_remat on a host whose default
    # backend is not CPU, once more (jax.lax.platform_dependent traces every branch).
    per_call = 2 if cpu_remat and jax.default_backend() != "cpu" else 1
    traces = []

    def counting(x):
        traces.append(1)
        return jnp.tanh(x)

    x = jnp.ones((2, 4))
    for n in (2, 16):
        model = nj.repeat(nj.serial(nj.Dense(4), counting), n, cpu_remat=cpu_remat)
        params, state = model.init(jax.random.key(0), x)
        traces.clear()
        jax.jit(lambda p, model=model, state=state: model.apply(p, state, x)[0])(params)
        assert len(traces) == per_call


# --- mixed stacks: repeat of a pattern of layer kinds -----------------------------


def _kinds():
    """Two kinds with different params (a mixed stack's dense and MoE-like layers)."""
    a = nj.serial(nj.Dense(5), jnp.tanh, nj.LayerNorm())
    b = nj.serial(nj.Dense(7), jax.nn.relu, nj.Dense(5))
    return a, b


@pytest.mark.parametrize(
    "layout",
    [None, [0, 0, 0, 1] * 2 + [0, 0], [0] * 3 + [1] * 4, [1, 0, 0, 0, 0, 0, 1]],
)
def test_mixed_repeat_equals_its_layers_applied_in_turn(layout):
    kinds = _kinds()
    n = 6 if layout is None else len(layout)
    kind_of = [i % 2 for i in range(n)] if layout is None else layout
    model = nj.repeat(list(kinds), n, layout=layout)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    params, state = model.init(jax.random.key(0), x)
    flat = nj.paths.flatten(params)

    def copy(params, i):  # layer i's params, found through the stack keys
        for key, tree in params.items():
            start, step = nj.paths.parse_stack_key(key)
            j, r = divmod(i - start, step)
            count = jax.tree.leaves(tree)[0].shape[0]
            if r == 0 and 0 <= j < count:
                return jax.tree.map(lambda a, j=j: a[j], tree)
        raise AssertionError(f"no copy for layer {i}")

    def reference(params, x):
        h = x
        for i, k in enumerate(kind_of):
            h, _ = kinds[k].apply(copy(params, i), {}, h)
        return h

    y, _ = model.apply(params, state, x)
    np.testing.assert_allclose(y, reference(params, x), rtol=1e-5, atol=1e-5)
    # the copies unstacked (nj.unstack) run one after another without the scan
    y_copies, _ = model.apply(nj.unstack(params), state, x)
    np.testing.assert_allclose(y_copies, reference(params, x), rtol=1e-5, atol=1e-5)
    # every layer appears once under its logical path, with its kind's params
    logical = nj.paths.leaf_paths(params)
    for i, k in enumerate(kind_of):
        mine = sorted(p.partition("/")[2] for p in logical if p.split("/")[0] == str(i))
        assert mine == sorted(nj.paths.leaf_paths(kinds[k].init(jax.random.key(0), x)[0]))
    assert len(logical) == sum(np.prod(np.shape(v)[:1]) for v in flat.values())
    # gradients through the scanned segments equal the unrolled reference's
    g = jax.grad(lambda p: jnp.sum(model.apply(p, state, x)[0] ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(reference(p, x) ** 2))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
        # float32 rounding through six layers, relative to the leaf's largest entry:
        # a small entry beside large ones differs by more than rtol on some CPUs
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_unstacked_copies_must_be_one_tuple_per_copy():
    model = nj.repeat(nj.Dense(4), 3)
    params, _ = model.init(jax.random.key(0), jnp.zeros((2, 4)))
    copies = nj.unstack(params)["stacked"]
    with pytest.raises(
        nj.LayerError, match=r"'stacked'.*as a tuple of 3 per-copy trees, got a tuple of 2"
    ):
        model.apply({"stacked": copies[:2]}, {}, jnp.ones((2, 4)))


def test_mixed_repeat_of_one_kind_is_the_uniform_stack():
    block = nj.serial(nj.Dense(5), jnp.tanh)
    x = jnp.ones((2, 5))
    uniform, _ = nj.repeat(block, 4).init(jax.random.key(0), x)
    mixed, _ = nj.repeat([block, nj.Dense(5)], 4, layout=[0] * 4).init(jax.random.key(0), x)
    assert jax.tree.structure(uniform) == jax.tree.structure(mixed)
    for a, b in zip(jax.tree.leaves(uniform), jax.tree.leaves(mixed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_plan_segments_cuts_layouts_into_whole_periods():
    seg = nj.core.combinators.Segment
    assert nj.core.combinators.plan_segments([0, 1] * 16) == [seg(0, 32, (0, 1))]
    assert nj.core.combinators.plan_segments([0] * 3 + [1] * 29) == [
        seg(0, 3, (0,)),
        seg(3, 32, (1,)),
    ]
    gemma3 = ([0] * 5 + [1]) * 4 + [0, 0]
    assert nj.core.combinators.plan_segments(gemma3) == [
        seg(0, 24, (0,) * 5 + (1,)),
        seg(24, 26, (0,)),
    ]


def test_mixed_repeat_compiles_a_fixed_program_whatever_the_depth():
    # Each kind's body is traced once per call and the lowered program holds the same
    # number of matmuls at 4 and at 32 layers: compile time is flat in depth.
    traces = {"local": 0, "global": 0}

    def counting(name):
        def f(x):
            traces[name] += 1
            return jnp.tanh(x)

        return f

    kinds = [nj.serial(nj.Dense(4), counting("local")), nj.serial(nj.Dense(4), counting("global"))]
    x = jnp.ones((2, 4))
    dots = []
    for n in (4, 32):
        model = nj.repeat(kinds, n, cpu_remat=False)
        params, state = model.init(jax.random.key(0), x)
        for k in traces:
            traces[k] = 0
        f = jax.jit(lambda p, model=model, state=state: model.apply(p, state, x)[0])
        dots.append(f.lower(params).as_text().count("stablehlo.dot_general"))
        assert traces == {"local": 1, "global": 1}
    assert dots[0] == dots[1] == 2


def test_globs_select_the_same_logical_leaves_on_mixed_and_uniform_stacks():
    block = nj.serial(nj.Dense(4, name="attn"), jnp.tanh)
    other = nj.serial(nj.Dense(4, name="attn"), jax.nn.relu)  # same params, another kind
    x = jnp.ones((2, 4))
    uniform, _ = nj.serial(blocks=nj.repeat(block, 6)).init(jax.random.key(0), x)
    mixed, _ = nj.serial(blocks=nj.repeat([block, other], 6)).init(jax.random.key(0), x)
    assert "blocks/stacked[1::2]/attn_0/kernel" in nj.paths.flatten(mixed)
    for glob in ("blocks/*/attn_0/kernel", "blocks/3/**", "blocks/[024]/attn_0/bias"):
        assert sorted(nj.paths.match(mixed, glob)) == sorted(nj.paths.match(uniform, glob))
    masks = [nj.finetune.mask(p, "blocks/3/**") for p in (uniform, mixed)]
    assert nj.finetune.trainable_count(uniform, masks[0]) == 20
    assert nj.finetune.trainable_count(mixed, masks[1]) == 20
    odd = nj.finetune.mask(mixed, "blocks/[135]/**")["blocks"]
    assert odd["stacked[1::2]"]["attn_0"]["kernel"] is True
    assert odd["stacked[0::2]"]["attn_0"]["kernel"] is False


def test_mixed_repeat_rejects_a_bad_layout():
    with pytest.raises(ValueError, match=r"layout must give each of the n=3 layers a kind"):
        nj.repeat([nj.Dense(4), nj.Dense(4)], 3, layout=[0, 2, 1])


def _branches():
    traced = []

    def branch(name, scale):
        def f(x):
            traced.append(name)
            return x * scale

        return f

    return traced, branch("cpu", 2.0), branch("default", 3.0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU host's shortcut")
def test_by_platform_on_a_cpu_host_traces_only_the_cpu_branch():
    traced, cpu, default = _branches()
    y = jax.jit(lambda x: nj.by_platform(cpu, default, x))(jnp.ones(3))
    assert traced == ["cpu"]
    np.testing.assert_array_equal(y, 2.0 * np.ones(3))


def test_by_platform_elsewhere_leaves_the_choice_to_lowering(monkeypatch):
    # A GPU host's default backend: platform_dependent traces both branches and
    # lowering for the device the jit runs on (CPU here) picks the CPU one.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    traced, cpu, default = _branches()
    y = jax.jit(lambda x: nj.by_platform(cpu, default, x))(jnp.ones(3))
    assert sorted(traced) == ["cpu", "default"]
    expected = 2.0 if jax.devices()[0].platform == "cpu" else 3.0
    np.testing.assert_array_equal(y, expected * np.ones(3))


def test_repeat_cpu_remat_changes_no_value_or_gradient():
    block = nj.serial(nj.Dense(6), jax.nn.gelu, nj.Dropout(0.2), nj.LayerNorm())
    x = jax.random.normal(jax.random.key(1), (3, 6))
    plain, saved = nj.repeat(block, 3, cpu_remat=False), nj.repeat(block, 3)
    params, state = plain.init(jax.random.key(0), x)

    def loss(model, p, x):
        y, _ = model.apply(p, state, x, rng=jax.random.key(2), train=True)
        return jnp.sum(jnp.sin(y))

    for model in (plain, saved):
        check_grads(
            jax.jit(lambda p, x, model=model: loss(model, p, x)),
            (params, x),
            order=1,
            modes=("rev",),
            eps=1e-2,
            atol=2e-2,
            rtol=2e-2,
        )
    g_plain = jax.jit(jax.grad(lambda p, x: loss(plain, p, x), argnums=(0, 1)))(params, x)
    g_saved = jax.jit(jax.grad(lambda p, x: loss(saved, p, x), argnums=(0, 1)))(params, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_plain, g_saved
    )


def test_remat_matches_plain_values_and_grads():
    block = nj.serial(nj.Dense(6), jnp.tanh, nj.Dense(6))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    params, state = block.init(jax.random.key(0), x)
    loss = lambda layer: lambda p: jnp.sum(layer.apply(p, state, x)[0] ** 2)
    g_plain = jax.grad(loss(block))(params)
    g_remat = jax.grad(loss(nj.remat(block)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_plain, g_remat)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(nj.remat(block))))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_rng_is_split_per_child():
    model = nj.serial(nj.Dropout(0.5), nj.Dropout(0.5))
    x = jnp.ones((1000,))
    y, _ = model.apply({}, {}, x, rng=jax.random.key(0), train=True)
    y1, _ = nj.Dropout(0.5).apply({}, {}, x, rng=jax.random.key(0), train=True)
    kept = float(jnp.mean(y > 0))
    # two independent masks keep ~25%; reusing one key for both would keep ~50%
    assert 0.2 < kept < 0.3
    assert not np.array_equal(np.asarray(y > 0), np.asarray(y1 > 0))


def test_wrong_input_shape_names_path_and_shapes():
    model = nj.serial(nj.Dense(64), jax.nn.relu, nj.Dense(10))
    params, state = model.init(jax.random.key(0), jnp.zeros((8, 32)))
    with pytest.raises(
        nj.LayerError,
        match=r"^dense_0: expected x.shape\[-1\] == 32 \(kernel \(32, 64\)\), got x.shape == \(8, 31\)$",
    ):
        model.apply(params, state, jnp.zeros((8, 31)))
    nested = nj.serial(backbone=model)
    with pytest.raises(nj.LayerError, match=r"^backbone/dense_0: expected x.shape\[-1\] == 32"):
        jax.jit(lambda x: nested.apply({"backbone": params}, {}, x))(jnp.zeros((8, 31)))


def test_missing_and_extra_param_keys_name_the_path():
    model = nj.serial(nj.Dense(4), head=nj.Dense(2))
    params, state = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    broken = {**params, "head": {"kernel": params["head"]["kernel"]}}
    with pytest.raises(nj.LayerError, match=r"^head: missing param\(s\) \['bias'\]"):
        model.apply(broken, state, jnp.zeros((1, 3)))
    extra = {**params, "head": {**params["head"], "gamma": jnp.ones(2)}}
    with pytest.raises(nj.LayerError, match=r"^head: unexpected param\(s\) \['gamma'\]"):
        model.apply(extra, state, jnp.zeros((1, 3)))
    with pytest.raises(nj.LayerError, match=r"unexpected param key\(s\) \['tail'\]"):
        model.apply({**params, "tail": {}}, state, jnp.zeros((1, 3)))


def test_wrong_param_shape_names_path():
    model = nj.serial(nj.Dense(4), head=nj.Dense(2))
    params, state = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    params["head"]["bias"] = jnp.zeros(3)
    with pytest.raises(
        nj.LayerError, match=r"^head: expected param 'bias' with shape \(2,\), got \(3,\)"
    ):
        model.apply(params, state, jnp.zeros((1, 3)))


def test_as_layer_rejects_non_callables():
    with pytest.raises(TypeError, match="expected a Layer or a callable, got int"):
        nj.serial(nj.Dense(2), 3)


def test_summary_lists_every_leaf_and_output():
    model = nj.serial(nj.Dense(64), jax.nn.relu, head=nj.Dense(10))
    text = nj.summary(model, jax.ShapeDtypeStruct((8, 32), jnp.float32), print_fn=None)
    assert "dense_0/kernel  (32, 64)" in text
    assert "head/bias" in text
    assert f"{32 * 64 + 64 + 64 * 10 + 10:,}" in text
    assert "relu_0    (8, 64) float32" in text
    assert "(output)  (8, 10) float32" in text


def test_print_summary_prints_the_table_once(capsys):
    model = nj.serial(nj.Dense(4), head=nj.Dense(2))
    text = nj.summary(model, jnp.zeros((1, 3)))
    assert capsys.readouterr().out == ""  # returned, not printed
    print(nj.summary(model, jnp.zeros((1, 3))))
    out = capsys.readouterr().out
    assert out == text + "\n" and out.count("head/kernel") == 1
    assert repr(text) == text  # a REPL shows the table, not a quoted string
    seen = []
    nj.summary(model, jnp.zeros((1, 3)), print_fn=seen.append)
    assert seen == [text]


def _layer(init=None, apply=None):
    def good_init(key, x):
        return {"w": jnp.ones(np.shape(x)[-1])}, {}

    def good_apply(params, state, x, *, rng=None, train=False):
        return x * jax.lax.broadcast_to_rank(params["w"], np.ndim(x)), state

    return nj.Layer(init or good_init, apply or good_apply, "mine")


CONTRACT = r"; a layer's init\(key, x\) returns \(params, state\) and its apply\(params, state, x, \*, rng=None, train=False\) returns \(y, state\)"


def test_a_layer_that_breaks_the_contract_gets_an_error_stating_it():
    x = jnp.ones((2, 3))

    def params_only(key, x):
        return {"w": jnp.ones(3)}

    def y_only(params, state, x, *, rng=None, train=False):
        return x

    def no_keywords(params, state, x):
        return x, state

    model = nj.serial(nj.Dense(3), body=nj.serial(_layer(init=params_only)))
    with pytest.raises(
        nj.LayerError,
        match=r"^body/mine_0: test_a_layer_that_breaks_the_contract_gets_an_error_stating_it"
        r".<locals>.params_only breaks the layer contract: init returned a dict, expected "
        r"\(params, state\)" + CONTRACT,
    ):
        model.init(jax.random.key(0), x)
    for apply, detail in [
        (y_only, r"apply returned an array of shape \(2, 3\), expected \(y, state\)"),
        (no_keywords, r"apply does not take the keyword arguments rng and train"),
    ]:
        layer = _layer(apply=apply)
        params, state = _layer().init(jax.random.key(0), x)
        for model in (nj.serial(layer), nj.residual(layer), nj.fan_out(layer)):
            with pytest.raises(nj.LayerError, match=rf"^mine_0: .*{apply.__name__} .*{detail}"):
                jax.jit(model.apply)({"mine_0": params}, {}, x)
        with pytest.raises(nj.LayerError, match=rf"{apply.__name__} .*{detail}" + CONTRACT):
            nj.repeat(layer, 2).init(jax.random.key(0), x)
    # the well-behaved version passes through every combinator
    good = _layer()
    params, state = nj.repeat(good, 2).init(jax.random.key(0), x)
    np.testing.assert_array_equal(nj.repeat(good, 2).apply(params, state, x)[0], x)


def test_cpu_remat_policy_saves_wide_matmuls_and_recomputes_low_rank_ones():
    """The policy on each matmul of a LoRA layer, ``x @ w + (x @ a) @ b``: against its rule
    (no batch dims and a contraction wider than CHEAP_CONTRACTION)."""
    from nnjax.core.combinators import _CPU_SAVED_RESIDUALS, CHEAP_CONTRACTION

    d, r = 2 * CHEAP_CONTRACTION, CHEAP_CONTRACTION // 8

    def lora(x, w, a, b, q):
        y = x @ w + (x @ a) @ b
        return jnp.einsum("bqd,bkd->bqk", q, q) + y[0, 0]  # a batched product too

    args = (jnp.ones((4, d)), jnp.ones((d, d)), jnp.ones((d, r)), jnp.ones((r, d)))
    jaxpr = jax.make_jaxpr(lora)(*args, jnp.ones((2, 3, 5)))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    saved = [
        _CPU_SAVED_RESIDUALS(e.primitive, *(v.aval for v in e.invars), **e.params) for e in dots
    ]
    # x @ w (contracts d), x @ a (contracts d), (x @ a) @ b (contracts r), the batched one
    assert saved == [True, True, False, False]


def _count_primitive(jaxpr, name: str) -> int:
    """How many ``name`` equations ``jaxpr`` holds, inner jaxprs (scan, remat, custom
    VJP, jit) included."""
    count = 0
    for e in jaxpr.eqns:
        count += e.primitive.name == name
        for v in e.params.values():
            for inner in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name)
    return count


def test_cpu_remat_keeps_bfloat16_products_as_it_keeps_float32_ones():
    """A bfloat16 product (float32 accumulation, its own VJP) is saved by the CPU scan's
    remat policy like a float32 one: the gradient runs as many products in both."""
    # tanh's derivative needs the product's output: saved, or recomputed
    model = nj.repeat(nj.serial(nj.Dense(256, use_bias=False), jnp.tanh), 3)
    x = jax.random.normal(jax.random.key(1), (32, 256))  # rows past the decode kernel's
    params, state = model.init(jax.random.key(0), x)

    def products(dtype):
        def loss(p):
            p = jax.tree.map(lambda w: w.astype(dtype), p)
            y, _ = model.apply(p, state, x.astype(dtype))
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return _count_primitive(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, "dot_general")

    # forward x @ w, backward g @ w.T and x.T @ g; none recomputed
    assert products(jnp.float32) == 3
    assert products(jnp.bfloat16) == 3
