"""One forward of a model's shared part per batch for all heads: calls of the head-free
submodules, memoised.

``forward(x, t)`` is a black box to SPG, but in a multi-head network it calls the same shared
modules on the same input tensor for every head ``t`` (``heads[t](trunk(x))``). While a
``TrunkMemo`` is active, each maximal submodule that holds no head parameter returns, for a call
with the same arguments as an earlier call in the same batch (the same tensor objects, unmodified;
equal plain values), that call's output, which is part of the same autograd graph. So the trunk runs
once per batch and every head's gradient flows through one graph. This is exact for a deterministic
forward; with active randomness (dropout), all heads of a batch see the same random draws, where
separate forwards would draw afresh.

A model whose forward builds a new tensor before the shared modules (``trunk(x / 255)`` inside
``forward``) gets no memo hits: still correct, but every head pays its own forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves


def head_free_modules(model: nn.Module, head_params: Iterable[Tensor]) -> list[nn.Module]:
    """The maximal submodules of ``model`` that hold none of ``head_params`` (each module once)."""
    head_ids = {id(p) for p in head_params}
    found: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if any(id(p) in head_ids for p in child.parameters()):
                visit(child)
            else:
                found.setdefault(id(child), child)

    visit(model)
    return list(found.values())


@dataclass
class _Entry:
    args: tuple[Any, ...]
    versions: tuple[int, ...]
    output: Any


def _tensors(value: Any) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, Tensor)]


def _versions(tensors: list[Tensor]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    """Tensors by identity, plain values by type and value; None (no memo) when an argument is
    unhashable or a container of tensors."""
    parts: list[Hashable] = []
    for name, item in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(item, Tensor):
            parts.append((name, "tensor", id(item)))
            continue
        if _tensors(item):
            return None
        try:
            hash(item)
        except TypeError:
            return None
        parts.append((name, type(item), item))
    return tuple(parts)


class TrunkMemo:
    """Context manager: while active, the head-free submodules of ``model`` memoise their calls
    until ``clear()``.

    ``hits`` counts the calls answered from the memo (for tests and benchmarks).
    """

    def __init__(self, model: nn.Module, head_params: Iterable[Tensor]) -> None:
        self._modules = head_free_modules(model, head_params)
        self._memo: dict[tuple[int, Hashable], _Entry] = {}
        self._saved: list[tuple[nn.Module, Callable[..., Any] | None]] = []
        self.hits = 0

    def __enter__(self) -> TrunkMemo:
        for module in self._modules:
            own = module.__dict__.get("forward")
            self._saved.append((module, own))
            module.forward = self._memoised(module, own or module.forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, own in self._saved:
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._saved.clear()
        self.clear()

    def clear(self) -> None:
        """Forget every memoised call (between batches)."""
        self._memo.clear()

    def _memoised(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)
        def call(*args: Any, **kwargs: Any) -> Any:
            key = _key(args, kwargs)
            if key is None:
                return forward(*args, **kwargs)
            slot = (id(module), key)
            entry = self._memo.get(slot)
            inputs = _tensors((args, kwargs))
            if entry is not None and entry.versions == _versions(inputs + _tensors(entry.output)):
                self.hits += 1
                return entry.output
            output = forward(*args, **kwargs)
            # The arguments are kept so that the ids in the key cannot be reused by new tensors
            # within the batch.
            self._memo[slot] = _Entry((args, kwargs), _versions(inputs + _tensors(output)), output)
            return output

        return call
