"""The command line: help text, one-line errors for every bad value (before any data is read or
training starts), the output folder's rules, and what a run writes."""

from __future__ import annotations

import csv
import json
import re

import pytest

from spg_fast import cli
from spg_fast.harness import SEQUENCES

QUICK = ["--max-epochs", "1"]


def _error(argv, capsys) -> str:
    """The CLI's stderr for ``argv``, which must fail with exit code 2 and exactly one line."""
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spg-fast: error: "), err
    return err.strip()


def test_help_describes_every_option_and_sequence(capsys):
    for argv in ([], ["run"], ["compare"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        text = capsys.readouterr().out
        assert all(name in text for name in SEQUENCES), argv
        assert "`" not in text
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--sequence",
        "--method",
        "--backbone",
        "--seed",
        "--device",
        "--out",
        "--data-dir",
        "--lr",
        "--max-epochs",
        "--batch-size",
        "--lr-patience",
        "--protocol",
        "--optimizer",
        "--dropout-conv",
        "--dropout-fc",
        "--clip-heads",
        "--resume",
        "--overwrite",
        "--schedule",
        "--bn-stats",
        "--mask",
        "--hat-smax",
        "--hat-c",
        "--hat-clipgrad",
        "--hat-thres-cosh",
        "--hat-thres-emb",
        "--ewc-lambda",
        "--threads",
        "--tensorboard",
    ):
        assert option in text, option
    assert "training protocol (default" not in text  # no generic help left
    assert "seed of the class order" in text
    assert "hat (hard attention to the task, Serra et al. 2018)" in text
    assert "(default 400; hat only)" in text and "(default 5000; ewc only)" in text
    assert (
        "(quick: 0.1 with sgd, 0.01 with sgd-momentum, 0.001 with adamw; paper: 0.25 with sgd)"
        in text
    )
    assert (
        "fashion-mnist Fashion-MNIST's IDX files in <data-dir>/fashion-mnist/, 5 tasks of 2 classes"
        in text
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--max-epochs", "0"], "--max-epochs: must be an integer >= 1, got '0'"),
        (["run", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got '0'"),
        (["run", "--batch-size", "2.5"], "--batch-size: must be an integer, got '2.5'"),
        (["run", "--lr-patience", "0"], "--lr-patience: must be an integer >= 1, got '0'"),
        (["compare", "--seeds", ""], "--seeds: give at least one seed"),
        (["compare", "--methods", ""], "--methods: give at least one method"),
        (["compare", "--methods", "spg,,one"], "--methods: empty method in 'spg,,one'"),
        (
            ["compare", "--methods", "spg,lwf"],
            "--methods: unknown method 'lwf'; choose from spg, finetune, one, hat, ewc",
        ),
        (["compare", "--methods", "spg,spg"], "--methods: spg given more than once"),
        (
            ["compare", "--seeds", "0,x"],
            "--seeds: must be an integer between 0 and 4294967295, got 'x'",
        ),
        (["compare", "--seeds", "0,1,0"], "--seeds: 0 given more than once"),
        (["run", "--seed", "-1"], "--seed: must be an integer between 0 and 4294967295, got '-1'"),
        (["run", "--device", "tpu"], "--device: unknown device 'tpu'; use cpu, cuda or cuda:N"),
        (["run", "--device", "meta"], "--device: 'meta': the harness runs on cpu or cuda"),
        (["run", "--lr", "-1"], "--lr: must be a finite number > 0, got '-1'"),
        (["run", "--lr", "nan"], "--lr: must be a number, got 'nan'"),
        (["run", "--lr", "inf"], "--lr: must be a finite number > 0, got 'inf'"),
        (["run", "--lr-factor", "0"], "--lr-factor: must be a finite number > 1, got '0'"),
        (["run", "--lr-factor", "1"], "--lr-factor: must be a finite number > 1, got '1'"),
        (["run", "--lr-min", "0.5"], "--lr-min: 0.5 exceeds the learning rate lr=0.1"),
        (["run", "--dropout-fc", "1"], "--dropout-fc: must be a dropout rate in [0, 1), got '1'"),
        (["run", "--clip-heads", "-1"], "--clip-heads: must be a finite number >= 0, got '-1'"),
        (["run", "--resume", "--overwrite"], "--resume: cannot be combined with --overwrite"),
        (["run", "--data-dir", "/nonexistent"], "--data-dir: /nonexistent does not exist"),
        (["run", "--method", "lwf"], "--method: invalid choice: 'lwf' (choose from"),
        (["run", "--hat-smax", "1"], "--hat-smax: must be a finite number > 1, got '1'"),
        (["run", "--ewc-lambda", "-1"], "--ewc-lambda: must be a finite number >= 0, got '-1'"),
        (["run", "--hat-c", "0.5"], "--hat-c: applies to --method hat only"),
        (["run", "--method", "hat", "--ewc-lambda", "1"], "--ewc-lambda: applies to --method ewc"),
        (["compare", "--methods", "spg,one", "--hat-c", "1"], "--hat-c: applies to --method hat"),
        (["run", "--mask", "both"], "--mask: invalid choice: 'both' (choose from"),
        (["run", "--threads", "0"], "--threads: must be an integer >= 1, got '0'"),
        (["run", "--method", "hat", "--nproc", "2"], "--method: hat runs in one process"),
        (["run", "--sequence", "mnist"], "--sequence: invalid choice: 'mnist' (choose from"),
        (["run", "--optimizer", "adam"], "--optimizer: invalid choice: 'adam' (choose from"),
        (["run", "--epochs", "3"], "--epochs: not an option here (see --help)"),
        (["run", "--tasks", "0"], "--tasks: must be an integer >= 1, got '0'"),
        (["run", "--tasks", "6"], "--tasks: digits has 5 tasks, got 6"),
        (
            ["run", "--backbone", "resnet18", "--normalize"],
            "--normalize: defined for grey or colour images, not inputs of shape (64,)",
        ),
    ],
)
def test_bad_values_are_one_line_errors(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_device_cuda_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert re.search(
        r"--device: 'cuda': no CUDA device is available to this torch \(",
        _error(["run", "--device", "cuda"], capsys),
    )


def test_triton_backend_needs_cuda(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _error(["run", "--backend", "triton"], capsys)
    assert "--backend: triton" in err


def test_settings_the_backbone_lacks_are_errors(tmp_path, capsys):
    assert "--dropout-conv: the mlp backbone has no conv layers" in _error(
        ["run", "--dropout-conv", "0.2", "--out", str(tmp_path / "a")], capsys
    )
    assert "--dropout-fc: the resnet18 backbone has no dropout layers" in _error(
        ["run", "--backbone", "resnet18", "--dropout-fc", "0.2", "--out", str(tmp_path / "b")],
        capsys,
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing created


def test_data_dir_is_honoured(tmp_path, capsys):
    """A given --data-dir is the only place looked at (no silent system fallback)."""
    err = _error(
        ["run", "--sequence", "fashion-mnist", "--data-dir", str(tmp_path), *QUICK], capsys
    )
    assert err == (
        "spg-fast: error: --data-dir: Fashion-MNIST not found: looked for "
        f"train-images-idx3-ubyte.gz in {tmp_path}/fashion-mnist. Put the files there, or pass "
        "--data-dir (data_dir=) naming the folder that holds them (see the README's table)."
    )
    assert "reads no files" in _error(["run", "--data-dir", str(tmp_path)], capsys)
    err = _error(["run", "--sequence", "cifar100-10", "--data-dir", str(tmp_path), *QUICK], capsys)
    assert f"CIFAR-100 not found: looked for cifar-100-python/train in {tmp_path}" in err


def test_out_rules(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert f"--out: {tmp_path / 'file'} is a file, not a folder" in _error(
        ["run", "--out", str(tmp_path / "file")], capsys
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert "holds files spg-fast did not write (notes.txt)" in _error(
            ["run", "--out", str(foreign), *extra], capsys
        )
    assert (foreign / "notes.txt").read_text() == "mine"


def test_run_writes_results_and_refuses_to_clobber_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--max-epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "after \\ on" in printed.out and "spg on digits (seed 0)" in printed.out
    # off a terminal: plain log lines on stderr, the same in log.txt
    lines = printed.err.splitlines()
    assert any(
        re.search(r"spg seed 0 on digits: task 4 of 5 epoch 2 train_loss \d\.\d{4} val_loss", x)
        for x in lines
    )
    assert (out / "log.txt").read_text().splitlines() == lines
    result = json.loads((out / "results.json").read_text())
    for key in (
        "acc_matrix",
        "acc",
        "bwt",
        "forgetting",
        "acc_weighted",
        "bwt_weighted",
        "forgetting_weighted",
        "time_train_s",
        "time_importance_s",
        "config",
        "versions",
        "device",
        "parameters",
        "data",
        "importance_usage",
        "diverged",
        "threads",
        "settings",
    ):
        assert key in result
    assert [len(row) for row in result["acc_matrix"]] == [1, 2, 3, 4, 5]
    assert result["config"]["max_epochs"] == 2 and result["config"]["method"] == "spg"
    assert (
        "max_epochs" not in result["config"]["from_preset"]
        and "lr" in result["config"]["from_preset"]
    )
    assert result["parameters"] == (64 * 256 + 256) + (256 * 256 + 256) + 5 * (256 * 2 + 2)
    assert result["data"]["files"] == [
        "scikit-learn's bundled digits (sklearn.datasets.load_digits)"
    ]
    assert all(t > 0 for t in result["time_importance_s"])
    rows = list(csv.reader((out / "acc_matrix.csv").open()))
    assert (
        rows[0] == ["after_task", "task_0", "task_1", "task_2", "task_3", "task_4"]
        and len(rows) == 6
    )
    assert (out / "acc_matrix.png").stat().st_size > 10_000
    before = (out / "results.json").read_text()
    assert "holds an earlier run" in _error(["run", "--max-epochs", "1", "--out", str(out)], capsys)
    assert (out / "results.json").read_text() == before
    assert cli.main(["run", "--max-epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["max_epochs"] == 1


def test_default_out_is_a_new_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--max-epochs", "1", "--sequence", "digits", "--method", "one"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"digits-one-seed0-\d{8}-\d{6}", folder.name)
    assert f"wrote {folder.relative_to(tmp_path)}/" in capsys.readouterr().out


def test_capacity_is_logged_stored_and_plotted_after_every_task(tmp_path, capsys, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert cli.main(["run", "--max-epochs", "2", "--tasks", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    usage = result["importance_usage"]
    assert len(usage) == 3
    for u in usage:
        assert {"mean", "above_0.5", "above_0.9", "head_scale"} <= u.keys() and u[
            "of"
        ] == "parameters"
        assert u["head_scale"] == pytest.approx(1 - u["mean"])
    assert usage[0]["mean"] < usage[1]["mean"] < usage[2]["mean"]  # max-accumulated
    err = capsys.readouterr().err
    last = usage[-1]
    assert (
        f"importance: mean {last['mean']:.3f}, {100 * last['above_0.9']:.1f}% above 0.9, head "
        f"scale {last['head_scale']:.3f}"
    ) in err
    (panel,) = [a for a in figures[0].axes if a.get_title() == "capacity used (SPG's importance)"]
    assert [line.get_label() for line in panel.lines] == [
        "mean importance A",
        "fraction of A above 0.9",
        "head scale 1 - mean(A)",
    ]
    assert list(panel.lines[0].get_ydata()) == [u["mean"] for u in usage]


def test_hat_reports_its_gates_and_ewc_no_capacity(capsys):
    from spg_fast.harness import run

    hat = run("digits", "hat", config={"max_epochs": 1}, tasks=2, progress="lines")
    assert [u["of"] for u in hat["importance_usage"]] == ["units", "units"]
    assert hat["config"]["hat_smax"] == 400.0 and hat["config"]["hat_c"] == 0.75
    assert "gates: mean" in capsys.readouterr().err
    ewc = run("digits", "ewc", config={"max_epochs": 1}, tasks=2, progress="none")
    assert ewc["importance_usage"] == [None, None]
    assert ewc["config"]["ewc_lambda"] == 5000.0 and "hat_c" not in ewc["config"]


def test_mask_mode_reaches_spg_wrap_and_the_config(tmp_path, monkeypatch):
    from spg_fast.harness import run
    from spg_fast.spg import SPG

    seen = []
    real = SPG.wrap

    def wrap(self, optimizer, *, mask="auto"):
        seen.append(mask)
        return real(self, optimizer, mask=mask)

    monkeypatch.setattr(SPG, "wrap", wrap)
    argv = ["run", "--mask", "update", "--max-epochs", "1", "--tasks", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["mask"] == "update"
    for mask in ("gradient", "auto"):
        result = run(
            "digits", config={"max_epochs": 1}, options={"mask": mask}, tasks=1, progress="none"
        )
        assert result["config"]["mask"] == mask
    assert seen == ["update", "gradient", "auto"]
