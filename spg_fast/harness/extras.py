"""The harness's optional dependencies (the ``harness`` extra), checked before a run reads any data
so that a plain ``pip install`` says what to add instead of failing half-way."""

from __future__ import annotations

import importlib.util

INSTALL = "pip install 'spg-fast[harness]' (from a clone: pip install '.[harness]')"
PACKAGES = {"sklearn": "scikit-learn", "PIL": "pillow"}  # where the import name differs


class MissingExtraError(ImportError):
    """An optional package the harness needs is not installed (the message says what to run)."""


def require(*modules: str) -> None:
    """Raise ``MissingExtraError`` naming the package of every module of ``modules`` that cannot
    be imported."""
    missing = [PACKAGES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"the harness needs {', '.join(missing)}: {INSTALL}")


def require_tensorboard() -> None:
    """Raise ``MissingExtraError`` unless TensorBoard's package is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MissingExtraError(
            "--tensorboard: the tensorboard package is not installed: pip install tensorboard "
            "(or the extra: pip install 'spg-fast[tensorboard]')"
        )
