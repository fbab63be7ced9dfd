"""How much of the network SPG's importance has claimed: ``SPG.usage()``.

The accumulated importance ``A`` of a shared element is how strongly later tasks are kept from
moving it (its gradient or update is scaled by ``1 - A``). Its mean over all shared elements, and
the fractions above 0.5 and 0.9, say how much capacity is left for new tasks; the head scale
``1 - mean(A)`` is what every head's gradient or update is multiplied by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

THRESHOLDS = (0.5, 0.9)


@dataclass(frozen=True)
class ParameterUsage:
    """The importance of one shared parameter: its element count, mean ``A`` and the fractions of
    its elements with ``A`` above 0.5 and above 0.9."""

    numel: int
    mean: float
    above_0_5: float
    above_0_9: float


@dataclass(frozen=True)
class Usage:
    """The importance of all shared parameters taken together (every element counts once), and per
    parameter. Before the first task everything is 0 and ``head_scale`` is 1."""

    tasks_finished: int
    numel: int
    mean: float
    above_0_5: float
    above_0_9: float
    head_scale: float
    parameters: dict[str, ParameterUsage]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the overall figures under ``mean``, ``above_0.5``, ``above_0.9``,
        ``head_scale``, ``tasks_finished``, ``numel``, and per parameter under ``parameters``."""
        return {
            "tasks_finished": self.tasks_finished,
            "numel": self.numel,
            "mean": self.mean,
            "above_0.5": self.above_0_5,
            "above_0.9": self.above_0_9,
            "head_scale": self.head_scale,
            "parameters": {
                name: {
                    "numel": u.numel,
                    "mean": u.mean,
                    "above_0.5": u.above_0_5,
                    "above_0.9": u.above_0_9,
                }
                for name, u in self.parameters.items()
            },
        }


def usage(
    importance: Mapping[str, Tensor],
    numels: Mapping[str, int],
    tasks_finished: int,
    reduce: Callable[[Tensor], None] | None = None,
) -> Usage:
    """The usage of ``importance`` (``A`` by shared-parameter name, or this process's shards of it).

    Args:
        importance: ``A`` per shared parameter; empty before the first task.
        numels: element count of each whole shared parameter (shards are counted whole).
        tasks_finished: the number of tasks ended so far.
        reduce: sums a float64 tensor in place across the processes holding the shards (an
            all-reduce); None for a model that is not sharded.

    Returns:
        A ``Usage``, computed in float64 with one host synchronisation.
    """
    names = list(numels)
    if not importance:
        parts = {n: ParameterUsage(numels[n], 0.0, 0.0, 0.0) for n in names}
        return Usage(tasks_finished, sum(numels.values()), 0.0, 0.0, 0.0, 1.0, parts)
    rows = []
    for name in names:
        a = importance[name]
        rows.append(
            torch.stack(
                [a.sum(dtype=torch.float64)] + [(a > t).sum().to(torch.float64) for t in THRESHOLDS]
            )
        )
    sums = torch.stack(rows)
    if reduce is not None:
        reduce(sums)
    values = sums.cpu().tolist()
    parts = {}
    for name, (total_a, above_half, above_09) in zip(names, values, strict=True):
        n = numels[name]
        parts[name] = ParameterUsage(
            n, total_a / n if n else 0.0, above_half / n if n else 0.0, above_09 / n if n else 0.0
        )
    count = sum(numels.values())
    mean, above_half, above_09 = (sum(col) / max(count, 1) for col in zip(*values, strict=True))
    return Usage(tasks_finished, count, mean, above_half, above_09, 1.0 - mean, parts)
