"""The public surface: ``nj.__all__`` is what the top level holds, and ``help()`` lists it."""

import importlib
import pkgutil
import sys
import types

import nnjax
import nnjax as nj

# Subpackages Python binds on the parent when they are imported: not names we export.
_BOUND_SUBPACKAGES = {"core", "training", "app", "eval", "kernels"}


def test_all_names_exist_and_nothing_else_is_public():
    missing = [n for n in nj.__all__ if not hasattr(nj, n)]
    assert not missing
    extra = {n for n in dir(nj) if not n.startswith("_")} - set(nj.__all__) - _BOUND_SUBPACKAGES
    assert not extra, f"public at nnjax's top level but not in __all__: {sorted(extra)}"
    assert len(nj.__all__) == len(set(nj.__all__))


def test_help_lists_every_top_level_name():
    doc = nj.__doc__
    missing = [n for n in nj.__all__ if n not in doc]
    assert not missing, f"nnjax's docstring (help(nnjax)) does not list {missing}"


def test_help_finetune_lists_every_function():
    doc = nj.finetune.__doc__
    public = [
        n
        for n, v in vars(nj.finetune).items()
        if not n.startswith("_")
        and isinstance(v, types.FunctionType)
        and v.__module__.startswith("nnjax.finetune")
    ]
    missing = [n for n in public if n not in doc]
    assert public and not missing, f"help(nnjax.finetune) does not list {missing}"


def test_no_module_shadows_the_standard_library():
    names = [m.name for m in pkgutil.walk_packages(nnjax.__path__, "nnjax.")]
    shadowing = [n for n in names if n.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert not shadowing


def test_public_names_are_not_two_cases_of_one_word():
    lower = {}
    for n in nj.__all__:
        lower.setdefault(n.lower(), []).append(n)
    clashes = [v for v in lower.values() if len(v) > 1]
    assert not clashes


def test_every_module_imports_and_exports_what_its_all_lists():
    missing, modules = [], 0
    for m in pkgutil.walk_packages(nnjax.__path__, "nnjax."):
        if not m.name.endswith("__main__"):
            module = importlib.import_module(m.name)
            modules += 1
            missing += [
                f"{m.name}.{n}" for n in getattr(module, "__all__", ()) if not hasattr(module, n)
            ]
    assert missing == []
    assert modules >= 80  # the floors' packages and modules were all found (88 today)
