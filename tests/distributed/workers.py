"""What each rank of the distributed tests runs (a spawned process): DDP scenarios whose
measurements are saved to ``out/rank{r}.pt`` for the test process to check, and a launcher that
turns a hang into a failure."""

from __future__ import annotations

import faulthandler
import gc
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks

WORLD = 2
N_TASKS = 2
SPLITS = {"equal": 4, "unequal": 5}  # batches of rank 0 out of 8; rank 1 gets the rest


class AllHeadsNet(MultiHeadNet):
    """``forward(x)`` returns every head's logits stacked, so that a DDP training step uses every
    parameter (as ``find_unused_parameters=False`` requires); ``forward(x, task)`` one head's, as
    the importance pass calls it."""

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        if task is not None:
            return super().forward(x, task)
        return torch.stack([super(AllHeadsNet, self).forward(x, t) for t in range(len(self.heads))])


class _NanGrad(torch.autograd.Function):
    """Identity forward whose backward is NaN: a non-finite gradient under a finite loss."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * float("nan")


def _train(
    ddp: DistributedDataParallel, opt: torch.optim.Optimizer, task: int, batches: list
) -> None:
    for x, y in batches:
        opt.zero_grad()
        out = ddp(x)
        F.cross_entropy(out[task], y).add(out.sum() * 0).backward()
        opt.step()


def _flat(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in state.items()}


def _ddp_scenario(rank: int, find_unused: bool, split: int) -> dict[str, Any]:
    """Train two tasks with a DDP SPG; at each end_task compare with one process over all
    ranks' batches."""
    tasks = make_tasks(n_tasks=N_TASKS, n_batches=8, seed=0)
    torch.manual_seed(0)
    net = AllHeadsNet(n_tasks=N_TASKS)
    ddp = DistributedDataParallel(net, find_unused_parameters=find_unused)
    spg = SPG(ddp, heads="heads", backend="torch")
    opt = spg.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1))
    result: dict[str, Any] = {
        "keys": sorted(spg.shared_parameters),
        "diff": [],
        "importance": [],
        "loaded_back": [],
    }
    for task, batches in enumerate(tasks):
        _train(
            ddp, opt, task, batches[rank * 4 : (rank + 1) * 4]
        )  # equal steps: DDP training needs them
        before = spg.state_dict()
        mine = batches[:split] if rank == 0 else batches[split:]
        spg.end_task(task, mine)
        # One process over every rank's batches, from the same weights and the DDP SPG's checkpoint.
        plain = AllHeadsNet(n_tasks=N_TASKS)
        plain.load_state_dict(net.state_dict())
        single = SPG(plain, heads="heads", backend="torch")
        single.load_state_dict(before)
        single.end_task(task, batches)
        result["diff"].append(
            max(
                float((spg.importance[n].double() - a.double()).abs().max())
                for n, a in single.importance.items()
            )
        )
        result["importance"].append(_flat(spg.importance))
        back = SPG(ddp, heads="heads", backend="torch")
        back.load_state_dict(single.state_dict())
        result["loaded_back"].append(
            all(torch.equal(back.importance[n], a) for n, a in single.importance.items())
        )
    _train(ddp, opt, N_TASKS - 1, tasks[-1][rank * 4 : (rank + 1) * 4])
    result["params"] = _flat(dict(net.named_parameters()))
    return result


def _failure_scenario(rank: int, kind: str) -> dict[str, Any]:
    """Task 1's pass fails: on rank 1 only (a NaN gradient under finite losses, a non-finite loss,
    an empty loader), or on every rank (a forward through the DDP wrapper); returns each rank's
    error and whether A stayed as it was."""
    tasks = make_tasks(n_tasks=N_TASKS, n_batches=4, seed=1)
    torch.manual_seed(0)
    net = AllHeadsNet(n_tasks=N_TASKS)
    ddp = DistributedDataParallel(net)
    spg = SPG(ddp, heads="heads", backend="torch")
    spg.end_task(0, tasks[0][rank * 2 : (rank + 1) * 2])
    before = _flat(spg.importance)
    batches = [(x.clone(), y) for x, y in tasks[1][rank * 2 : (rank + 1) * 2]]
    forward = net
    if kind == "ddp_forward":
        forward = ddp
    elif rank == 1 and kind == "nan_grad":

        def forward(x: Tensor, head: int) -> Tensor:
            return _NanGrad.apply(net(x, head))
    elif rank == 1 and kind == "empty":
        batches = []
    elif rank == 1:
        batches[1][0][0, 0] = float("inf")
    try:
        spg.end_task(1, batches, forward)
        error = None
    except Exception as exc:  # the error itself is what the test checks
        error = (type(exc).__name__, str(exc))
    unchanged = spg.tasks_finished == 1 and all(
        torch.equal(spg.importance[n], a) for n, a in before.items()
    )
    return {"error": error, "unchanged": unchanged}


def ddp_scenarios(rank: int, out: Path) -> dict[str, Any]:
    """Every DDP scenario on this rank."""
    results: dict[str, Any] = {}
    for find_unused in (False, True):
        for name, split in SPLITS.items():
            results[f"ddp/{find_unused}/{name}"] = _ddp_scenario(rank, find_unused, split)
    for kind in ("nan_grad", "nan_loss", "empty", "ddp_forward"):
        results[f"failure/{kind}"] = _failure_scenario(rank, kind)
    return results


def _run_rank(
    rank: int, init_file: str, out: str, scenarios: Callable[[int, Path], dict[str, Any]]
) -> None:
    """``scenarios`` on this rank in a gloo process group, then a check that the ranks are still in
    step; the measurements go to ``out/rank{rank}.pt``, a failure's traceback to
    ``out/rank{rank}.error``; a fatal signal prints every thread's Python stack (faulthandler) to
    the captured stderr."""
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = scenarios(rank, Path(out))
        probe = torch.tensor([float(rank)])
        dist.all_reduce(probe)  # the ranks are still in step after the failures
        results["in_step"] = float(probe) == sum(range(WORLD))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        # FSDP2 modules sit in reference cycles (hooks hold their modules); collected only at
        # interpreter exit, after the group is gone, their pending gloo work aborted the process
        # (SIGABRT, "terminate called without an active exception") in 4 of 14 runs, 0 of 30 after.
        # Collect them while the group exists.
        gc.collect()
        dist.destroy_process_group()


def launch(
    out: Path, timeout: float, scenarios: Callable[[int, Path], dict[str, Any]] = ddp_scenarios
) -> list[dict[str, Any]]:
    """Run ``scenarios(rank, out)`` on ``WORLD`` spawned processes; a rank still running after
    ``timeout`` seconds is killed and reported as a hang."""
    init_file = out / "init"
    context = mp.start_processes(
        _run_rank,
        args=(str(init_file), str(out), scenarios),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the distributed workers did not finish within {timeout} s (a hang)"
                )
    except (
        mp.ProcessExitedException
    ) as error:  # killed by a signal: say what the other ranks reported
        reports = "".join(
            f"\n--- {path.name}:\n{path.read_text()}" for path in sorted(out.glob("rank*.error"))
        )
        raise RuntimeError(f"{error}{reports or ' (no rank wrote an error)'}") from error
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, 9)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
