"""bench.adaptive runs end to end on a tiny configuration and writes its three result files (no
numbers judged)."""

from __future__ import annotations

import csv
import json

import pytest

from bench.adaptive import CSV_FIELDS, METHODS, main
from spg_fast.harness.metrics import summary


def test_tiny_run_writes_md_csv_json(tmp_path, capsys):
    args = [
        "--out",
        str(tmp_path),
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--tasks",
        "2",
        "--optimizers",
        "sgd:0.1,adamw:1e-3",
    ]
    rows = main(args)
    expected = {(o, m) for o in ("sgd", "adamw") for m in METHODS}
    assert {(r["optimizer"], r["method"]) for r in rows} == expected and len(rows) == len(expected)

    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert tuple(table[0]) == CSV_FIELDS and len(table) == len(expected)
    assert all(0 <= float(r["acc"]) <= 1 and float(r["seconds"]) > 0 for r in table)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert (
        saved["config"]["tasks"] == 2
        and saved["config"]["epochs"] == 1
        and saved["planned_runs"] == len(rows)
    )
    assert saved["optimizer_settings"]["adamw:0.001"]["weight_decay"] == 0.01
    assert saved["environment"]["torch"] and saved["environment"]["command"].endswith(
        "sgd:0.1,adamw:1e-3"
    )
    for run in saved["runs"]:
        assert [len(row) for row in run["acc_matrix"]] == [1, 2]
        assert summary(run["acc_matrix"], [1, 1])["forgetting"] == pytest.approx(run["forgetting"])
    assert {s["method"] for s in saved["summary"]} == set(METHODS)

    md = (tmp_path / "results.md").read_text()
    assert "## digits" in md and "| adamw | 0.001 | spg-fused |" in md and "partial" not in md
    assert "[10/10] digits seed 0 adamw" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # results already there: refused without --overwrite
        main(args)
