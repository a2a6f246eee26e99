"""Griffe extension for nnjax's docstrings (loaded by mkdocstrings from mkdocs.yml).

nnjax's docstrings use Google style with two house sections: ``Example:`` (a doctest,
run by tests/test_docs.py) and ``Params:`` (the parameter tree a layer creates). Griffe
reads ``Example:`` as a plain admonition (its doctest then renders as prose, and
``params["stacked"]`` as a broken link) and ``Params:`` as the function's arguments.
Map them to what they are: an examples section, and an admonition titled Params.
"""

from griffe import DocstringSectionKind, Extension
from griffe._internal.docstrings import google

google._section_kind["example"] = DocstringSectionKind.examples
google._section_kind.pop("params", None)


class NnjaxDocstrings(Extension):
    """Nothing to do per object: importing this module adjusts the Google parser."""
