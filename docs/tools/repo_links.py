"""MkDocs hook: links from a page to repository files outside ``docs/`` (``bench/results/``,
``examples/``, ...).

MkDocs only knows the files under ``docs/``, so it would report such a link as not found; this hook
checks instead that the file or folder exists in the repository (a missing one fails the build) and
points the link at it: at ``<repo_url>/tree/main/<path>`` when ``repo_url`` is set in
``mkdocs.yml``, otherwise at the file in the checkout the site was built in (relative to the built
page, so it works when the site is read from ``site/`` inside the repository).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

_SCHEME = "repo-file:"
# An inline Markdown link or image target: ](target) or ](target "title").
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)")


def _outside_docs(target: str, page_dir: Path, docs_dir: Path, root: Path) -> str | None:
    """The repository path ``target`` names when it leaves ``docs_dir``, else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.split("#", 1)[0]
    if not path:
        return None
    resolved = Path(os.path.normpath(page_dir / path))
    if resolved == docs_dir or docs_dir in resolved.parents:
        return None
    if root not in resolved.parents:
        raise PluginError(f"link {target!r} leaves the repository")
    if not resolved.exists():
        raise PluginError(
            f"link {target!r} names {resolved.relative_to(root)}, which does not exist"
        )
    return resolved.relative_to(root).as_posix() + ("/" if resolved.is_dir() else "")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    page_dir = (docs_dir / page.file.src_path).parent
    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        if not fenced:
            try:
                line = _LINK.sub(lambda m: _rewrite(m, page_dir, docs_dir, root), line)
            except PluginError as error:
                raise PluginError(f"{page.file.src_path}: {error}") from None
        out.append(line)
    return "".join(out)


def _rewrite(match: re.Match[str], page_dir: Path, docs_dir: Path, root: Path) -> str:
    target = match["target"]
    repo_path = _outside_docs(target, page_dir, docs_dir, root)
    if repo_path is None:
        return match[0]
    anchor = "#" + target.split("#", 1)[1] if "#" in target else ""
    return f"]({_SCHEME}{repo_path}{anchor}{match['title'] or ''})"


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    repo_url = (config.get("repo_url") or "").rstrip("/")
    site_page_dir = (Path(config["site_dir"]) / page.file.dest_path).resolve().parent
    root = Path(config["docs_dir"]).resolve().parent

    def url(match: re.Match[str]) -> str:
        path = match["path"]
        if repo_url:
            return f'{match["attr"]}="{repo_url}/tree/main/{path}"'
        relative = os.path.relpath(root / path, site_page_dir).replace(os.sep, "/")
        return f'{match["attr"]}="{relative}{"/" if path.endswith("/") else ""}"'

    return re.sub(rf'(?P<attr>href|src)="{_SCHEME}(?P<path>[^"]*)"', url, html)
