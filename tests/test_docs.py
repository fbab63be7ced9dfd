"""The documentation's own checks that need no docs tools (``make docs`` builds the site strictly):
every Python code block in the README and under docs/ parses, every relative link in them names a
file or folder of the repository (and a heading where it names one), and the README stays a
landing page."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 300
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "tools" not in p.parts)
PYTHON = {"python", "py", "python3"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)")
# An inline link or image target: ](target) or ](target "title").
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"(`+).*?\1")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """The fenced code blocks of a Markdown text: (first line number, info string, code)."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        start = _FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        fence, body = start["fence"], []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((i - len(body) + 1, start["info"].lower(), textwrap.dedent("\n".join(body))))
        i += 1
    return blocks


def prose_lines(text: str, *, code: bool = False) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their numbers; code spans removed unless
    ``code``."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        start = _FENCE.match(line)
        if fenced is None and start:
            fenced = start["fence"]
        elif fenced is not None and line.strip().startswith(fenced):
            fenced = None
        elif fenced is None:
            out.append((number, line if code else _CODE_SPAN.sub("", line)))
    return out


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs make it: lower case, code marks and punctuation
    other than ``-`` and ``_`` dropped, spaces made hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> tuple[set[str], list[str]]:
    """The anchors of a Markdown page's headings, and the objects its mkdocstrings directives
    (``::: spg_fast.x``) document, whose members' anchors start with the object's path."""
    found, objects = set(), []
    for _, line in prose_lines(page.read_text(encoding="utf-8"), code=True):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            found.add(slug(heading[1]))
        directive = re.match(r"^:::\s+(\S+)", line)
        if directive:
            objects.append(directive[1])
    return found, objects


def has_anchor(page: Path, anchor: str) -> bool:
    """Whether ``anchor`` names a heading of ``page`` or an object it documents."""
    headings, objects = anchors(page)
    return anchor in headings or any(anchor == o or anchor.startswith(o + ".") for o in objects)


def relative_links(page: Path) -> list[tuple[int, str]]:
    """The relative link targets of a Markdown page outside code (no scheme, not bare anchors)."""
    links = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for match in _LINK.finditer(line):
            target = match["target"]
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", [README, *PAGES], ids=_name)
def test_python_blocks_parse(page):
    for line, info, code in fenced_blocks(page.read_text(encoding="utf-8")):
        if info in PYTHON:
            try:
                ast.parse(code)
            except SyntaxError as error:
                pytest.fail(f"{_name(page)}:{line + (error.lineno or 1) - 1}: {error.msg}")


@pytest.mark.parametrize("page", [README, *PAGES], ids=_name)
def test_relative_links_resolve(page):
    broken = []
    for line, target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{_name(page)}:{line}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and not has_anchor(resolved, anchor):
            broken.append(f"{_name(page)}:{line}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it a landing page of at most {README_MAX_LINES} and "
        "move the rest to docs/"
    )


def test_the_checks_see_code_links_and_headings():
    text = (
        "# A `b` title\n\n```python\nx = (\n```\n\n[t](a.md#x) `[u](b.md)`\n~~~\n[v](c.md)\n~~~\n"
    )
    assert fenced_blocks(text) == [(4, "python", "x = ("), (9, "", "[v](c.md)")]
    assert [target for _, target in _links_of(text)] == ["a.md#x"]
    assert slug("Storage formats: `importance_dtype`") == "storage-formats-importance_dtype"
    assert slug("`spg_fast.optim`: the fused optimizers") == "spg_fastoptim-the-fused-optimizers"


def _links_of(text: str) -> list[tuple[int, str]]:
    return [(n, m["target"]) for n, line in prose_lines(text) for m in _LINK.finditer(line)]
