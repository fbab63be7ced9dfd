"""Splitting a model's trainable parameters into SPG's shared parameters and per-task
head parameters."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

HeadSpec = nn.Module | str | Iterable[nn.Module | str]


@dataclass(frozen=True)
class Partition:
    """Trainable parameters by qualified name, in ``model.named_parameters()`` order."""

    shared: dict[str, nn.Parameter]
    heads: dict[str, nn.Parameter]


def inner_module(model: nn.Module) -> nn.Module:
    """The module whose parameter names SPG uses: ``model`` without its DistributedDataParallel
    / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, so that head
    prefixes, importance names and checkpoints are the same with or without them. FSDP1 renames
    parameters inside the model and is refused."""
    # Looked up, not imported: importing FSDP costs seconds, and a model cannot be one unless it
    # was imported.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    while True:
        if fsdp is not None and isinstance(model, fsdp.FullyShardedDataParallel):
            raise TypeError(
                "SPG does not support FullyShardedDataParallel (FSDP1) models; use "
                "DistributedDataParallel"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def _prefix_matches(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def partition(model: nn.Module, heads: HeadSpec | None) -> Partition:
    """Every trainable parameter of ``model`` that ``heads`` names is a head parameter; the rest
    are shared.

    ``heads`` holds modules of the model (their parameters, including ones added to them later)
    and/or parameter-name prefixes (``"heads"`` matches ``heads.0.weight``, never
    ``headsx.weight``). ``None``: the model has no per-task heads, and every trainable parameter
    is shared.
    """
    if heads is None:
        shared = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not shared:
            raise ValueError(
                "the model has no trainable parameter: SPG needs shared parameters to protect"
            )
        return Partition(shared=shared, heads={})
    specs = [heads] if isinstance(heads, nn.Module | str) else list(heads)
    if not specs:
        raise ValueError(
            "heads is empty: name the per-task head modules or their parameter-name prefixes, or "
            "pass heads=None for a model without per-task heads"
        )
    submodules = {id(m) for m in model.modules()}
    head_ids: set[int] = set()
    prefixes: list[str] = []
    for spec in specs:
        if isinstance(spec, str):
            prefixes.append(spec.rstrip("."))
        elif isinstance(spec, nn.Module):
            if id(spec) not in submodules:
                raise ValueError(
                    f"heads: {type(spec).__name__} module is not a submodule of the model"
                )
            head_ids.update(id(p) for p in spec.parameters())
        else:
            raise TypeError(f"heads entries must be nn.Module or str, got {type(spec).__name__}")

    matched_prefixes: set[str] = set()
    names_by_param: dict[int, list[tuple[str, bool]]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        hits = {pre for pre in prefixes if _prefix_matches(pre, name)}
        matched_prefixes |= hits
        names_by_param.setdefault(id(p), []).append((name, bool(hits) or id(p) in head_ids))
        params[id(p)] = p

    for pre in prefixes:
        if pre not in matched_prefixes:
            raise ValueError(f"heads: prefix {pre!r} matches no trainable parameter of the model")
    for spec in specs:
        if isinstance(spec, nn.Module) and not any(p.requires_grad for p in spec.parameters()):
            raise ValueError(f"heads: {type(spec).__name__} module has no trainable parameter")

    shared: dict[str, nn.Parameter] = {}
    head: dict[str, nn.Parameter] = {}
    for pid, names in names_by_param.items():
        kinds = {is_head for _, is_head in names}
        if len(kinds) > 1:
            h = next(n for n, is_head in names if is_head)
            s = next(n for n, is_head in names if not is_head)
            raise ValueError(
                f"heads: parameter {h!r} is the same tensor as shared parameter {s!r}; "
                "a tied parameter cannot be both a head and shared"
            )
        (head if kinds.pop() else shared)[names[0][0]] = params[pid]
    if not shared:
        raise ValueError(
            "heads covers every trainable parameter: SPG needs shared parameters to protect"
        )
    return Partition(shared=shared, heads=head)
