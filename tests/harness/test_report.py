"""Reports: the heatmap's colour scale fitted to the values, and the partial marking of an
interrupted comparison."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from spg_fast.harness import report


def test_colour_scale_spans_the_values():
    assert report.colour_range([0.97, 1.0, 0.99]) == (0.97, 1.0)
    assert report.colour_range([1.0, 1.0]) == pytest.approx(
        (0.995, 1.005)
    )  # equal values still get a colour


def test_heatmap_uses_the_fitted_scale_and_prints_the_values(tmp_path, monkeypatch):
    result = {
        "method": "spg",
        "sequence": "digits",
        "acc": 0.985,
        "forgetting": 0.01,
        "acc_matrix": [[0.99], [0.97, 1.0]],
    }
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.plot_run(result, tmp_path / "m.png")
    heatmap = figures[0].axes[0]
    assert heatmap.images[0].get_clim() == (0.97, 1.0)
    assert sorted(t.get_text() for t in heatmap.texts) == ["0.970", "0.990", "1.000"]
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_partial_comparison_is_marked(tmp_path):
    run = {
        "method": "spg",
        "config": {"seed": 0},
        "acc_matrix": [[0.9], [0.8, 0.9]],
        **{k: 0.5 for k in report.METRICS},
    }
    rows = report.aggregate([run])
    report.write_comparison(tmp_path, "digits", [run], rows, planned=3)
    assert (
        (tmp_path / "comparison.md")
        .read_text()
        .startswith("partial: 1 of 3 runs finished\n\n| method |")
    )
    assert json.loads((tmp_path / "comparison.json").read_text())["runs_planned"] == 3
