"""Last accuracy-matrix row of a finished ``--bn-stats per-task`` run (argument: its folder, with
checkpoint.pt) evaluated with the shared (final) BatchNorm statistics instead of each task's own:
the same trained network, only the statistics differ. BWT compares it with the diagonal, which is
the same for both (a task is evaluated right after training it, when its own statistics are the
current ones). Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

from spg_fast.harness import training as tr
from spg_fast.harness.config import TrainConfig
from spg_fast.harness.sequences import build_sequence


def bwt(row: list[float], diagonal: list[float]) -> float:
    return sum(row[j] - diagonal[j] for j in range(len(row) - 1)) / (len(row) - 1)


def main(out: Path) -> dict:
    result = json.loads((out / "results.json").read_text())
    config = result["config"]
    cfg = TrainConfig(**{k: config[k] for k in TrainConfig.__dataclass_fields__})
    seq = build_sequence(config["sequence"], seed=config["seed"])
    learner = tr.Learner(
        config["method"], tr.model_factory(config["backbone"], seq, cfg), torch.device("cpu"), cfg
    )
    learner.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["learner"])
    inputs = tr.Inputs(seq, cfg, torch.device("cpu"))
    shared = [
        tr.evaluate(learner.model_for(j), j, task.test, inputs)[1]
        for j, task in enumerate(seq.tasks)
    ]
    own = result["acc_matrix"][-1]
    diagonal = [row[-1] for row in result["acc_matrix"]]
    return {
        "run": out.name,
        "last_row_per_task_stats": own,
        "last_row_shared_stats": shared,
        "bwt_per_task_stats": bwt(own, diagonal),
        "bwt_shared_stats": bwt(shared, diagonal),
        "acc_per_task_stats": sum(own) / len(own),
        "acc_shared_stats": sum(shared) / len(shared),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
