"""Parameter paths and globs: the names fine-tuning, sharding and checkpoints use.

A leaf's path joins its dict keys with ``/``: ``blocks/attn/query/kernel``.
``repeat`` keeps its ``n`` copies stacked under one key, ``STACKED``; the
*logical* paths expand it into one path per copy (``blocks/3/attn/query/kernel``)
so a glob can pick single copies of a stacked layer.

A mixed stack (``repeat`` of a pattern of layers) keeps each kind's copies under a
key that says which layers they are: ``stacked[1::2]`` holds layers 1, 3, 5, ...
(copy ``j`` is layer ``1 + 2 * j``, as Python's slice). Its logical paths are the
same ``blocks/{i}/...`` as a uniform stack's, so globs, masks and sharding rules
do not see the difference. :func:`stack_key` writes such a key, :func:`parse_stack_key`
reads one; ``STACKED`` is ``stacked[0::1]``.

Globs: ``*`` matches within one segment (``fnmatch`` style), ``**`` matches zero
or more whole segments. A glob that matches nothing is a :class:`GlobError`.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from nnjax.core.errors import GlobError
from nnjax.core.report import param_bytes  # noqa: F401 (nj.paths.param_bytes, its old home)

__all__ = [
    "STACKED",
    "flatten",
    "unflatten",
    "leaf_paths",
    "glob_match",
    "match",
    "map_with_path",
    "count_params",
    "keypath_str",
    "logical_copies",
    "stack_key",
    "parse_stack_key",
    "stack_depth",
    "logical_path",
    "logical_places",
]

STACKED = "stacked"
"""Key under which ``repeat`` stores its copies' params, stacked on axis 0."""

_STACK_KEY = re.compile(r"stacked\[(\d+)::(\d+)\]")


def stack_key(start: int, step: int) -> str:
    """The key of copies that are layers ``start, start + step, ...`` (``STACKED`` for 0, 1).

    Example:
        >>> nj.paths.stack_key(1, 2), nj.paths.stack_key(0, 1)
        ('stacked[1::2]', 'stacked')
    """
    return STACKED if (start, step) == (0, 1) else f"{STACKED}[{start}::{step}]"


def parse_stack_key(key: str) -> tuple[int, int] | None:
    """``(start, step)`` of a stack key (copy ``j`` is logical index ``start + step * j``),
    ``None`` for any other key.

    Example:
        >>> nj.paths.parse_stack_key("stacked[1::2]"), nj.paths.parse_stack_key("attn")
        ((1, 2), None)
    """
    if key == STACKED:
        return 0, 1
    m = _STACK_KEY.fullmatch(key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def stack_depth(path: str) -> int:
    """How many leading axes of the leaf at ``path`` are stacked copies (one per ``repeat``)."""
    return sum(parse_stack_key(k) is not None for k in path.split("/"))


def _items(
    tree: Mapping[str, Any], prefix: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key in tree:
        value = tree[key]
        if isinstance(value, Mapping):
            yield from _items(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (physical paths, stacked copies not expanded)."""
    return {"/".join(p): v for p, v in _items(tree, ())}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def leaf_paths(tree: Mapping[str, Any]) -> list[str]:
    """Every logical leaf path, stacked copies expanded (``blocks/0/...``, ``blocks/1/...``)."""
    out = []
    for path, leaf in _items(tree, ()):
        out.extend(_expand(path, np.shape(leaf)))
    return out


def _expand(path: tuple[str, ...], shape: tuple[int, ...]) -> list[str]:
    """Logical paths of one physical leaf; nested ``repeat``s stack more leading axes."""
    paths = [()]
    axis = 0
    for key in path:
        stack = parse_stack_key(key)
        if stack is not None:
            start, step = stack
            paths = [(*p, str(start + step * j)) for p in paths for j in range(shape[axis])]
            axis += 1
        else:
            paths = [(*p, key) for p in paths]
    return ["/".join(p) for p in paths]


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> tuple[str, ...]:
    return tuple(s for s in pattern.strip("/").split("/"))


def glob_match(pattern: str, path: str) -> bool:
    """Whether ``path`` matches ``pattern`` (``*`` in a segment, ``**`` across segments)."""
    return _match_segments(_compiled(pattern), tuple(path.split("/")))


@functools.lru_cache(maxsize=65536)
def _match_segments(pat: tuple[str, ...], segs: tuple[str, ...]) -> bool:
    if not pat:
        return not segs
    head, rest = pat[0], pat[1:]
    if head == "**":
        return any(_match_segments(rest, segs[i:]) for i in range(len(segs) + 1))
    return bool(segs) and fnmatch.fnmatchcase(segs[0], head) and _match_segments(rest, segs[1:])


def near_paths(pattern: str, paths: Iterable[str], n: int = 5) -> list[str]:
    """Paths that look like ``pattern``, for error messages."""
    paths = list(paths)
    close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.3)
    return close or paths[:n]


def match(tree: Mapping[str, Any], globs: str | Iterable[str], *, what: str = "glob") -> list[str]:
    """Logical paths of ``tree`` matched by any of ``globs``; each glob must match something."""
    globs = [globs] if isinstance(globs, str) else list(globs)
    paths = leaf_paths(tree)
    hits: dict[str, None] = {}
    for g in globs:
        found = [p for p in paths if glob_match(g, p)]
        if not found:
            raise GlobError(
                f"{what} {g!r} matches no parameter path; near paths: {near_paths(g, paths)}"
            )
        hits.update(dict.fromkeys(found))
    return list(hits)


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` with each leaf replaced by ``fn(physical_path, leaf)``."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def count_params(tree: Mapping[str, Any]) -> int:
    """Number of scalars in a params (or state) tree; works on ShapeDtypeStructs."""
    return int(sum(int(np.prod(np.shape(v))) for v in flatten(tree).values()))


def keypath_str(keypath: tuple[Any, ...]) -> str:
    """A ``jax.tree_util`` key path as a ``/`` path (``DictKey('a'), DictKey('b')`` -> ``a/b``)."""
    parts = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def logical_path(path: str, index: tuple[int, ...]) -> str:
    """The logical path of copy ``index`` (one int per stacked axis) of the leaf at ``path``.

    Example:
        >>> nj.paths.logical_path("blocks/stacked[1::2]/attn/query/kernel", (2,))
        'blocks/5/attn/query/kernel'
    """
    it = iter(index)
    out = []
    for key in path.split("/"):
        stack = parse_stack_key(key)
        out.append(key if stack is None else str(stack[0] + stack[1] * next(it)))
    return "/".join(out)


def logical_places(tree: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{logical path: (physical path, index over its stacked axes)}`` of every leaf copy.

    Example:
        >>> params = {"blocks": {"stacked[1::2]": {"w": np.zeros((2, 3))}}}
        >>> nj.paths.logical_places(params)
        {'blocks/1/w': ('blocks/stacked[1::2]/w', (0,)), 'blocks/3/w': ('blocks/stacked[1::2]/w', (1,))}
    """
    out = {}
    for path, leaf in flatten(tree).items():
        for idx in np.ndindex(*np.shape(leaf)[: stack_depth(path)]):
            out[logical_path(path, idx)] = (path, tuple(int(i) for i in idx))
    return out


def logical_copies(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Logical paths of one physical leaf, as an object array over its stacked axes.

    ``logical_copies("blocks/stacked/w", (3, 4, 4))`` is
    ``["blocks/0/w", "blocks/1/w", "blocks/2/w"]`` (shape ``(3,)``); a leaf outside
    any ``repeat`` gives a 0-d array holding ``path``.
    """
    dims = tuple(int(d) for d in shape[: stack_depth(path)])
    out = np.empty(dims, dtype=object)
    for idx in np.ndindex(*dims):
        out[idx] = logical_path(path, idx)
    return out
