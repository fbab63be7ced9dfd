"""Check that the built site's API reference documents every public name (``make docs`` runs it
after ``mkdocs build --strict``).

The public names are read from the source with Griffe, without importing anything (so the
optional frameworks of ``spg_fast.integrations`` need not be installed): ``__all__`` where a module
has one, otherwise every name the module defines that does not start with an underscore. A name
counts as documented when some page of the site has an object heading for it, under its public
path (``spg_fast.SPG``) or where it is defined (``spg_fast.spg.SPG``).

Usage: ``python docs/tools/check_api.py [site_dir]`` (default ``site``); exit status 1 lists what
is missing.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[2]
# The public modules whose names the reference must cover, with the names to check where not all
# of them (the command line's module-level help texts are not API); spg_fast.integrations: every
# submodule without a leading underscore.
MODULES: dict[str, list[str] | None] = {
    "spg_fast": None,
    "spg_fast.optim": None,
    "spg_fast.reference": None,
    "spg_fast.storage": None,
    "spg_fast.mask_mode": None,
    "spg_fast.usage": None,
    "spg_fast.checkpoint": None,
    "spg_fast.harness": None,
    "spg_fast.cli": ["main", "parser"],
}


def _public_names(
    module: griffe.Module, chosen: list[str] | None
) -> list[griffe.Object | griffe.Alias]:
    if chosen is not None:
        return [module.members[n] for n in chosen]
    exported = module.exports
    if exported is not None:
        names = [e if isinstance(e, str) else e.name for e in exported]
        return [module.members[n] for n in names if n in module.members]
    return [
        m
        for name, m in module.members.items()
        if not name.startswith("_") and not m.is_alias and not m.is_module
    ]


def public_paths(package: griffe.Module) -> list[tuple[str, set[str]]]:
    """Each public name with the paths a heading for it may have."""
    modules = [(package.modules_collection[m], names) for m, names in MODULES.items()]
    integrations = package.get_member("integrations")
    modules += [(m, None) for name, m in integrations.modules.items() if not name.startswith("_")]
    found = []
    for module, chosen in modules:
        for member in _public_names(module, chosen):
            paths = {member.path}
            if member.is_alias:
                paths.add(member.target_path)
                try:
                    if member.final_target.is_module:
                        continue  # a module re-exported (spg_fast.optim): its own names are checked
                except griffe.AliasResolutionError:
                    pass
            found.append((f"{module.path}.{member.name}", paths))
    return found


def documented(site: Path) -> set[str]:
    """The object ids of every page under ``site/api``."""
    ids: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        ids.update(re.findall(r'id="(spg_fast[\w.]*)"', page.read_text(encoding="utf-8")))
    return ids


def main(argv: list[str]) -> int:
    site = Path(argv[0]) if argv else ROOT / "site"
    if not (site / "api").is_dir():
        print(f"check_api: no {site / 'api'}; run mkdocs build first", file=sys.stderr)
        return 1
    package = griffe.load("spg_fast", search_paths=[str(ROOT)], resolve_aliases=True)
    ids = documented(site)
    names = public_paths(package)
    missing = [name for name, paths in names if not paths & ids]
    if missing:
        print("check_api: not in the API reference: " + ", ".join(missing), file=sys.stderr)
        return 1
    print(f"check_api: all {len(names)} public names are in the API reference")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
