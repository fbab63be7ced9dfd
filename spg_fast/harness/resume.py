"""What ``spg-fast run|compare --resume`` takes from the output folder: the settings the run or
comparison was started with (a run's from its checkpoint, or from its results once finished; a
comparison's from ``settings.json``), and the check that options given again agree with them."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spg_fast.harness import outputs
from spg_fast.harness.config import ConfigError
from spg_fast.harness.methods import MethodOptions
from spg_fast.harness.protocol import VECTOR_SEQUENCES, resolve


def saved_run(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the arguments the run in ``out`` was started with, the values that define it)."""
    outputs.check(out, "resume")
    results = out / "results.json"
    if results.exists():
        finished = json.loads(results.read_text())
        return finished["settings"], finished["config"]
    state = outputs.load_checkpoint(out)
    return state["settings"], state["identity"]


def saved_compare(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the arguments the comparison in ``out`` was started with, the values that define it: every
    training setting and method option resolved, the backbone by the sequence's default)."""
    outputs.check(out, "resume", compare=True)
    settings = json.loads((out / "settings.json").read_text())
    cfg, _ = resolve(settings["protocol"], settings["sequence"], settings["config"])
    default = "mlp" if settings["sequence"] in VECTOR_SEQUENCES else "alexnet"
    values = {
        **{k: settings[k] for k in ("sequence", "methods", "seeds", "protocol", "tasks")},
        "backbone": settings["backbone"] or default,
        **asdict(cfg),
        **asdict(MethodOptions(**settings["options"])),
    }
    return settings, values


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def check_given(out: Path, values: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the first option in ``given`` (option name -> value) that the
    run in ``out`` (``values``, from ``saved_run`` or ``saved_compare``) does not have or has with
    another value."""
    for name, value in given.items():
        if name not in values:
            raise ConfigError(
                name, f"does not apply to the run in {out}; leave it out to resume it"
            )
        saved = values[name]
        if _plain(value) != _plain(saved):
            shown = "all" if saved is None else saved
            raise ConfigError(
                name,
                f"{_shown(value)} contradicts the run in {out} ({_shown(shown)} there); leave it "
                "out to resume that run",
            )


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)
