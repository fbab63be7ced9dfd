"""Continual-learning harness: task sequences, SPG and baselines, metrics, reports
(``spg-fast run|compare``)."""

from spg_fast.harness.api import RunInterrupted, compare, run
from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.formats import DataError, DataNotFoundError
from spg_fast.harness.metrics import average_accuracy, backward_transfer, forgetting
from spg_fast.harness.outputs import OutputError
from spg_fast.harness.protocol import PROTOCOLS, resolve
from spg_fast.harness.sequences import SEQUENCES, TaskSequence, build_sequence
from spg_fast.harness.training import METHODS

__all__ = [
    "METHODS",
    "PROTOCOLS",
    "SEQUENCES",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "OutputError",
    "RunInterrupted",
    "TaskSequence",
    "TrainConfig",
    "average_accuracy",
    "backward_transfer",
    "build_sequence",
    "compare",
    "forgetting",
    "resolve",
    "run",
]
