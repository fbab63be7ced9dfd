"""One forward of a model's shared part per batch for all heads of a group.

``forward(x, t)`` is a black box to SPG. Two ways let the heads of a group share one forward:

- **head capture** (``HeadCapture``): on the group's first batch every head runs its own forward
  while hooks on the head modules (the modules whose parameters are all head parameters) record
  what each forward hands its head. When each forward calls exactly one head module, once, with one
  tensor, returns that module's output untouched, and every head's input has the same values and
  the same autograd graph as the first head's (``same_graph``: the same operations on the same
  parameters with the same saved values), then from the second batch on only the first head's
  forward runs (its head-module call checked as on the first batch; a batch that fails the check
  runs every head's forward), and every other head module is called on the input captured from
  it. This does not depend on how the trunk is written (submodules, functional calls, one flat
  ``forward``). The first batch holds the first head's graph until every head's forward has been
  compared with it.
- **trunk memo** (``TrunkMemo``): each maximal submodule that holds no head parameter returns, for
  a call with the same arguments as an earlier call in the same batch (the same tensor objects,
  unmodified; equal plain values), that call's output. It shares only what such submodules compute
  from the same tensors: a trunk written as one submodule (``heads[t](trunk(x))``) runs once, a
  trunk written with functional calls between its layers runs again for every head from the first
  functional call on. It is the fallback where the capture cannot be verified.

``SharedForward`` combines them for one pass over the data. Both are exact for a forward that draws
no random numbers: each head's output is the one its own forward would give, in the same autograd
graph. With randomness (dropout, when sharing is forced) the head capture gives all heads of a batch
the same random draws (on the first batch every head's forward starts from the same generator
state); the trunk memo shares the draws of the memoised submodules only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from spg_fast._randomness import generator_states, restore_generator_states


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


def head_modules(model: nn.Module, head_params: Iterable[Tensor]) -> list[nn.Module]:
    """The submodules of ``model`` (``model`` included) that hold at least one parameter, all of
    them among ``head_params``."""
    head_ids = {id(p) for p in head_params}
    found = []
    for module in model.modules():
        params = list(module.parameters())
        if params and all(id(p) in head_ids for p in params):
            found.append(module)
    return found


def same_graph(a: Tensor, b: Tensor) -> bool:
    """Whether the autograd graphs behind ``a`` and ``b`` compute the same backward: node for node
    (a one-to-one map, so shared nodes stay shared) the same type, the same parameter accumulated
    into, the same inputs by position and equal saved values (tensors by value, and a custom
    ``autograd.Function``'s context attributes)."""
    if a is b:
        return True
    if a.grad_fn is None or b.grad_fn is None:
        return a.grad_fn is b.grad_fn and not a.requires_grad and not b.requires_grad
    forward: dict[Any, Any] = {}
    backward: dict[Any, Any] = {}
    stack = [(a.grad_fn, b.grad_fn)]
    while stack:
        x, y = stack.pop()
        if x in forward or y in backward:
            if forward.get(x) is not y or backward.get(y) is not x:
                return False
            continue
        forward[x], backward[y] = y, x
        if x is y:
            continue
        if (
            type(x) is not type(y)
            or getattr(x, "variable", None) is not getattr(y, "variable", None)
            or not _same_saved(x, y)
            or len(x.next_functions) != len(y.next_functions)
        ):
            return False
        for (cx, nx), (cy, ny) in zip(x.next_functions, y.next_functions, strict=True):
            if nx != ny or (cx is None) != (cy is None):
                return False
            if cx is not None:
                stack.append((cx, cy))
    return True


@functools.cache
def _saved_names(node_type: type) -> tuple[str, ...]:
    return tuple(name for name in dir(node_type) if name.startswith("_saved_"))


def _same_saved(x: Any, y: Any) -> bool:
    """Whether two autograd nodes of one type saved equal values for their backward."""
    try:
        if not all(_same_value(getattr(x, n), getattr(y, n)) for n in _saved_names(type(x))):
            return False
        if isinstance(x, torch.autograd.function.BackwardCFunction):
            return _same_value(x.saved_tensors, y.saved_tensors) and _same_value(vars(x), vars(y))
    except RuntimeError:  # a saved value already freed: nothing to compare, so not the same
        return False
    return True


def _same_value(u: Any, v: Any) -> bool:
    if isinstance(u, Tensor) or isinstance(v, Tensor):
        return (
            isinstance(u, Tensor)
            and isinstance(v, Tensor)
            and u.dtype == v.dtype
            and u.shape == v.shape
            and ((u.data_ptr() == v.data_ptr() and u.stride() == v.stride()) or torch.equal(u, v))
        )
    if isinstance(u, (tuple, list)):
        return (
            type(u) is type(v)
            and len(u) == len(v)
            and all(_same_value(p, q) for p, q in zip(u, v, strict=True))
        )
    if isinstance(u, dict):
        return (
            isinstance(v, dict) and u.keys() == v.keys() and all(_same_value(u[k], v[k]) for k in u)
        )
    try:
        return bool(u == v)
    except Exception:  # an object whose equality is not a plain truth value
        return False


@dataclass
class _Call:
    """A call of a head module at the top level (not from inside another head module) during a
    watched forward; ``output_versions`` is None until it returns."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: tuple[int, ...]
    output: Any = None
    output_versions: tuple[int, ...] | None = None


class HeadCapture:
    """Context manager for one pass of the heads ``heads`` over the data: hooks on the head modules
    of ``model`` that let every head after the first be evaluated on the input the first head's
    forward gave its head module (see the module docstring).

    ``output(batch, j, forward)`` gives the output of the group's ``j``-th head; ``fallback`` says
    why the capture is not used (empty while it is); ``misses`` names the later batches whose first
    forward did not call its head module as on the first batch (their heads ran their own
    forwards); ``hits`` counts the heads evaluated on a captured input."""

    def __init__(
        self,
        model: nn.Module,
        head_params: Iterable[Tensor],
        heads: list[int],
        device: torch.device,
    ) -> None:
        self._head_modules = head_modules(model, head_params)
        self._heads = heads
        self._device = device
        self._handles: list[Any] = []
        self._calls: list[_Call] = []
        self._depth = 0
        self._watching = False
        self._modules: list[nn.Module] = []  # per head of the group, found on the first batch
        self._reference: Tensor | None = None  # the first head's input, on the first batch
        self._generators: list[Tensor] = []
        self._input: Tensor | None = None
        self.fallback = (
            "" if self._head_modules else "no module's parameters are all head parameters"
        )
        self.misses: list[str] = []
        self.hits = 0

    def __enter__(self) -> HeadCapture:
        for module in self._head_modules:
            self._handles.append(
                module.register_forward_pre_hook(self._before, prepend=True, with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_batch()

    def end_batch(self) -> None:
        """Let go of the batch's captured input (and its autograd graph)."""
        self._input = None
        self._reference = None
        self._calls.clear()

    def output(self, batch: int, j: int, forward: Callable[[], Any]) -> Any:
        """The output of the group's ``j``-th head at ``batch`` (counting from 0), whose own
        forward is ``forward``; the heads of a batch are asked for in order."""
        if self.fallback:
            return forward()
        if batch == 0:
            return self._discover(j, forward)
        if j > 0:
            if self._input is None:
                return forward()
            self.hits += 1
            return self._modules[j](self._input)
        out, call = self._watched(forward)
        if isinstance(call, str) or call.module is not self._modules[0]:
            why = call if isinstance(call, str) else "it called another head module"
            self.misses.append(f"batch {batch}: {why}")
        else:
            self._input = call.args[0]
        return out

    def _discover(self, j: int, forward: Callable[[], Any]) -> Any:
        """The first batch: head ``j``'s own forward, checked against the first head's; every head
        starts from the same random state, as they would share the later batches' draws."""
        if j == 0:
            self._generators = generator_states(self._device)
        else:
            restore_generator_states(self._device, self._generators)
        out, call = self._watched(forward)
        why = call if isinstance(call, str) else self._differs(j, call.args[0])
        if why:
            self.fallback = f"head {self._heads[j]} on the first batch: {why}"
            return out
        if j == 0:
            self._reference = call.args[0]
        self._modules.append(call.module)
        return out

    def _differs(self, j: int, head_input: Tensor) -> str:
        """Why ``head_input`` is not, as far as the gradients can tell, the first head's input; or
        ``""``."""
        first = self._reference
        if j == 0 or first is None:
            return ""
        if not _same_value(head_input, first):
            return (
                f"its head module's input differs from head {self._heads[0]}'s (work specific "
                "to the head)"
            )
        if not same_graph(head_input, first):
            return (
                "its head module's input is computed by other operations, parameters or saved "
                f"values than head {self._heads[0]}'s (work specific to the head)"
            )
        return ""

    def _watched(self, forward: Callable[[], Any]) -> tuple[Any, _Call | str]:
        """``forward()`` and its one top-level head-module call, or why it has not exactly one
        usable call."""
        self._calls.clear()
        self._depth = 0
        self._watching = True
        try:
            out = forward()
        finally:
            self._watching = False
        call = self._checked(out)
        self._calls.clear()
        return out, call

    def _checked(self, out: Any) -> _Call | str:
        calls = self._calls
        if not calls:
            return "the forward called no head module"
        if len(calls) > 1:
            return f"the forward called head modules {len(calls)} times"
        call = calls[0]
        if call.kwargs or len(call.args) != 1 or not isinstance(call.args[0], Tensor):
            return "the head module was called with other than one tensor argument"
        if call.output_versions is None or out is not call.output:
            return (
                "the forward's output is not its head module's output (it is computed from it, "
                "or the forward returns more)"
            )
        if (
            _versions(_tensors(call.args)) != call.versions
            or _versions(_tensors(call.output)) != call.output_versions
        ):
            return "the forward changed its head module's input or output in place after the call"
        return call

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._watching:
            return
        if self._depth == 0:
            self._calls.append(_Call(module, args, kwargs, _versions(_tensors((args, kwargs)))))
        self._depth += 1

    def _after(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._watching:
            return
        self._depth -= 1
        if self._depth == 0:
            call = self._calls[-1]
            call.output = output
            call.output_versions = _versions(_tensors(output))


class SharedForward:
    """Context manager for one pass over the data in which the heads ``heads`` share each batch's
    forward: the head capture where it holds, the trunk memo under it (which also serves the first
    batch, and every batch when the capture does not hold).

    ``output(batch, j, forward)`` gives the output of the ``j``-th head; call ``end_batch()`` after
    each batch."""

    def __init__(
        self,
        model: nn.Module,
        head_params: Iterable[Tensor],
        heads: list[int],
        device: torch.device,
    ) -> None:
        head_params = list(head_params)
        self._memo = TrunkMemo(model, head_params)
        self._capture = HeadCapture(model, head_params, heads, device)

    def __enter__(self) -> SharedForward:
        self._memo.__enter__()
        try:
            self._capture.__enter__()
        except BaseException:
            self._memo.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._capture.__exit__()
        finally:
            self._memo.__exit__()

    def output(self, batch: int, j: int, forward: Callable[[], Any]) -> Any:
        """The output of the ``j``-th head at ``batch`` (counting from 0)."""
        return self._capture.output(batch, j, forward)

    def end_batch(self) -> None:
        self._memo.clear()
        self._capture.end_batch()

    @property
    def strategy(self) -> str:
        """``"head capture"`` or ``"trunk memo"``."""
        return "trunk memo" if self._capture.fallback else "head capture"

    @property
    def fallback(self) -> str:
        """Why the head capture was not used (or, for some batches, not), in words; ``""`` when it
        was used throughout."""
        return self._capture.fallback or "; ".join(self._capture.misses)

    @property
    def memo_hits(self) -> int:
        return self._memo.hits

    @property
    def captured(self) -> int:
        return self._capture.hits
