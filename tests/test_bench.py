"""The benchmark suite runs and writes its outputs (tiny sizes; speed is never asserted here)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from bench import bytes_model
from bench.ops import resnet50_shapes, synthetic_shapes, transformer_1b_shapes
from bench.run import main


def test_bytes_model():
    assert bytes_model.bytes_per_element("mask") == 12  # read g and the keep factor, write g
    assert bytes_model.bytes_per_element("adamw_masked", param_bytes=2) == 7 * 2 + 4
    # read h twice (two passes) and the keep factor, write the keep factor
    assert bytes_model.bytes_per_element("importance") == 16
    # the narrow keep formats: 2 and 1 bytes per element, read (and written) as stored
    keep = bytes_model.KEEP_BYTES
    assert (keep["float32"], keep["bfloat16"], keep["uint8"]) == (4, 2, 1)
    assert bytes_model.bytes_per_element("mask", keep_bytes=keep["uint8"]) == 9
    assert bytes_model.bytes_per_element("importance", keep_bytes=keep["bfloat16"]) == 12
    assert bytes_model.bytes_per_element("update_mask", 2, keep["uint8"]) == 3 * 2 + 1
    assert "| mask | 12 | 10 | 9 | 8 | 6 | 5 |" in bytes_model.table()


def test_model_shape_lists():
    assert sum(torch_numel(s) for s in resnet50_shapes()) == 25_557_032  # torchvision's ResNet-50
    assert 1.0e9 < sum(torch_numel(s) for s in transformer_1b_shapes()) < 1.1e9
    assert sum(torch_numel(s) for s in synthetic_shapes(3_000_001)) == 3_000_001


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.slow
def test_runner_writes_tables_csv_and_plots(tmp_path, monkeypatch):
    # The runner flushes denormals on the CPU, which OpenMP threads started meanwhile inherit and
    # keep (resetting it reaches the calling thread only); the rest of the suite needs denormals
    # (keep factors below 2**-126), and these sizes time nothing that could produce any.
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: True)
    # One thread: at these sizes a second one only waits for the CPU (on a loaded machine every
    # parallel op of the run took milliseconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(
            [
                "--out",
                str(tmp_path),
                "--ops",
                "mask,adamw_masked",
                "--sizes",
                "3e3",
                "--models",
                "",
                "--no-compile",
            ]
        )
    finally:
        torch.set_num_threads(threads)
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


def test_steps_bench_counts_the_bytes_each_case_moves(tmp_path):
    from bench import steps

    rows = steps.main(["--numel", "3e5", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)])
    by = {r["case"]: r for r in rows}
    assert len(by) == 18 and all(r["ms"] > 0 for r in rows)
    # AdamW: p, g, m, v read and p, m, v written; a one-byte keep factor read once more; around
    # torch's step a snapshot (read p, write it) and the scaling (read p, it, the keep; write p).
    assert by["torch adamw fused (no SPG)"]["bytes_per_element"] == 28
    assert by["spg_fast.optim adamw update u8"]["bytes_per_element"] == 29
    assert by["spg.wrap(torch adamw fused) update u8"]["bytes_per_element"] == 28 + 8 + 13
    assert by["spg.wrap(torch sgd fused) update f32"]["bytes_per_element"] == 20 + 8 + 16
    assert (tmp_path / "steps.md").read_text().count("\n| ") == 19


def test_host_overhead_bench_times_every_case_in_a_real_loop(tmp_path):
    from bench import host_overhead

    host_overhead.main(["--counts", "4", "--repeats", "3", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["tensors"] == 4 and r["host_us"] > 0 for r in rows)
