"""Hard attention to the task (Serra et al., ICML 2018). Every unit of the trunk (each output of a
Linear layer, each channel of a Conv2d layer) gets a gate per task, ``sigmoid(s * e[task])`` with a
learned embedding ``e``; training multiplies the layer's output by the gates. Within every epoch the
slope ``s`` rises linearly from ``1/s_max`` to ``s_max``; the loss adds ``c`` times the attention
regulariser (the gates' mean over the units earlier tasks left free); the embeddings' gradients are
compensated for the annealing (clamped ``s * e``); after a task its gates at ``s_max`` are folded
into the accumulated mask ``a <- max(a, gate)``, and later tasks' gradients of a weight are scaled
by ``1 - min(a of its output unit, a of its input unit)`` (a bias by ``1 - a`` of its unit). The
whole gradient's norm is clipped at ``clipgrad``; the embeddings are clamped to ``+-thres_emb``.
Defaults as in the authors' code: s_max 400, c 0.75, clipgrad 10000, thres_cosh 50, thres_emb 6.

The gate multiplies the layer's output directly; the authors apply it after the activation, dropout
and pooling that follow, which is the same function: those commute with a positive per-unit scale.
**Defined here**: when earlier tasks have claimed every unit (no free unit), the regulariser is 0
(the authors' code divides by zero)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast.harness.config import ConfigError
from spg_fast.harness.methods.base import Batch, Method, PassReport, TaskData

GATED = (nn.Linear, nn.Conv2d)


class HatNet(nn.Module):
    """``net`` (a ``MultiHeadNet``: a sequential trunk of Linear and Conv2d layers with
    parameter-free layers between them, one head per task) with a gate embedding per gated layer
    and task. ``forward(x, task)`` uses the gates at ``s_max``; ``gated_forward`` at any slope."""

    def __init__(self, net: nn.Module, s_max: float) -> None:
        super().__init__()
        for layer in net.trunk:
            if not isinstance(layer, GATED) and next(layer.parameters(), None) is not None:
                raise ConfigError(
                    "backbone",
                    f"hat gates the units of Linear and Conv2d layers; this backbone's trunk has "
                    f"a {type(layer).__name__} with parameters (use mlp or alexnet)",
                )
        self.trunk, self.heads, self.notes = net.trunk, net.heads, net.notes
        self.s_max = s_max
        self.gated = [i for i, layer in enumerate(self.trunk) if isinstance(layer, GATED)]
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(self.heads), _units(self.trunk[i])) for i in self.gated
        )

    def gates(self, task: int, s: float) -> list[Tensor]:
        """Task ``task``'s gates at slope ``s``, one tensor of units per gated layer."""
        return [torch.sigmoid(s * e.weight[task]) for e in self.embeddings]

    def gated_forward(self, x: Tensor, task: int, s: float) -> tuple[Tensor, list[Tensor]]:
        """Head ``task``'s logits with the trunk gated at slope ``s``, and the gates."""
        gates = self.gates(task, s)
        at = dict(zip(self.gated, gates, strict=True))
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in at:
                x = x * (at[i].view(1, -1, 1, 1) if x.dim() == 4 else at[i])
        return self.heads[task](x), gates

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.gated_forward(x, task, self.s_max)[0]

    def keep_factors(self, mask: list[Tensor]) -> dict[str, Tensor]:
        """By trunk parameter name: ``1 - min(mask of the output unit, mask of the input unit)``
        for weights (the first layer's inputs are not gated), ``1 - mask`` of the unit for
        biases. A Linear layer after a Conv2d one reads each channel's flattened pixels."""
        keep: dict[str, Tensor] = {}
        before: Tensor | None = None
        for i, unit in zip(self.gated, mask, strict=True):
            layer = self.trunk[i]
            extra = [1] * (layer.weight.dim() - 2)
            held = unit.view(-1, 1, *extra).expand_as(layer.weight)
            if before is not None:
                if isinstance(layer, nn.Linear):
                    before = before.repeat_interleave(layer.in_features // before.numel())
                held = torch.minimum(held, before.view(1, -1, *extra).expand_as(layer.weight))
            keep[f"trunk.{i}.weight"] = 1 - held
            if layer.bias is not None:
                keep[f"trunk.{i}.bias"] = 1 - unit
            before = unit
        return keep


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class Hat(Method):
    """HAT with the given hyperparameters (see the module docstring); one process only."""

    one_process = True

    def __init__(
        self, s_max: float, c: float, clipgrad: float, thres_cosh: float, thres_emb: float
    ) -> None:
        self.s_max, self.c, self.clipgrad = s_max, c, clipgrad
        self.thres_cosh, self.thres_emb = thres_cosh, thres_emb
        self.net: HatNet | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.mask: list[Tensor] | None = None  # accumulated gates, per gated layer
        self.keep: dict[str, Tensor] = {}

    def network(self, net: nn.Module) -> HatNet:
        return HatNet(net, self.s_max)

    def bind(self, model: nn.Module) -> None:
        self.net = model
        self.params = dict(model.named_parameters())

    def slope(self, position: float) -> float:
        """The gates' slope for a batch starting ``position`` (a fraction) into the epoch."""
        return (self.s_max - 1 / self.s_max) * position + 1 / self.s_max

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits, gates = self.net.gated_forward(batch.x, batch.task, self.slope(batch.position))
        loss = F.cross_entropy(logits, batch.y, reduction="sum") / batch.per_rank
        return loss + self.c * self.regulariser(gates)

    def regulariser(self, gates: list[Tensor]) -> Tensor:
        """The gates' sum over the units earlier tasks left free (``1 - mask``), over the number
        of free units (all units for the first task)."""
        if self.mask is None:
            return sum(g.sum() for g in gates) / sum(g.numel() for g in gates)
        free = [1 - m for m in self.mask]
        room = sum(f.sum() for f in free)
        if room == 0:
            return gates[0].new_zeros(())
        return sum((g * f).sum() for g, f in zip(gates, free, strict=True)) / room

    def before_step(self, model: nn.Module, batch: Batch) -> None:
        """Mask the trunk's gradients with the earlier tasks' keep factors, compensate the
        embeddings' gradients for the slope, clip the whole gradient's norm."""
        with torch.no_grad():
            for name, keep in self.keep.items():
                if self.params[name].grad is not None:
                    self.params[name].grad.mul_(keep)
            s = self.slope(batch.position)
            for e in self.net.embeddings:
                if e.weight.grad is not None:
                    w = e.weight
                    num = torch.cosh(torch.clamp(s * w, -self.thres_cosh, self.thres_cosh)) + 1
                    w.grad.mul_(self.s_max / s * num / (torch.cosh(w) + 1))
        nn.utils.clip_grad_norm_(self.net.parameters(), self.clipgrad)

    def after_step(self, model: nn.Module, batch: Batch) -> None:
        with torch.no_grad():
            for e in self.net.embeddings:
                e.weight.clamp_(-self.thres_emb, self.thres_emb)

    def end_task(self, model: nn.Module, data: TaskData, report: PassReport | None) -> None:
        with torch.no_grad():
            gates = [g.clone() for g in self.net.gates(data.task, self.s_max)]
        self._set_mask(
            gates
            if self.mask is None
            else [torch.maximum(m, g) for m, g in zip(self.mask, gates, strict=True)]
        )

    def _set_mask(self, mask: list[Tensor] | None) -> None:
        self.mask = mask
        self.keep = self.net.keep_factors(mask) if mask is not None else {}

    def usage(self) -> dict[str, Any] | None:
        """The accumulated mask over all gated units: its mean and the fractions of units above
        0.5 and 0.9 (HAT's capacity used; it has no head scale)."""
        if self.mask is None:
            return None
        units = torch.cat(self.mask).double()
        return {
            "of": "units",
            "mean": units.mean().item(),
            "above_0.5": (units > 0.5).double().mean().item(),
            "above_0.9": (units > 0.9).double().mean().item(),
            "head_scale": None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"mask": self.mask or []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_mask(list(state["mask"]) or None)
