"""The error contract, kept: nnjax raises its own ``NNJaxError`` kinds, never a bare built-in.

Every error a user can cause is an :class:`nnjax.NNJaxError` subclass (``ArgumentError``,
``LayerError``, ``DataError``, ``CheckpointError``, ...; each also a ``ValueError`` or
``TypeError``, so callers that catch those keep working). New code must follow it: this
test reads every module of ``nnjax/`` and fails on a ``raise ValueError(...)``,
``TypeError``, ``KeyError`` or ``RuntimeError``, naming the file and line.
"""

import ast
import pathlib

import nnjax as nj

ROOT = pathlib.Path(__file__).resolve().parents[1] / "nnjax"
BARE = {"ValueError", "TypeError", "KeyError", "RuntimeError"}


def _bare_raises(file: pathlib.Path) -> list[str]:
    tree = ast.parse(file.read_text(), filename=str(file))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            fn = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(fn, ast.Name) and fn.id in BARE:
                out.append(f"{file.relative_to(ROOT.parent)}:{node.lineno}: raise {fn.id}")
    return out


def test_no_bare_builtin_raise_in_nnjax():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50  # the package is read
    found = [hit for f in files for hit in _bare_raises(f)]
    assert not found, (
        "raise an nnjax.core.errors kind (ArgumentError, LayerError, DataError, CheckpointError, "
        "...) instead of a bare built-in:\n" + "\n".join(found)
    )


def test_the_error_kinds_keep_the_builtin_bases_callers_catch():
    for kind in (nj.ArgumentError, nj.LayerError, nj.DataError, nj.CheckpointError, nj.GlobError):
        assert issubclass(kind, nj.NNJaxError) and issubclass(kind, ValueError)
    assert issubclass(nj.ArgumentError, TypeError)
