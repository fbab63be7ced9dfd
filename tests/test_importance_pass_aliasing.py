"""The importance pass copies a head's first gradient into its running sum: autograd may return a
tensor something else holds (here a custom function's cached gradient), and adding later batches
into it would change that tensor. (A check of the gradient's reference count, the earlier guard,
sees only C++ references: it took this tensor for the pass's own and summed into it.)"""

from __future__ import annotations

import torch
from torch import nn

from spg_fast import SPG, reference


class _ReturnsHeld(torch.autograd.Function):
    """Identity forward; backward returns the same held tensor every time (as a custom autograd
    function or a hook with a gradient cache may)."""

    held = torch.zeros(0)

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return _ReturnsHeld.held


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ _ReturnsHeld.apply(self.w).t()


def test_a_gradient_held_elsewhere_is_copied_before_later_batches_are_added():
    torch.manual_seed(0)
    _ReturnsHeld.held = torch.randn(3, 4)
    untouched = _ReturnsHeld.held.clone()
    model = _Net()
    spg = SPG(model)
    batches = [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long)) for _ in range(3)]
    spg.end_task(0, batches, loss_fn=lambda out, _y: out.sum())
    assert torch.equal(_ReturnsHeld.held, untouched)  # the held gradient was never summed into
    expected = reference.keep(3 * untouched)  # three batches, each giving the held gradient
    assert torch.equal(spg.keep_factors["w"], expected)
