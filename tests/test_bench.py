"""The benchmark suite runs and writes its outputs (tiny sizes; speed is never asserted here)."""

from __future__ import annotations

import csv
import json

from bench import bytes_model
from bench.ops import resnet50_shapes, synthetic_shapes, transformer_1b_shapes
from bench.run import main


def test_bytes_model():
    assert bytes_model.bytes_per_element("mask") == 12  # read g and A, write g
    assert bytes_model.bytes_per_element("adamw_masked", param_bytes=2) == 7 * 2 + 4
    assert (
        bytes_model.bytes_per_element("importance") == 16
    )  # read h twice (two passes) and A, write A


def test_model_shape_lists():
    assert sum(torch_numel(s) for s in resnet50_shapes()) == 25_557_032  # torchvision's ResNet-50
    assert 1.0e9 < sum(torch_numel(s) for s in transformer_1b_shapes()) < 1.1e9
    assert sum(torch_numel(s) for s in synthetic_shapes(3_000_001)) == 3_000_001


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_runner_writes_tables_csv_and_plots(tmp_path):
    main(
        [
            "--out",
            str(tmp_path),
            "--ops",
            "mask,adamw_masked",
            "--sizes",
            "2e4",
            "--models",
            "",
            "--no-compile",
        ]
    )
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["impl"] for r in rows if r["op"] == "mask"} == {
        "spg-fast",
        "eager loop",
        "torch._foreach_mul_",
    }
    assert all(float(r["seconds"]) > 0 and float(r["GBps"]) > 0 for r in rows)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["stream_bandwidth_GBps"] > 0 and env["torch"]
    assert "## adamw_masked" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "mask.png").exists() and (tmp_path / "adamw_masked.png").exists()
