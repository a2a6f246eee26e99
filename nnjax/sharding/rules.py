"""Sharding rules: parameter-path globs to ``PartitionSpec``s, for params, optimizer and train state.

Rules are an ordered mapping ``{glob: spec}``; a leaf takes the spec of the first
glob that matches its logical path (``blocks/3/attn/query/kernel``, see
:mod:`nnjax.core.paths`)::

    rules = {"**/attn/*/kernel": P(None, "model"), "**": P()}

A spec is a ``PartitionSpec`` or a function ``spec(path, shape, mesh) ->
PartitionSpec`` (the presets' FSDP rule picks the dimension by shape). Every
leaf must match a rule (end with a catch-all ``"**"``), and every glob must match
some leaf.

Stacked leaves: a leaf that ``nj.repeat`` stacks under ``"stacked"`` has a
leading axis per ``repeat``; a rule is written for one copy (``kernel (in, out)``
gets ``P(None, "model")``) and the stacked axes are prepended as ``None``
(``(n, in, out)`` gets ``P(None, None, "model")``). A glob must then match all
copies or none: one array has one sharding. A spec function with the attribute
``whole_leaf = True`` is given the whole shape (stacked axes included) and its spec is
used as is: how a rule splits a stacked axis (the experts' axis,
:func:`nnjax.sharding.expert_parallel_rules`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnjax.core.errors import ArgumentError, GlobError
from nnjax.core.paths import (
    glob_match,
    keypath_str,
    logical_copies,
    match,
    stack_depth,
)
from nnjax.sharding.mesh import ShardingError, put, replicated

__all__ = [
    "Rules",
    "check_spec",
    "param_specs",
    "param_shardings",
    "shard_params",
    "opt_state_shardings",
    "train_state_shardings",
    "shard_train_state",
]

SpecFn = Callable[[str, tuple[int, ...], Mesh], P]
Rules = Mapping[str, P | SpecFn]
"""``{glob: PartitionSpec or spec(path, shape, mesh)}``, first match wins."""


def _entries(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_spec(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    """Raise a :class:`ShardingError` naming ``path`` unless ``spec`` fits ``shape`` on ``mesh``."""
    shape = tuple(int(d) for d in shape)
    if len(spec) > len(shape):
        raise ShardingError(f"{path}: spec {spec} has {len(spec)} entries for shape {shape}")
    seen: set[str] = set()
    for dim, (n, entry) in enumerate(zip(shape, spec, strict=False)):
        names = _entries(entry)
        for a in names:
            if a not in mesh.shape:
                raise ShardingError(
                    f"{path}: spec {spec} names mesh axis {a!r}; the mesh has axes "
                    f"{tuple(mesh.axis_names)}"
                )
            if a in seen:
                raise ShardingError(f"{path}: spec {spec} uses mesh axis {a!r} twice")
            seen.add(a)
        size = int(np.prod([mesh.shape[a] for a in names], dtype=int))
        if n % size:
            raise ShardingError(
                f"{path}: shape {shape} does not fit spec {spec}: dimension {dim} ({n}) is "
                f"not divisible by mesh axis {entry!r} of size {size}"
            )


def _as_spec(glob: str, path: str, spec: Any) -> P:
    if isinstance(spec, P):
        return spec
    if spec is None:
        return P()
    if isinstance(spec, tuple):
        return P(*spec)
    raise ArgumentError(f"rule {glob!r} gave {path!r} the spec {spec!r}; expected a PartitionSpec")


def param_specs(params: Any, mesh: Mesh, rules: Rules, *, check_unused: bool = True) -> Any:
    """Each leaf's ``PartitionSpec`` by ``rules``, checked against its shape and ``mesh``.

    Args:
        params: a params tree of arrays or ``ShapeDtypeStruct``s (``jax.eval_shape(model.init, ...)``
            plans a sharding without memory).
        mesh: the mesh the specs refer to.
        rules: ``{glob: spec}``, first match wins; see the module doc.
        check_unused: a glob that matches no leaf is an error.

    Returns:
        A tree like ``params`` of ``PartitionSpec`` (stacked axes prepended as ``None``,
        trailing ``None``s dropped: ``P(None, "model")``, never ``P(None, "model", None)``).

    Raises:
        GlobError: a glob that matches no leaf (named, with near paths), a leaf that
            no rule matches, or a glob that matches only some copies of a stacked leaf.
        ShardingError: a spec that does not fit its leaf: the message names the
            path, the shape, the spec and the mesh axis size.
    """
    rules = dict(rules)
    if not rules:
        raise GlobError("expected at least one sharding rule; end the rules with '**': P()")
    unmatched: list[str] = []
    if check_unused:
        for g in rules:
            match(params, g, what="sharding rule")  # GlobError naming g and near paths

    def leaf(kp, x):
        path = keypath_str(kp)
        shape = tuple(np.shape(x))
        depth = stack_depth(path)
        copies = list(logical_copies(path, shape).ravel())
        for g, value in rules.items():
            hits = [glob_match(g, c) for c in copies]
            if not any(hits):
                continue
            if not all(hits):
                raise GlobError(
                    f"sharding rule {g!r} matches {sum(hits)} of the {len(hits)} stacked "
                    f"copies of {path!r}; one array takes one sharding: match all copies "
                    f"(blocks/*/...) or none"
                )
            if callable(value) and getattr(value, "whole_leaf", False):
                entries = list(_as_spec(g, path, value(path, shape, mesh)))
            else:
                spec = value(path, shape[depth:], mesh) if callable(value) else value
                entries = [*(None,) * depth, *_as_spec(g, path, spec)]
            check_spec(path, shape, P(*entries), mesh)
            while entries and entries[-1] is None:  # canonical, as jit writes them
                entries.pop()
            return P(*entries)
        unmatched.append(path)
        return P()

    specs = jax.tree_util.tree_map_with_path(leaf, params)
    if unmatched:
        raise GlobError(
            f"no sharding rule matches {len(unmatched)} path(s), e.g. {unmatched[:5]}; "
            "end the rules with a catch-all '**': P()"
        )
    return specs


def param_shardings(params: Any, mesh: Mesh, rules: Rules, *, check_unused: bool = True) -> Any:
    """:func:`param_specs` as ``NamedSharding``s on ``mesh``."""
    specs = param_specs(params, mesh, rules, check_unused=check_unused)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Any, mesh: Mesh, rules: Rules, *, check_unused: bool = True) -> Any:
    """``params`` placed on ``mesh`` by ``rules`` (all checks happen before any transfer).

    Example:
        >>> cfg = nj.models.GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_embd=32)
        >>> params, _ = nj.models.GPT(cfg).init(key, jnp.zeros((1, 16), jnp.int32))
        >>> m = nj.sharding.mesh({"data": -1, "model": 1})  # {"data": 2, "model": 4} on 8 devices
        >>> p = nj.sharding.shard_params(params, m, nj.sharding.tensor_parallel_rules())
        >>> p["blocks"]["stacked"]["attn"]["query"]["kernel"].sharding.spec
        P(None, None, 'model')
    """
    return put(params, param_shardings(params, mesh, rules, check_unused=check_unused))


def opt_state_shardings(opt_state: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state built on ``params`` (or on a trainable subset of it).

    The rule: a leaf of ``opt_state`` whose key path ends in a parameter path
    (``.../mu/blocks/stacked/attn/query/kernel`` ends in
    ``blocks/stacked/attn/query/kernel``) *and* has that parameter's shape takes
    the parameter's sharding (Adam's ``mu``/``nu``, momentum, EMA copies). Every
    other leaf (step counts, schedule state, factored statistics of another
    shape) is replicated. The longest matching path suffix wins.

    Args:
        opt_state: the optimizer state (arrays or ``ShapeDtypeStruct``s).
        params: the params tree the shardings are for.
        shardings: the params' shardings (from :func:`param_shardings`).
        mesh: the mesh, for the replicated leaves.

    Returns:
        A tree like ``opt_state`` of ``NamedSharding``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    jax.tree_util.tree_map_with_path(
        lambda kp, x: shapes.__setitem__(keypath_str(kp), tuple(np.shape(x))), params
    )
    by_path: dict[str, Any] = {}
    jax.tree_util.tree_map_with_path(
        lambda kp, s: by_path.__setitem__(keypath_str(kp), s),
        shardings,
        is_leaf=lambda s: isinstance(s, NamedSharding),
    )
    rep = replicated(mesh)

    def leaf(kp, x):
        keys = []
        for k in reversed(kp):  # the trailing run of dict keys
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, str(k.key))
        shape = tuple(np.shape(x))
        for i in range(len(keys)):
            p = "/".join(keys[i:])
            if shapes.get(p) == shape:
                return by_path[p]
        return rep

    return jax.tree_util.tree_map_with_path(leaf, opt_state)


def train_state_shardings(ts: Any, mesh: Mesh, rules: Rules, *, check_unused: bool = True) -> Any:
    """Shardings for a ``TrainState`` ``(step, params, state, opt_state)``.

    ``params`` by ``rules``; ``opt_state`` by :func:`opt_state_shardings`; ``step``
    and the layer ``state`` (BatchNorm statistics, caches) replicated. Works on a
    ``TrainState`` of ``ShapeDtypeStruct`` (``jax.eval_shape(tr.init, params, state)``)
    to plan a restore onto a new mesh.

    Raises:
        GlobError, ShardingError: as :func:`param_specs`.
    """
    psh = param_shardings(ts.params, mesh, rules, check_unused=check_unused)
    rep = replicated(mesh)
    return ts._replace(
        step=rep,
        params=psh,
        state=jax.tree.map(lambda _: rep, ts.state),
        opt_state=opt_state_shardings(ts.opt_state, ts.params, psh, mesh),
    )


def shard_train_state(ts: Any, mesh: Mesh, rules: Rules, *, check_unused: bool = True) -> Any:
    """``ts`` placed by :func:`train_state_shardings`; pass the result to ``trainer.step``.

    The returned state may share buffers with ``ts`` (where a leaf already sits
    on its target sharding); the step donates it, so use only the returned one.

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(16), head=nj.Dense(2))
        >>> params, state = model.init(key, jnp.zeros((1, 8)))
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(1e-3))
        >>> m = nj.sharding.mesh({"data": -1})
        >>> ts = nj.sharding.shard_train_state(tr.init(params, state), m, nj.sharding.fsdp_rules())
        >>> x, y = jnp.ones((8, 8)), jnp.zeros((8,), jnp.int32)
        >>> ts, metrics = tr.step(ts, nj.sharding.shard_batch((x, y), m), key)
        >>> int(ts.step)
        1
    """
    return put(ts, train_state_shardings(ts, mesh, rules, check_unused=check_unused))
