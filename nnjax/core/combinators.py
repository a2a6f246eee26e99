"""The layer contract and the combinators that compose layers into models.

A :class:`Layer` is a NamedTuple of two pure functions and a default name::

    params, state = layer.init(key, x)          # x: an array or jax.ShapeDtypeStruct
    y, state = layer.apply(params, state, x, rng=None, train=False)

Combinators (``serial``, ``fan_out``, ``residual``, ``repeat``, ``remat``) are
layers built from layers. Their ``init`` infers each child's input shape with
``jax.eval_shape`` on the previous child's ``apply``, so ``jax.eval_shape(model.init,
key, x)`` plans any model without FLOPs or memory.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import (
    Layer,
    Params,
    State,
    as_layer,
    call_child,
    checked_apply,
    checked_init,
    non_empty,
    output_shape,
)
from nnjax.core.paths import stack_key

__all__ = [
    "serial",
    "fan_out",
    "residual",
    "repeat",
    "unstack",
    "plan_segments",
    "Segment",
    "remat",
    "by_platform",
    "output_shape",
    "record_outputs",
]


def _name_children(layers: Sequence[Any], named: Mapping[str, Any]) -> list[tuple[str, Layer]]:
    counts: dict[str, int] = {}
    children = []
    for obj in layers:
        layer = as_layer(obj)
        k = counts.get(layer.name, 0)
        counts[layer.name] = k + 1
        children.append((f"{layer.name}_{k}", layer))
    for name, obj in named.items():
        if "/" in name:
            raise ArgumentError(f"child name {name!r} may not contain '/'")
        children.append((name, as_layer(obj)))
    return children


def _check_keys(kind: str, tree: Mapping[str, Any], allowed: Sequence[str]) -> None:
    extra = sorted(set(tree) - set(allowed))
    if extra:
        raise LayerError(
            f"unexpected {kind} key(s) {extra}; this layer has children {sorted(allowed)}"
        )


def _split(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


def _init_children(children, key, x, *, chain: bool):
    """Init each child; with ``chain`` the next child sees the previous child's output."""
    params: Params = {}
    state: State = {}
    keys = jax.random.split(key, max(len(children), 1))
    for (name, child), k in zip(children, keys, strict=False):
        params[name], state[name] = call_child(name, checked_init, child, k, x)
        if chain:
            x = call_child(name, output_shape, child, params[name], state[name], x)
    return non_empty(**params), non_empty(**state), x


# While ``nj.summary`` traces a model, each child's output shape is logged here
# under its path. Set only inside ``record_outputs``; ordinary calls never see it.
_OUTPUT_LOG: contextvars.ContextVar = contextvars.ContextVar("nnjax_output_log", default=None)


def _apply_child(name, child, params, state, x, rng, train):
    args = (params.get(name, {}), state.get(name, {}), x)
    log = _OUTPUT_LOG.get()
    if log is None:
        return call_child(name, checked_apply, child, *args, rng=rng, train=train)
    prefix, rows = log
    path = (*prefix, name)
    token = _OUTPUT_LOG.set((path, rows))
    try:
        y, s = call_child(name, checked_apply, child, *args, rng=rng, train=train)
    finally:
        _OUTPUT_LOG.reset(token)
    rows.append(("/".join(path), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), y)))
    return y, s


def record_outputs(layer: Layer, params: Params, state: State, x: Any) -> list[tuple[str, Any]]:
    """``(path, output ShapeDtypeStruct)`` of every child a combinator applies, innermost first.

    Runs ``jax.eval_shape``: no FLOPs, no memory.
    """
    rows: list[tuple[str, Any]] = []
    token = _OUTPUT_LOG.set(((), rows))
    try:
        out = output_shape(layer, params, state, x)
    finally:
        _OUTPUT_LOG.reset(token)
    rows.append(("(output)", out))
    return rows


def serial(*layers: Layer | Callable, **named_layers: Layer | Callable) -> Layer:
    """Apply layers one after another.

    Positional children are named ``{layer.name}_{k}`` (``dense_0``, ``conv_0``,
    ``dense_1``); keyword children by their keyword, after the positional ones.
    Children without params or state take no entry.

    Example:
        >>> model = nj.serial(nj.Dense(64), jax.nn.relu, head=nj.Dense(10))
        >>> params, state = model.init(key, jnp.zeros((8, 32)))
        >>> jax.tree.map(jnp.shape, params)
        {'dense_0': {'bias': (64,), 'kernel': (32, 64)}, 'head': {'bias': (10,), 'kernel': (64, 10)}}
    """
    children = _name_children(layers, named_layers)
    names = [n for n, _ in children]

    def init(key, x):
        params, state, _ = _init_children(children, key, x, chain=True)
        return params, state

    def apply(params, state, x, *, rng=None, train=False):
        _check_keys("param", params, names)
        _check_keys("state", state, names)
        new_state = {}
        for (name, child), r in zip(children, _split(rng, len(children)), strict=True):
            x, new_state[name] = _apply_child(name, child, params, state, x, r, train)
        return x, non_empty(**new_state)

    return Layer(init, apply, "serial")


def fan_out(
    *layers: Layer | Callable,
    combine: Callable[[tuple], Any] | None = None,
    **named_layers: Layer | Callable,
) -> Layer:
    """Fan out (stax's ``FanOut`` + ``parallel``): every child gets the same input; the
    output is the tuple of theirs.

    ``combine`` (``lambda ys: jnp.concatenate(ys, -1)``, ``sum``) merges the tuple.
    Children are named as in :func:`serial`.

    Example:
        >>> model = nj.fan_out(nj.Dense(3), jnp.tanh, combine=lambda ys: jnp.concatenate(ys, -1))
        >>> params, state = model.init(key, jnp.zeros((2, 4)))
        >>> model.apply(params, state, jnp.zeros((2, 4)))[0].shape
        (2, 7)
    """
    children = _name_children(layers, named_layers)
    names = [n for n, _ in children]

    def init(key, x):
        params, state, _ = _init_children(children, key, x, chain=False)
        return params, state

    def apply(params, state, x, *, rng=None, train=False):
        _check_keys("param", params, names)
        _check_keys("state", state, names)
        outs, new_state = [], {}
        for (name, child), r in zip(children, _split(rng, len(children)), strict=True):
            y, new_state[name] = _apply_child(name, child, params, state, x, r, train)
            outs.append(y)
        ys = tuple(outs)
        return (combine(ys) if combine is not None else ys), non_empty(**new_state)

    return Layer(init, apply, "fan_out")


def residual(
    *layers: Layer | Callable,
    shortcut: Layer | Callable | None = None,
    **named_layers: Layer | Callable,
) -> Layer:
    """``y = shortcut(x) + serial(*layers)(x)``; ``shortcut`` defaults to the identity.

    The children's params sit directly under the residual (no extra level); a
    projection shortcut's params sit under ``shortcut``.
    """
    body = serial(*layers, **named_layers)
    short = None if shortcut is None else as_layer(shortcut)

    def init(key, x):
        k_body, k_short = jax.random.split(key)
        params, state = body.init(k_body, x)
        if short is not None:
            p, s = call_child("shortcut", checked_init, short, k_short, x)
            params, state = {**params, **non_empty(shortcut=p)}, {**state, **non_empty(shortcut=s)}
        return params, state

    def apply(params, state, x, *, rng=None, train=False):
        r_body, r_short = _split(rng, 2)
        body_params = {k: v for k, v in params.items() if k != "shortcut"}
        body_state = {k: v for k, v in state.items() if k != "shortcut"}
        y, new_state = body.apply(body_params, body_state, x, rng=r_body, train=train)
        skip = x
        if short is not None:
            skip, s = _apply_child("shortcut", short, params, state, x, r_short, train)
            new_state = {**new_state, **non_empty(shortcut=s)}
        if jnp.shape(skip) != jnp.shape(y):
            raise LayerError(
                f"residual branch changes the shape: input {jnp.shape(skip)}, "
                f"branch output {jnp.shape(y)}; give a shortcut= projection"
            )
        return skip + y, new_state

    return Layer(init, apply, "residual")


def _signature(tree: Any) -> tuple:
    leaves = [(tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(tree)]
    return jax.tree.structure(tree), leaves


def _describe(tree: Any) -> str:
    if isinstance(tree, jax.ShapeDtypeStruct):
        return f"{tuple(tree.shape)} {tree.dtype}"
    return str(jax.tree.map(lambda a: f"{tuple(a.shape)} {a.dtype}", tree))


CHEAP_CONTRACTION = 64
"""A matmul contracting at most this many elements is recomputed, never saved (see below)."""


def _cpu_saved_residuals(prim: Any, *avals: Any, **params: Any) -> bool:
    """The CPU scan body's remat policy: save a matmul's output when it has no batch
    dimensions and contracts more than :data:`CHEAP_CONTRACTION` elements.

    A low-rank product (LoRA's ``(x @ a) @ b``, rank ``r``) costs ``r`` multiply-adds per
    output element to recompute but as many bytes as the layer's own output to keep:
    saving it would double a LoRA layer's activations.
    """
    if not jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params):
        return False
    dims = params.get("dimension_numbers")
    if dims is None or not avals:
        return True
    (lhs_contracting, _), _ = dims
    contracted = math.prod(int(avals[0].shape[d]) for d in lhs_contracting)
    return contracted > CHEAP_CONTRACTION


_CPU_SAVED_RESIDUALS = _cpu_saved_residuals


def by_platform(cpu: Callable[..., Any], default: Callable[..., Any], *args: Any) -> Any:
    """``cpu(*args)`` when lowering for CPU, else ``default(*args)``; both must agree in value.

    Where the default backend is CPU, ``cpu`` is called directly; elsewhere the choice
    is ``jax.lax.platform_dependent``'s, made when lowering (a jit placed on a CPU
    device of a GPU host still gets ``cpu``). ``platform_dependent`` traces and
    differentiates every branch, which doubled the tracing and lowering of a 4-block
    GPT train step (0.60 vs 0.30 s); on a CPU host that buys nothing but exports for
    another platform, which then get the CPU formulation: the same values, another speed.
    """
    if jax.default_backend() == "cpu":
        return cpu(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


class Segment(NamedTuple):
    """Layers ``start .. stop - 1`` of a mixed stack: ``pattern`` (kind indices) repeated.

    ``(stop - start)`` is a multiple of ``len(pattern)``; one ``lax.scan`` runs the
    segment, one iteration per repetition of the pattern.
    """

    start: int
    stop: int
    pattern: tuple[int, ...]


def plan_segments(layout: Sequence[int], max_period: int = 16) -> list[Segment]:
    """Cut a per-layer kind list into few periodic segments, greedily from the front.

    At each start the period covering the most layers (whole repetitions, at least
    two of a period over 1; ties: the shortest period) is taken, so ``[0, 1] * 16`` is one segment,
    ``[0] * 3 + [1] * 29`` (dense, then mixture of experts) two and
    ``([0] * 5 + [1]) * 4 + [0, 0]`` (Gemma 3's 26 layers) two.

    Example:
        >>> nj.core.combinators.plan_segments([0, 0, 0, 1] * 2 + [0])
        [Segment(start=0, stop=8, pattern=(0, 0, 0, 1)), Segment(start=8, stop=9, pattern=(0,))]
    """
    kinds = list(layout)
    out, a = [], 0
    while a < len(kinds):
        best = (0, 1)
        for p in range(1, min(max_period, len(kinds) - a) + 1):
            b = a
            while b < len(kinds) and kinds[b] == kinds[a + (b - a) % p]:
                b += 1
            covered = (b - a) // p * p
            if covered > best[0] and (p == 1 or covered >= 2 * p):  # once is no pattern
                best = (covered, p)
        covered, p = best
        out.append(Segment(a, a + covered, tuple(kinds[a : a + p])))
        a += covered
    return out


def repeat(
    layer: Layer | Sequence[Layer],
    n: int,
    *,
    layout: Sequence[int] | None = None,
    unroll: int = 1,
    cpu_remat: bool = True,
) -> Layer:
    """``n`` copies of ``layer`` applied in turn, params stacked on a leading axis.

    Runs with ``jax.lax.scan``, so compile time does not grow with ``n``. The
    copies' params and state live under the key ``"stacked"`` with a leading axis
    of size ``n``; their logical paths are ``0/...``, ``1/...`` (see
    :mod:`nnjax.core.paths`). The layer must keep its input's shape and dtype.

    A *mixed stack*: ``layer`` a sequence of layers (the kinds) and layer ``i`` is
    ``layer[layout[i]]`` (default ``layout[i] = i % len(layer)``: the kinds alternate).
    The layout is cut into periodic segments (:func:`plan_segments`); each segment is
    one scan whose body applies one repetition of its pattern, so compile time grows
    with the pattern, not with ``n``. The copies of one kind in one segment are stacked
    under ``stacked[start::step]`` (layers ``start, start + step, ...``), so kinds
    may differ in params and state (a window's KV cache, a mixture of experts) while
    every layer keeps the logical path ``{i}/...``. A layout of one kind is
    exactly the uniform stack.

    On CPU (chosen by :func:`by_platform`; other backends run the plain scan) the
    scanned body is wrapped in ``jax.checkpoint`` saving only matmul outputs without
    batch dimensions (``dots_with_no_batch_dims_saveable``) that contract more than
    :data:`CHEAP_CONTRACTION` elements (a LoRA pair's low-rank product is recomputed):
    XLA:CPU is slow at stacking and re-reading the other per-iteration residuals, and
    recomputing them is cheaper.
    Measured on a 4-block GPT train step, 2-core CPU: 1.6x faster at batch 12 x
    context 64, 1.2x at 32 x 128, 1.05x at 8 x 256. Values and gradients are the
    same either way; ``cpu_remat=False`` turns it off.

    Args:
        layer: the block, or the kinds of a mixed stack; each must keep its input's
            shape and dtype.
        n: number of copies.
        layout: each layer's kind (an index into ``layer``), ``n`` of them.
        unroll: copies (pattern repetitions) per scan iteration (``jax.lax.scan``'s ``unroll``).
        cpu_remat: recompute the body's non-matmul residuals in the backward pass on CPU.

    Params:
        stacked: the child's params, each leaf with shape ``(n, *leaf.shape)``;
        a mixed stack: ``stacked[start::step]`` per kind and segment instead.

    Example:
        >>> local, full = nj.Dense(4, name="local"), nj.Dense(4, name="full")
        >>> model = nj.repeat([local, full], 4)
        >>> params, _ = model.init(key, jnp.zeros((2, 4)))
        >>> sorted(params), params["stacked[1::2]"]["kernel"].shape
        (['stacked[0::2]', 'stacked[1::2]'], (2, 4, 4))
        >>> sorted(nj.paths.leaf_paths(params))[:3]
        ['0/bias', '0/kernel', '1/bias']
    """
    if n < 1:
        raise ArgumentError(f"repeat: n must be >= 1, got {n}")
    if isinstance(layer, Layer) or callable(layer):  # a Layer is a tuple too
        kinds = [as_layer(cast(Any, layer))]
    else:
        kinds = [as_layer(k) for k in cast(Sequence[Layer], layer)]
    if not kinds:
        raise ArgumentError("repeat: expected at least one layer kind, got an empty sequence")
    kind_of = [i % len(kinds) for i in range(n)] if layout is None else list(layout)
    if len(kind_of) != n or any(not 0 <= k < len(kinds) for k in kind_of):
        raise ArgumentError(
            f"repeat: layout must give each of the n={n} layers a kind in "
            f"[0, {len(kinds)}), got {list(kind_of)}"
        )
    segments = plan_segments(kind_of)
    # one stack per (segment, position in its pattern): (key, kind, first layer, step, copies)
    stacks = [
        (stack_key(sg.start + k, len(sg.pattern)), kind, sg.start + k, len(sg.pattern),
         (sg.stop - sg.start) // len(sg.pattern))
        for sg in segments
        for k, kind in enumerate(sg.pattern)
    ]  # fmt: skip
    keys_ = [st[0] for st in stacks]

    def init(key, x):
        keys = jax.random.split(key, n)
        x_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)
        for k in sorted(set(kind_of)):
            p0, s0 = jax.eval_shape(functools.partial(checked_init, kinds[k]), keys[0], x)
            out = output_shape(kinds[k], p0, s0, x)
            if _signature(out) != _signature(x_spec):
                raise LayerError(
                    f"repeat: the layer must keep its input's shape and dtype, "
                    f"got input {_describe(x_spec)} -> output {_describe(out)}"
                )
        params, state = {}, {}
        for key_, kind, first, step, count in stacks:
            ks = keys[first : first + step * count : step]
            params[key_], state[key_] = jax.vmap(lambda k, kind=kind: kinds[kind].init(k, x_spec))(
                ks
            )
        return non_empty(**params), non_empty(**state)

    def apply(params, state, x, *, rng=None, train=False):
        _check_keys("param", params, keys_)
        _check_keys("state", state, keys_)
        rngs = None if rng is None else jax.random.split(rng, n)
        new_state = {}
        for sg in segments:
            x, seg_state = _apply_segment(sg, params, state, x, rngs, train)
            new_state.update(seg_state)
        return x, non_empty(**new_state)

    def _apply_segment(sg, params, state, x, rngs, train):
        p_len = len(sg.pattern)
        reps = (sg.stop - sg.start) // p_len
        names = [stack_key(sg.start + k, p_len) for k in range(p_len)]
        if any(isinstance(params.get(k), tuple) for k in names):
            return _apply_unstacked(sg, names, reps, params, state, x, rngs, train)
        seg_rngs = None
        if rngs is not None:
            seg_rngs = rngs[sg.start : sg.stop].reshape(reps, p_len, *rngs.shape[1:])
            seg_rngs = tuple(seg_rngs[:, k] for k in range(p_len))

        def body(carry, xs):
            ps, ss, rs = xs
            out_states = []
            for k, kind in enumerate(sg.pattern):
                r = None if rs is None else rs[k]
                carry, s = checked_apply(kinds[kind], ps[k], ss[k], carry, rng=r, train=train)
                out_states.append(s)
            return carry, tuple(out_states)

        def scan(body, x, xs):
            return jax.lax.scan(body, x, xs, length=reps, unroll=unroll)

        xs = (
            tuple(params.get(k, {}) for k in names),
            tuple(state.get(k, {}) for k in names),
            seg_rngs,
        )
        if cpu_remat:
            saved = jax.checkpoint(body, policy=_CPU_SAVED_RESIDUALS, prevent_cse=False)
            y, out = by_platform(
                lambda x, xs: scan(saved, x, xs), lambda x, xs: scan(body, x, xs), x, xs
            )
        else:
            y, out = scan(body, x, xs)
        return y, dict(zip(names, out, strict=True))

    def _apply_unstacked(sg, names, reps, params, state, x, rngs, train):
        """The copies one after another in Python, from tuples of per-copy trees (see
        :func:`unstack`); the state comes back as such tuples."""
        new_state: dict[str, list] = {k: [] for k in names}
        for r in range(reps):
            for k, kind in enumerate(sg.pattern):
                copies, states = params.get(names[k]), state.get(names[k])
                _check_copies("param", names[k], copies, reps)
                _check_copies("state", names[k], states, reps)
                layer_i = sg.start + r * len(sg.pattern) + k
                x, s = checked_apply(
                    kinds[kind],
                    copies[r] if copies else {},
                    states[r] if states else {},
                    x,
                    rng=None if rngs is None else rngs[layer_i],
                    train=train,
                )
                new_state[names[k]].append(s)
        return x, {k: tuple(v) if any(v) else {} for k, v in new_state.items()}

    return Layer(init, apply, kinds[0].name if len(kinds) == 1 else "repeat")


def _check_copies(kind: str, key: str, copies: Any, reps: int) -> None:
    """Unstacked copies: a tuple of ``reps`` trees (or nothing, ``{}``)."""
    if copies and (not isinstance(copies, tuple) or len(copies) != reps):
        got = f"a tuple of {len(copies)}" if isinstance(copies, tuple) else type(copies).__name__
        raise LayerError(
            f"repeat: {kind}s under {key!r}: expected unstacked copies (nj.unstack) as a "
            f"tuple of {reps} per-copy trees, got {got}"
        )


def unstack(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`repeat`'s params or state with each stack (``stacked``, ``stacked[i::k]``)
    split into a tuple of per-copy trees, which ``repeat``'s apply then runs one after
    another instead of scanning.

    For decoding: inside a scan XLA:CPU copies each copy's weights out of the stack
    before its matrix-vector products, which costs more than the products; separate
    buffers are read in place. Compile time then grows with the number of copies.
    Stacks already split are kept as they are.

    Args:
        tree: ``{stack_key: tree with a leading axis of n copies}``, as ``repeat`` makes.

    Example:
        >>> model = nj.repeat(nj.Dense(4), 3)
        >>> params, _ = model.init(key, jnp.zeros((2, 4)))
        >>> copies = nj.unstack(params)
        >>> len(copies["stacked"]), copies["stacked"][0]["kernel"].shape
        (3, (4, 4))
        >>> bool(jnp.allclose(model.apply(copies, {}, jnp.ones((2, 4)))[0],
        ...                   model.apply(params, {}, jnp.ones((2, 4)))[0]))
        True
    """
    out = {}
    for key, stack in tree.items():
        if isinstance(stack, tuple):  # unstacked already
            out[key] = stack
            continue
        leaves = jax.tree.leaves(stack)
        n = int(jnp.shape(leaves[0])[0]) if leaves else 0
        out[key] = tuple(jax.tree.map(lambda a, i=i: a[i], stack) for i in range(n))
    return out


def remat(layer: Layer, *, policy: Callable | None = None) -> Layer:
    """``layer`` whose activations are recomputed in the backward pass (``jax.checkpoint``)."""
    layer = as_layer(layer)

    def apply(params, state, x, *, rng=None, train=False):
        def forward(p, s, x, r):
            return checked_apply(layer, p, s, x, rng=r, train=train)

        return jax.checkpoint(forward, policy=policy)(params, state, x, rng)

    return Layer(layer.init, apply, layer.name)
