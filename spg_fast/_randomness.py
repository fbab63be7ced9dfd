"""Whether a model draws random numbers in its forward pass (dropout and the like in train mode).

Two signals, either one suffices: a module of a known random kind in train mode with a non-zero
rate, and, for anything else (``F.dropout`` inside a custom forward, attention dropout, noise
layers), a change of torch's default random generators (the CPU's and the device's) while the
forward runs. Randomness drawn from a private ``torch.Generator`` is seen by neither; pass
``shared_forward=False`` to ``SPG.end_task`` for such a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def random_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` in train mode that draw random numbers (dropout with
    p > 0, RReLU)."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or isinstance(m, nn.RReLU):
            found.append(name or type(m).__name__)
    return found


def _accelerator(device: torch.device) -> Any:
    """The ``torch.cuda``-like module of ``device`` when it has its own random generator state,
    else None."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    return module if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state") else None


def generator_states(device: torch.device) -> list[Tensor]:
    """Copies of the states of torch's default random generators for the CPU and ``device``."""
    states = [torch.get_rng_state()]
    accelerator = _accelerator(device)
    if accelerator is not None:
        states.append(accelerator.get_rng_state(device))
    return states


def restore_generator_states(device: torch.device, states: list[Tensor]) -> None:
    """Set the generators back to ``generator_states(device)``'s result."""
    torch.set_rng_state(states[0])
    accelerator = _accelerator(device)
    if accelerator is not None:
        accelerator.set_rng_state(states[1], device)


class DrawWatch:
    """Set by ``watch_draws``: ``drew`` tells whether the body drew from a default generator."""

    drew: bool = False


@contextmanager
def watch_draws(device: torch.device) -> Iterator[DrawWatch]:
    """Record whether the body draws from torch's default generators for the CPU and ``device``.

    Reading a generator's state does not synchronise with the device.
    """
    watch = DrawWatch()
    before = generator_states(device)
    yield watch
    after = generator_states(device)
    watch.drew = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
