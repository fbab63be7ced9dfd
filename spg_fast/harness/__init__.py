"""Continual-learning harness: task sequences, SPG and the methods it is compared with (fine-tuning,
a network per task, HAT, EWC), metrics, reports (``spg-fast run|compare``)."""

from spg_fast.harness.api import RunInterrupted, compare, run
from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.extras import MissingExtraError
from spg_fast.harness.formats import DataError, DataNotFoundError
from spg_fast.harness.methods import METHODS, MethodOptions
from spg_fast.harness.metrics import average_accuracy, backward_transfer, forgetting
from spg_fast.harness.outputs import OutputError
from spg_fast.harness.protocol import PROTOCOLS, resolve
from spg_fast.harness.report import plot_run
from spg_fast.harness.sequences import SEQUENCES, TaskSequence, build_sequence

__all__ = [
    "METHODS",
    "PROTOCOLS",
    "SEQUENCES",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "MethodOptions",
    "MissingExtraError",
    "OutputError",
    "RunInterrupted",
    "TaskSequence",
    "TrainConfig",
    "average_accuracy",
    "backward_transfer",
    "build_sequence",
    "compare",
    "forgetting",
    "plot_run",
    "resolve",
    "run",
]
