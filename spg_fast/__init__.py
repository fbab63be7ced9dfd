"""spg-fast: parameter-level soft-masking (SPG) for continual learning in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from spg_fast import optim, reference
from spg_fast._backend import BACKENDS
from spg_fast.optimizer import AttachHandle, SPGOptimizer
from spg_fast.spg import SPG

try:
    __version__ = version("spg-fast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["BACKENDS", "SPG", "AttachHandle", "SPGOptimizer", "__version__", "optim", "reference"]
