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
    kept = (out / "float32" / "results.json").read_text()
    main([*args, "--tasks", "2", "--optimizers", "sgd:0.1", "--formats", "uint8"])
    assert (out / "float32" / "results.json").read_text() == kept
    rows = json.loads((out / "storage.json").read_text())
    assert [r["storage"] for r in rows] == ["finetune", "float32", "bfloat16", "uint8"]


def test_an_unknown_format_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "study"), "--formats", "float16"])
    assert "--formats takes float32, bfloat16, uint8" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
