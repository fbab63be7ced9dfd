"""The public surface, pinned: what ``import spg_fast`` exports, what an ``SPG`` object offers,
which modules are public (everything else is underscored), and that every public callable says what
it does. A change here is a change users see: update the API reference (docs/api) with it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import torch

import spg_fast
from spg_fast import SPG, AttachHandle, SPGOptimizer

EXPORTS = {
    "BACKENDS",
    "IMPORTANCE_DTYPES",
    "MASK_MODES",
    "SPG",
    "AttachHandle",
    "MaskMode",
    "PassProgress",
    "PassReport",
    "SPGOptimizer",
    "SPGState",
    "Usage",
    "__version__",
    "optim",
    "reference",
}
SPG_API = {
    "attach",
    "backend",
    "end_task",
    "head_parameters",
    "head_scale",
    "importance",
    "importance_dtype",
    "keep_factors",
    "load_state_dict",
    "mask_gradients",
    "shared_parameters",
    "state_dict",
    "tasks_finished",
    "usage",
    "wrap",
}
PUBLIC_MODULES = {
    "checkpoint",
    "cli",
    "harness",
    "integrations",
    "kernels",
    "mask_mode",
    "optim",
    "optimizer",
    "reference",
    "spg",
    "storage",
    "usage",
}


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def test_the_package_exports_exactly_the_public_names():
    assert set(spg_fast.__all__) == EXPORTS
    assert all(hasattr(spg_fast, name) for name in EXPORTS)
    assert spg_fast.optim.__all__ == ["SGD", "Adam", "AdamW"]


def test_spg_offers_exactly_its_user_api():
    assert _public(dir(SPG)) == SPG_API
    assert _public(dir(AttachHandle)) == {"mask", "mask_modes", "remove"}
    torch_api = _public(dir(torch.optim.Optimizer)) | {"defaults", "param_groups", "state"}
    assert _public(dir(SPGOptimizer)) - torch_api == {"mask", "mask_modes", "optimizer"}


def test_internal_modules_are_underscored():
    modules = {m.name for m in pkgutil.iter_modules(spg_fast.__path__)}
    assert _public(modules) == PUBLIC_MODULES


def test_every_public_callable_has_a_docstring():
    missing = []
    for module_name in ("spg", "optimizer", "mask_mode", "storage", "usage", "checkpoint"):
        module = importlib.import_module(f"spg_fast.{module_name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if callable(obj) and not inspect.getdoc(obj):
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and callable(member) and not inspect.getdoc(member):
                        missing.append(f"{module_name}.{name}.{attr}")
    assert not missing, missing
