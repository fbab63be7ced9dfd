"""Gradient accumulation over a task's data for one head: the inner loop of SPG's end-of-task pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor


def accumulate_head_gradients(
    params: Sequence[Tensor],
    loader: Iterable[Any],
    forward: Callable[[Any, int], Tensor],
    head: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    prepare_batch: Callable[[Any], tuple[Any, Tensor]],
) -> int:
    """Clear the gradients of ``params``, then sum ``loss_fn(forward(x, head), y)``'s gradients over ``loader``.

    Returns the number of batches; a loader that yields nothing is an error.
    """
    for p in params:
        p.grad = None
    batches = 0
    for batch in loader:
        x, y = prepare_batch(batch)
        loss = loss_fn(forward(x, head), y)
        if loss.dim() != 0:
            raise ValueError(f"the importance-pass loss for head {head} must be a scalar, got shape "
                             f"{tuple(loss.shape)}")
        loss.backward()
        batches += 1
    if batches == 0:
        raise ValueError(f"the loader yielded no batches for head {head}: the importance pass needs the task's "
                         "training data (a re-iterable loader such as a DataLoader or a list, not a spent iterator)")
    return batches
