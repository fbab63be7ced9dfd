"""Protocol presets: the quick defaults, the authors' setting per sequence (values from their
configuration files), explicit settings overriding one value each, and the paper network on
miniature CIFAR-100 files."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from spg_fast import cli
from spg_fast.harness import ConfigError, TrainConfig, api, resolve
from tests.harness.test_sequences import _cifar


def test_quick_is_the_train_config_default():
    cfg, from_preset = resolve("quick", "digits")
    assert cfg == TrainConfig() and sorted(from_preset) == sorted(asdict(cfg))


@pytest.mark.parametrize(
    "sequence, conv, fc",
    [
        ("cifar100-10", 0.313455931477029, 0.40930567117056715),
        ("cifar100-20", 0.49562963280365513, 0.4850322667156278),
        ("tinyimagenet-10", 0.12493294838321953, 0.4344091928004977),
        ("tinyimagenet-20", 0.3874908901569995, 0.44229703085300165),
        ("femnist-10", 0.4921793208978701, 0.4847418191146906),
        ("femnist-20", 0.2974548196260386, 0.38867844457851425),
        ("fashion-mnist", 0.0, 0.0),  # no tuned rates from the authors
    ],
)
def test_paper_preset(sequence, conv, fc):
    cfg, _ = resolve("paper", sequence)
    assert asdict(cfg) == dict(
        optimizer="sgd",
        lr=0.25,
        lr_factor=3.0,
        lr_min=1e-3,
        lr_patience=5,
        max_epochs=500,
        batch_size=64,
        schedule="plateau",
        shuffle="once",
        dropout_conv=conv,
        dropout_fc=fc,
        clip_heads=10_000.0,
        normalize=True,
        bn_stats="shared",
    )


def test_explicit_settings_override_one_value_each():
    cfg, from_preset = resolve("paper", "cifar100-10", {"max_epochs": 50, "dropout_fc": 0.1})
    assert cfg.max_epochs == 50 and cfg.dropout_fc == 0.1 and cfg.dropout_conv == 0.313455931477029
    assert (
        "max_epochs" not in from_preset and "dropout_fc" not in from_preset and "lr" in from_preset
    )
    assert not resolve("paper", "digits")[0].normalize  # vectors are not standardised
    adamw, _ = resolve("paper", "cifar100-10", {"optimizer": "adamw"})
    assert (adamw.lr, adamw.lr_min) == (1e-3, 1e-5)  # the paper's rates are for SGD


@pytest.mark.parametrize(
    "explicit, message",
    [
        ({"epochs": 3}, "epochs: not a TrainConfig setting"),
        ({"lr": 0}, "lr: must be a finite number > 0, got 0.0"),
        ({"max_epochs": 2.5}, "max_epochs: must be an integer, got 2.5"),
        ({"schedule": "cosine"}, "schedule: must be one of divide-stop, plateau, got 'cosine'"),
        ({"lr_min": 1.0}, "lr_min: 1.0 exceeds the learning rate lr=0.1"),
    ],
)
def test_bad_settings_name_the_setting(explicit, message):
    with pytest.raises(ConfigError, match=message):
        resolve("quick", "digits", explicit)


def test_paper_protocol_on_miniature_cifar_builds_the_authors_network(
    tmp_path, monkeypatch, capsys
):
    """The CLI builds the 6,708,772-parameter network from the miniature files; Ctrl-C in the
    first task (training it takes minutes on 2 CPU cores) leaves the start line in the log and
    nothing else."""
    (tmp_path / "data").mkdir()
    data = _cifar(tmp_path / "data")
    out = tmp_path / "run"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "train_task", ctrl_c)
    argv = [
        "run",
        "--sequence",
        "cifar100-10",
        "--protocol",
        "paper",
        "--data-dir",
        str(data),
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 130
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "spg-fast: interrupted spg seed 0 on cifar100-10: no task saved; continue with: "
            "spg-fast run --sequence"
        )
    )
    log = (out / "log.txt").read_text()
    assert "start: alexnet, 6,708,772 parameters per network, protocol paper, " in log
    assert "thread(s) (" in log and "optimizer sgd, lr 0.25," in log
    assert (
        "dropout_conv 0.313455931477029, dropout_fc 0.40930567117056715, clip_heads 10000.0" in log
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "log.txt",
        "metrics.csv",
        "metrics.jsonl",
    ]
