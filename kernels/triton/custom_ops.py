"""How the launchers are called: eagerly without the dispatcher's per-tensor cost, and on the
tensors' device.

Every launcher is a ``torch.library`` custom op, so ``torch.compile`` traces it without graph
breaks. Called eagerly, the custom-op dispatch costs about 3 microseconds per tensor argument
(version-counter bumps and alias checks in Python: 4-6 ms per masked AdamW step over 954 tensors,
more than the step itself on an H100). Outside compilation the launcher runs directly and the
mutated tensors' version counters are bumped in one call, as the dispatcher would.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence

import torch


def eager_fast_path(
    op: Callable[..., object], impl: Callable[..., object], mutated: Sequence[str]
) -> Callable[..., object]:
    """A function with ``impl``'s signature: ``op`` (the custom op) while compiling, else ``impl``
    followed by the version-counter bump of the tensor lists named in ``mutated``."""
    signature = inspect.signature(impl)

    @functools.wraps(impl)
    def call(*args: object, **kwargs: object) -> object:
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        result = impl(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        torch.autograd.graph.increment_version([t for name in mutated for t in arguments[name]])
        return result

    return call


def in_place_op(
    name: str, impl: Callable[..., None], mutated: Sequence[str]
) -> Callable[..., None]:
    """``impl`` (which returns nothing and mutates the tensor lists named in ``mutated``) registered
    as the custom op ``spg_fast::<name>``, called through ``eager_fast_path``."""
    op = torch.library.custom_op(f"spg_fast::{name}", mutates_args=tuple(mutated))(impl)
    op.register_fake(_returns_nothing)
    return eager_fast_path(op, impl, mutated)


def _returns_nothing(*args: object, **kwargs: object) -> None:
    return None


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch: Triton launches on the current CUDA device, so
    parameters on ``cuda:1`` would otherwise be launched on ``cuda:0``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
