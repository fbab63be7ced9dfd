"""What a measuring pass over a model may change, saved and put back: its buffers and each module's
train/eval mode.

SPG's end-of-task pass runs the model in train mode, so BatchNorm layers update their running
statistics and ``num_batches_tracked``; a measurement must not change the model it measures, whether
it succeeds or fails. Parameters and ``.grad`` need no copy: the pass never writes them (it takes
its gradients with ``torch.autograd.grad`` into its own buffers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelState:
    """Every module's buffer table (the tensor objects) with a copy of their values, and every
    module's mode."""

    modes: dict[nn.Module, bool]
    buffers: dict[nn.Module, dict[str, Tensor | None]]
    values: dict[int, Tensor]

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        modules = list(model.modules())
        buffers = {m: dict(m._buffers) for m in modules if m._buffers}
        values = {
            id(t): t.detach().clone()
            for table in buffers.values()
            for t in table.values()
            if t is not None
        }
        return cls({m: m.training for m in modules}, buffers, values)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back each module's mode, its buffer table (buffers replaced or added since
        are dropped) and the buffers' values, in place, so references to the buffer tensors
        stay valid."""
        for module, training in self.modes.items():
            module.training = training
        for module in self.modes:
            table = self.buffers.get(module, {})
            current = module._buffers
            if current.keys() != table.keys() or any(current[k] is not t for k, t in table.items()):
                current.clear()
                current.update(table)
            for t in table.values():
                if t is not None:
                    t.copy_(self.values[id(t)])


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body, then restore ``model``'s buffers and modes as they were on entry, also when the
    body raises."""
    state = ModelState.capture(model)
    try:
        yield
    finally:
        state.restore()
