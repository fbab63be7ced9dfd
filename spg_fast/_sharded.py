"""SPG on FSDP2 models (``torch.distributed.fsdp.fully_shard``): parameters that are DTensors, each
process holding one row-shard (``Shard(0)`` on a one-dimensional device mesh).

The importance pass runs the model as FSDP2 trains it: per head, forward and backward over the
rank's batches through the sharded model, so FSDP2 gathers the parameters and reduce-scatters each
batch's gradient into the parameters' sharded ``.grad`` (put back as they were afterwards). Every
rank then holds its shard of the gradient summed over all ranks' data. The standardisation needs
statistics of the whole tensor: each rank computes the float64 moments of its shards (count, mean as
a pivot and an offset, centred sum of squares M2, finite), one ``all_gather`` per head brings every
rank's, and Chan's formula merges them in rank order, so every rank gets bit-identical statistics,
from which it forms the importance of its own shard. ``A`` and the mask factors are shards too:
masking stays local (no collective per step); the head scale takes one all-reduce of the float64 sum
of ``A`` whenever ``A`` changes.

Ranks may hold different numbers of batches: before each batch the ranks agree (one small
all-reduce) whether any rank still has one; a rank out of data runs its last batch with a zero loss
weight, so FSDP2's collectives still match and it adds nothing. A rank whose loader is empty, whose
batch cannot be prepared, or whose loss is not a finite scalar makes every rank raise before the
next collective of the model. An exception inside the model's own forward on one rank only cannot be
announced: FSDP2's gathers on the other ranks wait for it (as in training).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spg_fast._backend import Ops
from spg_fast._importance_pass import HeadSums, LossFn, checked_loss
from spg_fast.reference import merge_moments

_END = object()
_PLAIN = (Tensor, nn.Parameter)


def _dtensor_type() -> type | None:
    # Looked up, not imported: importing torch.distributed.tensor costs time, and no parameter can
    # be a DTensor unless it was imported.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """This process's shard of ``t`` (the tensor itself when it is not a DTensor); shares
    ``t``'s memory."""
    if type(t) in _PLAIN:  # the common case, without looking up DTensor
        return t
    return t.to_local() if is_sharded(t) else t


def check_layout(named: Iterable[tuple[str, Tensor]]) -> bool:
    """True when every parameter is an FSDP2 shard (a DTensor placed ``Shard(0)`` on one
    one-dimensional mesh), False when none is a DTensor; otherwise ``TypeError`` naming the first
    parameter that breaks the pattern (a mix of DTensors and plain tensors, HSDP's two-dimensional
    mesh, tensor parallelism's other placements)."""
    from_dtensor = None
    mesh = None
    for name, p in named:
        sharded = is_sharded(p)
        if from_dtensor is None:
            from_dtensor = sharded
        if sharded != from_dtensor:
            raise TypeError(
                f"SPG: parameter {name!r} is {'a DTensor' if sharded else 'a plain tensor'} while "
                "the parameters before it are not: shard every parameter with fully_shard or none"
            )
        if not sharded:
            continue
        from torch.distributed.tensor import Shard

        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise TypeError(
                f"SPG: parameter {name!r} is a DTensor placed {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-dimensional mesh; SPG supports FSDP2's (Shard(0),) on a "
                "one-dimensional mesh (not HSDP, tensor or pipeline parallelism)"
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise TypeError(
                f"SPG: parameter {name!r} lives on another device mesh than the parameters before "
                "it; SPG supports one mesh"
            )
    return bool(from_dtensor)


def process_group(params: Sequence[Tensor]) -> dist.ProcessGroup:
    """The process group of the sharded parameters' mesh."""
    return params[0].device_mesh.get_group()


def like(shard: Tensor, param: Tensor) -> Tensor:
    """``shard`` (this rank's part, shaped like ``param``'s local shard) as a DTensor laid out
    as ``param``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def distribute(value: Tensor, param: Tensor) -> Tensor:
    """``value`` laid out as the sharded ``param``: a full tensor (the same on every rank, as a
    loaded checkpoint is) is cut locally, without communication; a DTensor is redistributed."""
    from torch.distributed.tensor import distribute_tensor

    if is_sharded(value):
        return value.redistribute(param.device_mesh, param.placements)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def agree(flags: Sequence[bool | int], group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """The sum of ``flags`` over the ranks of ``group`` (one all-reduce)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def head_sums(
    model: nn.Module,
    params: Sequence[Tensor],
    heads: Sequence[int],
    loader: Iterable[Any],
    forward: Callable[[Any, int], Any],
    loss_for: Callable[[int], LossFn],
    prepare_batch: Callable[[Any], tuple[Any, Any]],
    label: str = "",
    head_label: Callable[[int], str] = "head {}".format,
) -> Iterator[HeadSums]:
    """Per head, this rank's shards of the gradient sums over every rank's batches (None where no
    rank's batch gave the parameter a gradient); see the module docstring. ``.grad`` of every
    parameter of ``model`` is put back as it was, and every FSDP2 module resharded, when the
    generator finishes or is closed."""
    everything = list(model.parameters())
    saved = [p.grad for p in everything]
    group = process_group(params)
    device = local(params[0]).device
    try:
        for head in heads:
            for p in everything:
                p.grad = None
            batches = _backward_over(
                model,
                head,
                loader,
                forward,
                loss_for(head),
                prepare_batch,
                group,
                device,
                label,
                head_label(head),
            )
            yield HeadSums(
                head, [None if p.grad is None else local(p.grad) for p in params], batches
            )
    finally:
        # A pass stopped between a forward and its backward (a non-finite loss, a failing loss
        # function) leaves the root's parameters gathered: FSDP2 reshards them only after backward,
        # and until then the module holds the unsharded tensors instead of its DTensor parameters.
        _reshard(model)
        for p, g in zip(everything, saved, strict=True):
            p.grad = g


def _reshard(model: nn.Module) -> None:
    """Every FSDP2 module of ``model`` back to its sharded parameters (a no-op where it is)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.enable_grad()
def _backward_over(
    model: nn.Module,
    head: int,
    loader: Iterable[Any],
    forward: Callable[[Any, int], Any],
    loss_fn: LossFn,
    prepare_batch: Callable[[Any], tuple[Any, Any]],
    group: dist.ProcessGroup,
    device: torch.device,
    label: str,
    name: str,
) -> int:
    """Forward and backward of ``head`` over this rank's batches, in step with the other ranks;
    returns the number of this rank's batches."""
    world = dist.get_world_size(group)
    items = iter(loader)
    last: tuple[Any, Any] | None = None
    batches = 0
    while True:
        error: BaseException | None = None
        batch = None
        try:
            item = next(items, _END)
            if item is not _END:
                batch = prepare_batch(item)
        except Exception as exc:  # announced to the other ranks, then raised here
            error = exc
        have, failed = agree([batch is not None, error is not None], group, device)
        if failed:
            raise error or RuntimeError(
                f"{label}preparing batch {batches} for {name} failed on another rank (see "
                "its error); the accumulated importance is unchanged on every rank"
            )
        if have == 0:
            return batches
        if batches == 0 and have < world:
            raise ValueError(
                f"{label}the loader yielded no batches on {world - have} of {world} ranks: "
                "every rank needs some of the task's training data (a re-iterable loader such "
                "as a DataLoader or a list, not a spent iterator)"
            )
        real = batch is not None
        x, y = batch if real else last
        loss = None
        try:
            loss = checked_loss(loss_fn(forward(x, head), y), name, batches, label)
            nonfinite = real and not bool(torch.isfinite(loss.detach()))
        except Exception as exc:  # announced to the other ranks, then raised here
            error, nonfinite = exc, False
        bad, failed = agree([nonfinite, error is not None], group, device)
        if failed:
            raise error or RuntimeError(
                f"{label}the importance pass failed on another rank at its batch for {name} "
                "(see its error); the accumulated importance is unchanged on every rank"
            )
        if bad:
            where = (
                f"this rank's batch {batches} (counting from 0)"
                if nonfinite
                else "another rank's batch"
            )
            raise FloatingPointError(
                f"{label}the loss is non-finite (NaN or Inf) at {where} for {name}; check that "
                "batch's data and the loss function; the accumulated importance is unchanged "
                "on every rank"
            )
        (loss if real else loss * 0).backward()
        if real:
            last = (x, y)
            batches += 1


def accumulate_(
    ops: Ops, work: Sequence[Tensor], sums: Sequence[Tensor | None], group: dist.ProcessGroup
) -> list[int]:
    """``ops.accumulate_`` of each shard of ``sums`` present into the stored keep factors ``work``,
    with the statistics of the whole tensors (one ``all_gather`` of every rank's moments); returns
    the indices whose whole gradient is not finite, the same on every rank, with nothing in
    ``work`` changed when there are any."""
    device = work[0].device
    empty = torch.empty(0, device=device)  # no gradient: no elements, finite
    rows = ops.moments([empty if h is None else h for h in sums])
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, rows, group=group)
    merged = merge_moments(torch.stack(gathered))
    bad = (merged[:, 4] == 0).nonzero().flatten().tolist()
    if bad:
        return bad
    present = [i for i, h in enumerate(sums) if h is not None and merged[i, 0] > 0]
    ops.accumulate_with_([work[i] for i in present], [sums[i] for i in present], merged[present])
    return []
