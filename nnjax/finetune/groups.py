"""Per-group optimizers and learning rates over parameter paths.

``multi_optimizer({"head/**": optax.adam(1e-3), "**": optax.adam(1e-5)}, params)``
labels each leaf with the first glob that matches its logical path and runs
``optax.multi_transform``. The labels are computed from whatever tree the
optimizer is initialised on (``param_labels`` is a function of the tree), so the
same optimizer works on the full params or on the trainable subset a trainer
builds state for, as long as the paths are the same. So build it on the full
params and hand the trainer the mask::

    tx = nj.finetune.multi_optimizer({"head/**": optax.adam(1e-3), "**": optax.adam(1e-5)}, params)
    tr = nj.trainer(model, loss_fn, tx, trainable=nj.finetune.mask(params, exclude="embed/**"))

(the trainer initialises ``tx`` on the trainable leaves only; a group whose leaves
are all frozen simply has no state).

``layerwise_lr_decay`` scales each block's updates by ``decay ** depth_from_top``;
inside a ``repeat`` the scale varies along the stacked axis 0, which a
per-leaf label cannot express, so it is a transformation of its own,
:func:`scale_by_tree`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nnjax.core.errors import ArgumentError, GlobError
from nnjax.core.paths import glob_match, leaf_paths, match
from nnjax.finetune.masks import keypath_str, logical_copies, map_copies
from nnjax.finetune.presets import block_names

__all__ = ["labels", "multi_optimizer", "scale_by_tree", "layerwise_scales", "layerwise_lr_decay"]


def labels(
    params: Any, rules: Mapping[str, Any] | Iterable[str], *, check_unused: bool = True
) -> Any:
    """Each leaf's group: the first glob of ``rules`` that matches its logical path.

    Args:
        params: a params tree, or any subtree of it with the same paths.
        rules: globs in priority order (a dict's keys, or a list).
        check_unused: a rule that claims no leaf (it matches nothing, or only
            leaves an earlier rule took) is an error.

    Returns:
        A tree like ``params`` whose leaves are the glob strings.

    Raises:
        GlobError: a leaf no rule matches (the groups must be exhaustive), a rule
            that claims nothing (with ``check_unused``), or a ``repeat``-stacked leaf
            whose copies fall in different groups (one optimizer state per leaf; use
            :func:`scale_by_tree` for per-copy rates).
    """
    rules = list(rules)
    if not rules:
        raise ArgumentError("expected at least one rule")
    used: set[str] = set()
    unmatched: list[str] = []

    def label(path: str) -> str | None:
        for g in rules:
            if glob_match(g, path):
                used.add(g)
                return g
        unmatched.append(path)
        return None

    def leaf(keypath, x):
        path = keypath_str(keypath)
        copies = logical_copies(path, np.shape(x)).reshape(-1)
        # unmatched copies (label None) are reported below
        groups = {g for p in copies if (g := label(p)) is not None}
        if len(groups) > 1:
            raise GlobError(
                f"the copies of the stacked leaf {path!r} fall in different groups "
                f"{sorted(groups)}; a group is per leaf: use "
                "nj.finetune.scale_by_tree or layerwise_lr_decay for per-copy learning rates"
            )
        return groups.pop() if groups else None

    out = jax.tree_util.tree_map_with_path(leaf, params)
    if unmatched:
        raise GlobError(
            f"groups must be exhaustive: {len(unmatched)} path(s) match no rule, e.g. "
            f"{unmatched[:5]}; add a catch-all rule '**' last"
        )
    unused = [g for g in rules if g not in used]
    if check_unused and unused:
        paths = leaf_paths(params)
        for g in unused:
            hits = [p for p in paths if glob_match(g, p)]
            if not hits:
                match(params, g, what="rule")  # raises with near paths
            raise GlobError(
                f"rule {g!r} claims no leaf: every path it matches ({hits[:3]}...) is taken "
                f"by an earlier rule (first match wins); rules in order: {rules}"
            )
    return out


def multi_optimizer(
    rules: Mapping[str, optax.GradientTransformation], params: Any = None
) -> optax.GradientTransformation:
    """One optax transformation per path group, first matching glob wins.

    Args:
        rules: ``{glob: transformation}`` in priority order, e.g.
            ``{"head/**": optax.adam(1e-3), "**": optax.adam(1e-5)}``.
        params: if given, checked now: every leaf gets a group and every rule
            claims some leaf. Give the full params here; the optimizer may later
            be initialised on a trainable subset (a rule whose leaves are all
            frozen then simply has no state).

    Returns:
        ``optax.multi_transform`` with labels computed from the tree it sees.

    Raises:
        GlobError: see :func:`labels`.

    Example:
        >>> import optax
        >>> model = nj.serial(nj.Dense(16), head=nj.Dense(2))
        >>> params, state = model.init(key, jnp.zeros((1, 8)))
        >>> tx = nj.finetune.multi_optimizer({"head/**": optax.adam(1e-3), "**": optax.adam(1e-5)}, params)
        >>> tr = nj.trainer(model, nj.losses.softmax_cross_entropy, tx)
        >>> ts, metrics = tr.step(tr.init(params, state), (jnp.ones((4, 8)), jnp.array([0, 1, 0, 1])))
    """
    rules = dict(rules)
    if params is not None:
        labels(params, rules)
    # optax keys the transforms by Hashable, and a Mapping's key type is invariant
    transforms: dict[Hashable, optax.GradientTransformation] = dict(rules.items())
    return optax.multi_transform(transforms, lambda tree: labels(tree, rules, check_unused=False))


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by its leaf's scale, found by the leaf's path.

    A scale is a number, or an array over a stacked leaf's leading axes (``(n,)``
    for ``repeat``) broadcast against the update, so copies of one stacked leaf
    can have different rates. Chain it after an optimizer to scale learning rates
    per leaf or per copy: ``optax.chain(optax.adam(lr), scale_by_tree(scales))``.

    Args:
        scales: a tree of scales with the paths of the params (a nested or flat
            ``{"a/b": s}`` dict); the updates may be any subtree of it.

    Raises:
        ArgumentError: an update whose path has no scale, or a scale whose shape is not
            a prefix of the update's.
    """
    flat: dict[str, np.ndarray] = {}
    jax.tree_util.tree_map_with_path(
        lambda kp, s: flat.__setitem__(keypath_str(kp), np.asarray(s, np.float32)), scales
    )

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params

        def scale(keypath, u):
            path = keypath_str(keypath)
            if path not in flat:
                raise ArgumentError(
                    f"scale_by_tree: no scale for {path!r}; scales have {list(flat)[:5]}..."
                )
            s = flat[path]
            if s.shape != tuple(np.shape(u)[: s.ndim]):
                raise ArgumentError(
                    f"scale_by_tree: expected a scale of shape {tuple(np.shape(u)[: s.ndim])} "
                    f"for {path!r} (update {tuple(np.shape(u))}), got {s.shape}"
                )
            s = s.reshape(s.shape + (1,) * (np.ndim(u) - s.ndim))
            return u * jnp.asarray(s, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init, update)


def layerwise_scales(
    params: Any, decay: float, blocks: str = "blocks", below: str | Iterable[str] = ()
) -> Any:
    """Layer-wise learning-rate-decay factors: ``decay ** (n - i)`` for block ``i`` of ``n``.

    Leaves under ``blocks`` (a ``repeat`` or named children ordered by number)
    get ``decay ** (n - i)``, leaves matched by ``below`` (the embeddings)
    ``decay ** (n + 1)``, all others (final norm, head) ``1``.

    Returns:
        A tree like ``params``: floats, or ``(n,)`` float arrays on stacked leaves.
    """
    if not 0.0 < decay <= 1.0:
        raise ArgumentError(f"expected 0 < decay <= 1, got {decay}")
    names = block_names(params, blocks)
    depth = {name: len(names) - i for i, name in enumerate(names)}
    prefix = blocks.strip("/") + "/"
    below_globs = [below] if isinstance(below, str) else list(below)
    if below_globs:
        match(params, below_globs, what="below glob")

    def scale(path: str) -> float:
        if path.startswith(prefix):
            return float(decay ** depth[path[len(prefix) :].split("/")[0]])
        if any(glob_match(g, path) for g in below_globs):
            return float(decay ** (len(names) + 1))
        return 1.0

    return map_copies(scale, params, dtype=np.float32)


def layerwise_lr_decay(
    params: Any,
    base_lr: float | optax.Schedule,
    decay: float,
    *,
    blocks: str = "blocks",
    below: str | Iterable[str] = (),
    optimizer: Callable[[Any], optax.GradientTransformation] = optax.adamw,
) -> optax.GradientTransformation:
    """``optimizer(base_lr)`` with each leaf's updates scaled by :func:`layerwise_scales`.

    Scaling an optimizer's final update by ``s`` is the same as giving that leaf
    a learning rate ``s * base_lr`` (weight decay included, as AdamW scales it by
    the rate too). Inside a ``repeat`` the factor varies along the stacked axis.

    Args:
        params: the params tree (or the subset the trainer optimises).
        base_lr: the top's (head's) learning rate, or an optax schedule.
        decay: factor per block going down, ``0 < decay <= 1`` (0.65 to 0.9 is usual).
        blocks: path of the blocks' parent.
        below: globs of the leaves under the first block (embeddings).
        optimizer: ``learning_rate -> GradientTransformation``.

    Example:
        >>> model = nj.serial(nj.Dense(16), blocks=nj.repeat(nj.Dense(16), 4), head=nj.Dense(2))
        >>> params, _ = model.init(key, jnp.zeros((1, 8)))
        >>> tx = nj.finetune.layerwise_lr_decay(params, 1e-3, 0.8, below="dense_0/**")
        >>> nj.finetune.layerwise_scales(params, 0.8, below="dense_0/**")["blocks"]["stacked"]["kernel"]
        array([0.4096, 0.512 , 0.64  , 0.8   ], dtype=float32)
    """
    scales = layerwise_scales(params, decay, blocks, below)
    return optax.chain(optimizer(base_lr), scale_by_tree(scales))
