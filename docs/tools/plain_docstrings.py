"""Griffe extension for the API reference: spg-fast's docstrings are plain text with ``code`` in
double backticks, not Markdown, so an index written outside backticks (``R[i][j]``, ``A[k]``) is
not a link. Brackets that directly follow a name or a closing bracket are escaped before
mkdocstrings renders the docstring; text inside backticks is left as it is."""

from __future__ import annotations

import re
from typing import Any

import griffe

# A backtick code span, or a bracket right after a word character or a closing bracket.
_PIECE = re.compile(r"(?P<code>(`+).*?\2)|(?<=[\w\]])(?P<open>\[)(?P<inner>[^\[\]`]*)(?P<close>\])")


def plain(text: str) -> str:
    """``text`` with subscript brackets escaped outside backtick code spans."""

    def escape(match: re.Match[str]) -> str:
        if match["code"]:
            return match["code"]
        return rf"\[{match['inner']}\]"

    return _PIECE.sub(escape, text)


class PlainDocstrings(griffe.Extension):
    """Escape subscript brackets in every docstring Griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
