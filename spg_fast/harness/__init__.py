"""Continual-learning harness: task sequences, SPG and baselines, metrics, reports (``spg-fast run|compare``)."""

from spg_fast.harness.api import compare, run
from spg_fast.harness.formats import DataError, DataNotFoundError
from spg_fast.harness.metrics import average_accuracy, backward_transfer, forgetting
from spg_fast.harness.sequences import SEQUENCES, TaskSequence, build_sequence
from spg_fast.harness.training import METHODS, TrainConfig

__all__ = ["METHODS", "SEQUENCES", "DataError", "DataNotFoundError", "TaskSequence", "TrainConfig",
           "average_accuracy", "backward_transfer", "build_sequence", "compare", "forgetting", "run"]
