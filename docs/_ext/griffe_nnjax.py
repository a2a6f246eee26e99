"""Griffe extension for nnjax's docstrings (loaded by mkdocstrings from mkdocs.yml).

nnjax's docstrings use Google style with two house sections: ``Example:`` (a doctest,
run by tests/test_docs.py) and ``Params:`` (the parameter tree a layer creates). Griffe
reads ``Example:`` as a plain admonition (its doctest then renders as prose, and
``params["stacked"]`` as a broken link) and ``Params:`` as the function's arguments.
Map them to what they are: an examples section, and an admonition titled Params.

The docstrings also name other objects with Sphinx roles (``:class:`~nnjax.models.GPT```),
which ``help()`` shows as written and Markdown would show literally. On the site they
become inline code, as Sphinx displays them: the last name after ``~``, else the target.
"""

import re

from griffe import DocstringSectionKind, Extension
from griffe._internal.docstrings import google

google._section_kind["example"] = DocstringSectionKind.examples
google._section_kind.pop("params", None)

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|obj|exc):`(~?)([^`]+)`")


def roles_as_code(text: str) -> str:
    """``:class:`~a.B``` -> ```B```, ``:func:`a.b``` -> ```a.b```: Sphinx's display text."""
    return _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class NnjaxDocstrings(Extension):
    """Rewrites each docstring's Sphinx roles; importing the module adjusts the parser."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = roles_as_code(obj.docstring.value)
