"""What each rank of the FSDP2 tests runs (a spawned process): scenarios on a ``fully_shard`` model
whose measurements are saved to ``out/rank{r}.pt`` for the test process to check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

import spg_fast.optim
from spg_fast import SPG
from spg_fast.checkpoint import SPGState
from tests.distributed.workers import WORLD, _NanGrad
from tests.helpers import make_tasks

N_TASKS = 2
N_IN = 8
SPLITS = {"equal": 4, "unequal": 5}  # batches of rank 0 out of 8; rank 1 gets the rest
FUSED_CASES = [("adamw", "torch"), ("sgd", "torch"), ("adamw", "triton")]


class ShardNet(nn.Module):
    """A trunk whose first layer has 33 rows (17 and 16 on two ranks) and a one-row gate (an empty
    shard on rank 1), and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(N_IN, 33), nn.ReLU(), nn.Linear(33, 6))
        self.gate = nn.Parameter(torch.ones(1, 6) + 0.1 * torch.randn(1, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 3) for _ in range(N_TASKS))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](torch.tanh(self.trunk(x)) * self.gate)


def _sharded(seed: int = 0) -> tuple[ShardNet, ShardNet]:
    """The same weights twice: a plain model and an FSDP2 one."""
    torch.manual_seed(seed)
    plain = ShardNet()
    model = ShardNet()
    model.load_state_dict(plain.state_dict())
    fully_shard(model.trunk[0])
    fully_shard(model)
    return plain, model


def _full(spg: SPG) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in spg.state_dict(full=True)["keep"].items()}


def _train(model: nn.Module, opt: torch.optim.Optimizer, task: int | None, batches: list) -> None:
    """Steps over ``batches`` on the head of ``task`` (None: a model without heads)."""
    for x, y in batches:
        opt.zero_grad()
        out = model(x) if task is None else model(x, task)
        F.cross_entropy(out, y).backward()
        opt.step()


def _importance_scenario(rank: int, split: int) -> dict[str, Any]:
    """Two tasks: train (each rank half of every batch), then end_task on each rank's share of the
    batches; compared with one process doing the same over all the data."""
    tasks = make_tasks(n_tasks=N_TASKS, n_batches=8, batch=8, n_in=N_IN, seed=0)
    plain, model = _sharded()
    spg = SPG(model, heads="heads", backend="torch")
    single = SPG(plain, heads="heads", backend="torch")
    opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    single_opt = single.wrap(torch.optim.SGD(plain.parameters(), lr=0.1))
    result: dict[str, Any] = {"diff": [], "importance": [], "head_scale": [], "param_diff": []}
    for task, batches in enumerate(tasks):
        half = slice(rank * 4, (rank + 1) * 4)
        _train(model, opt, task, [(x[half], y[half]) for x, y in batches[:3]])
        _train(plain, single_opt, task, batches[:3])
        mine = batches[:split] if rank == 0 else batches[split:]
        report = spg.end_task(task, mine)
        single.end_task(task, batches)
        full = _full(spg)
        result["diff"].append(
            max(
                float((full[n].double() - k.double()).abs().max())
                for n, k in single.keep_factors.items()
            )
        )
        result["importance"].append(full)
        result["head_scale"].append((float(spg.head_scale), float(single.head_scale)))
        result["reason"] = report.reason
    _train(
        model,
        opt,
        N_TASKS - 1,
        [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in tasks[-1][3:6]],
    )
    _train(plain, single_opt, N_TASKS - 1, tasks[-1][3:6])
    full_params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    result["param_diff"] = max(
        float((full_params[n] - p.detach()).abs().max()) for n, p in plain.named_parameters()
    )
    result["local_shapes"] = {n: tuple(a.to_local().shape) for n, a in spg.importance.items()}
    return result


def _failure_scenario(rank: int, kind: str) -> dict[str, Any]:
    """Task 1's pass or a checkpoint load fails on rank 1 only; every rank's error and whether
    A stayed."""
    tasks = make_tasks(n_tasks=N_TASKS, n_batches=4, batch=8, n_in=N_IN, seed=1)
    plain, model = _sharded(seed=1)
    spg = SPG(model, heads="heads", backend="torch")
    spg.end_task(0, tasks[0][rank * 2 : (rank + 1) * 2])
    before = {n: a.to_local().clone() for n, a in spg.importance.items()}
    batches = [(x.clone(), y) for x, y in tasks[1][rank * 2 : (rank + 1) * 2]]
    forward: Any = None
    if rank == 1 and kind == "nan_grad":

        def forward(x: Tensor, head: int) -> Tensor:
            return _NanGrad.apply(model(x, head))
    elif rank == 1 and kind == "empty":
        batches = []
    elif rank == 1 and kind == "nan_loss":
        batches[1][0][0, 0] = float("inf")
    try:
        if kind == "bad_checkpoint":
            state = spg.state_dict(full=True)
            if rank == 1:
                state["keep"]["trunk.0.weight"] = state["keep"]["trunk.0.weight"] + 2
            spg.load_state_dict(state)
        elif kind == "shared_forward":
            spg.end_task(1, batches, shared_forward=True)
        else:
            spg.end_task(1, batches, forward)
        error = None
    except Exception as exc:  # the error itself is what the test checks
        error = (type(exc).__name__, str(exc))
    unchanged = spg.tasks_finished == 1 and all(
        torch.equal(spg.importance[n].to_local(), a) for n, a in before.items()
    )
    # After the failure the model works as before: the same task ends on clean data as one process
    # ends it over all the data.
    try:
        spg.end_task(1, tasks[1][rank * 2 : (rank + 1) * 2])
    except Exception as exc:  # the test reports it
        return {"error": error, "unchanged": unchanged, "recovered": f"{exc!r}"}
    single = SPG(plain, heads="heads", backend="torch")
    for task in range(N_TASKS):
        single.end_task(task, tasks[task])
    full = _full(spg)
    recovered = max(
        float((full[n].double() - k.double()).abs().max()) for n, k in single.keep_factors.items()
    )
    return {"error": error, "unchanged": unchanged, "recovered": recovered}


def _checkpoint_scenario(rank: int, folder: Path) -> dict[str, Any]:
    """Full-tensor checkpoints between FSDP2 and plain models, and a DCP round trip into a
    fresh SPG."""
    tasks = make_tasks(n_tasks=N_TASKS, n_batches=4, batch=8, n_in=N_IN, seed=2)
    plain, model = _sharded(seed=2)
    spg = SPG(model, heads="heads", backend="torch")
    x, y = tasks[0][0]
    F.cross_entropy(model(x, 0), y).backward()
    grads = {
        n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    spg.end_task(0, tasks[0][rank * 2 : (rank + 1) * 2])
    grads_kept = grads.keys() == {
        n for n, p in model.named_parameters() if p.grad is not None
    } and all(
        torch.equal(p.grad.to_local(), grads[n])
        for n, p in model.named_parameters()
        if p.grad is not None
    )
    model.zero_grad(set_to_none=True)
    full = spg.state_dict(full=True)
    into_plain = SPG(plain, heads="heads", backend="torch")
    into_plain.load_state_dict(full)
    back = SPG(model, heads="heads", backend="torch")
    back.load_state_dict(into_plain.state_dict())
    dcp.save({"spg": SPGState(spg)}, checkpoint_id=str(folder / "dcp"))
    fresh = SPG(model, heads="heads", backend="torch")
    dcp.load({"spg": SPGState(fresh)}, checkpoint_id=str(folder / "dcp"))
    before_task = SPG(model, heads="heads", backend="torch")
    dcp.save({"spg": SPGState(before_task)}, checkpoint_id=str(folder / "dcp0"))
    dcp.load({"spg": SPGState(before_task)}, checkpoint_id=str(folder / "dcp0"))
    opt = spg.wrap(torch.optim.Adam(model.parameters(), lr=0.01), mask="update")
    single_opt = into_plain.wrap(torch.optim.Adam(plain.parameters(), lr=0.01), mask="update")
    _train(
        model,
        opt,
        1,
        [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in tasks[1][:2]],
    )
    _train(plain, single_opt, 1, tasks[1][:2])
    full_params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    update_masked = max(
        float((full_params[n] - p.detach()).abs().max()) for n, p in plain.named_parameters()
    )
    return {
        "full_importance": {n: t.clone() for n, t in full["keep"].items()},
        "grads_kept": grads_kept,
        "update_masked_diff": update_masked,
        "plain_equal": all(
            torch.equal(into_plain.keep_factors[n], full["keep"][n]) for n in full["keep"]
        ),
        "back_equal": all(
            torch.equal(back.importance[n].to_local(), a.to_local())
            for n, a in spg.importance.items()
        ),
        "back_head_scale": float(back.head_scale) == float(spg.head_scale),
        "dcp_equal": fresh.tasks_finished == 1
        and all(
            torch.equal(fresh.importance[n].to_local(), a.to_local())
            for n, a in spg.importance.items()
        ),
        "dcp_head_scale": float(fresh.head_scale) == float(spg.head_scale),
        "dcp_before_first_task": before_task.tasks_finished == 0 and not before_task.importance,
    }


def _fused_scenario(rank: int) -> dict[str, Any]:
    """spg_fast.optim's fused steps on the shards (native CPU kernels on the torch backend, Triton's
    under the interpreter) against the same optimizer on one process over all the data."""
    tasks = make_tasks(n_tasks=N_TASKS, n_batches=4, batch=8, n_in=N_IN, seed=3)
    makers = {
        "adamw": lambda ps, spg: spg_fast.optim.AdamW(ps, lr=0.01, spg=spg),
        "sgd": lambda ps, spg: spg_fast.optim.SGD(ps, lr=0.1, momentum=0.9, spg=spg),
    }
    result: dict[str, Any] = {}
    for name, backend in FUSED_CASES:
        plain, model = _sharded(seed=3)
        spg = SPG(model, heads="heads", backend=backend)
        single = SPG(plain, heads="heads", backend="torch")
        spg.end_task(0, tasks[0][rank * 2 : (rank + 1) * 2])
        single.end_task(0, tasks[0])
        opt, single_opt = (
            makers[name](model.parameters(), spg),
            makers[name](plain.parameters(), single),
        )
        _train(
            model,
            opt,
            1,
            [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in tasks[1]],
        )
        _train(plain, single_opt, 1, tasks[1])
        full_params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        case = f"{name}/{backend}"
        result[case] = max(
            float((full_params[n] - p.detach()).abs().max()) for n, p in plain.named_parameters()
        )
        state = next(iter(opt.state.values()))
        result[f"{case}/state"] = sorted(type(t).__name__ for k, t in state.items() if k != "step")
    return result


NARROW = {"bfloat16": torch.bfloat16, "uint8": torch.uint8}


def _narrow_scenario(rank: int, name: str, folder: Path) -> dict[str, Any]:
    """A model without per-task heads (``heads=None``) keeping its keep factors in ``NARROW[name]``:
    the importance against one process, a DCP round trip of the shards, and spg_fast.optim's
    AdamW (native kernels) stepping the shards against one process with the same keep factors."""
    dtype = NARROW[name]
    tasks = make_tasks(n_tasks=3, n_batches=4, batch=8, n_in=N_IN, seed=4)
    torch.manual_seed(4)
    plain = nn.Sequential(nn.Linear(N_IN, 33), nn.Tanh(), nn.Linear(33, 3))
    model = nn.Sequential(nn.Linear(N_IN, 33), nn.Tanh(), nn.Linear(33, 3))
    model.load_state_dict(plain.state_dict())
    fully_shard(model)
    spg = SPG(model, backend="torch", importance_dtype=dtype)
    single = SPG(plain, backend="torch", importance_dtype=dtype)
    for task, batches in enumerate(tasks[:2]):
        spg.end_task(task, batches[rank * 2 : (rank + 1) * 2])
        single.end_task(task, batches)
    full = _full(spg)
    # The stored values as numbers: bfloat16 as floats, uint8 as codes.
    gap = max(
        float((full[n].double() - k.double()).abs().max()) for n, k in single.keep_factors.items()
    )
    dcp.save({"spg": SPGState(spg)}, checkpoint_id=str(folder / f"dcp-{name}"))
    fresh = SPG(model, backend="torch", importance_dtype=dtype)
    dcp.load({"spg": SPGState(fresh)}, checkpoint_id=str(folder / f"dcp-{name}"))
    dcp_equal = fresh.tasks_finished == 2 and all(
        k.to_local().dtype == dtype and torch.equal(k.to_local(), spg.keep_factors[n].to_local())
        for n, k in fresh.keep_factors.items()
    )
    single.load_state_dict(spg.state_dict(full=True))
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    opt = spg_fast.optim.AdamW(model.parameters(), lr=0.01, spg=spg)
    single_opt = spg_fast.optim.AdamW(plain.parameters(), lr=0.01, spg=single)
    _train(
        model,
        opt,
        None,
        [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in tasks[2]],
    )
    _train(plain, single_opt, None, tasks[2])
    full_params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    return {
        "dtypes": sorted({str(k.dtype) for k in full.values()}),
        "gap": gap,
        "head_scale": (float(spg.head_scale), float(single.head_scale)),
        "dcp_equal": dcp_equal,
        "fused_diff": max(
            float((full_params[n] - p.detach()).abs().max()) for n, p in plain.named_parameters()
        ),
        "moved": all(not torch.equal(before[n], p) for n, p in full_params.items()),
    }


def _hsdp_scenario() -> str | None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    model = ShardNet()
    fully_shard(model, mesh=mesh)
    try:
        SPG(model, heads="heads")
    except TypeError as exc:
        return str(exc)
    return None


def fsdp_scenarios(rank: int, out: Path) -> dict[str, Any]:
    """Every FSDP2 scenario on this rank."""
    results: dict[str, Any] = {}
    for name, split in SPLITS.items():
        results[f"importance/{name}"] = _importance_scenario(rank, split)
    for kind in ("nan_grad", "nan_loss", "empty", "bad_checkpoint", "shared_forward"):
        results[f"failure/{kind}"] = _failure_scenario(rank, kind)
    results["checkpoint"] = _checkpoint_scenario(rank, out)
    results["fused"] = _fused_scenario(rank)
    for name in NARROW:
        results[f"narrow/{name}"] = _narrow_scenario(rank, name, out)
    results["hsdp"] = _hsdp_scenario()
    return results
