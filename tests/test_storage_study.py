"""bench.storage_study runs the three storage formats end to end on a tiny configuration and writes
its comparison (no numbers judged)."""

from __future__ import annotations

import json

import pytest

from bench.storage_study import main


@pytest.mark.slow
def test_tiny_study_writes_one_row_per_format_and_finetuning(tmp_path):
    out = tmp_path / "study"
    args = ["--out", str(out), "--sequences", "digits", "--seeds", "0", "--epochs", "1"]
    main([*args, "--tasks", "2", "--optimizers", "sgd:0.1"])
    rows = json.loads((out / "storage.json").read_text())
    assert [r["storage"] for r in rows] == ["finetune", "float32", "bfloat16", "uint8"]
    assert [r["bytes_per_parameter"] for r in rows] == [0, 4, 2, 1]
    assert "| digits | sgd | 0.1 | uint8 | 1 |" in (out / "storage.md").read_text()
