"""spg-fast: parameter-level soft-masking (SPG) for continual learning in PyTorch.

The public API: ``SPG`` (importance, masking, checkpoints), ``SPGOptimizer`` and ``AttachHandle``
(what ``SPG.wrap`` and ``SPG.attach`` return), ``spg_fast.optim`` (fused masked SGD, Adam, AdamW),
``SPGState`` (SPG in ``torch.distributed.checkpoint``), ``PassReport`` and ``PassProgress`` (what
``SPG.end_task`` reports), ``Usage`` (``SPG.usage()``), the mask modes (``MaskMode``,
``MASK_MODES``) and storage formats (``IMPORTANCE_DTYPES``), ``BACKENDS``, and the pure-PyTorch
``spg_fast.reference``. Modules whose names start with an underscore are internal.
"""

from importlib.metadata import PackageNotFoundError, version

from spg_fast import optim, reference
from spg_fast._backend import BACKENDS
from spg_fast._importance_pass import PassProgress, PassReport
from spg_fast.checkpoint import SPGState
from spg_fast.mask_mode import MASK_MODES, MaskMode
from spg_fast.optimizer import AttachHandle, SPGOptimizer
from spg_fast.spg import SPG
from spg_fast.storage import IMPORTANCE_DTYPES
from spg_fast.usage import Usage

try:
    __version__ = version("spg-fast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS",
    "IMPORTANCE_DTYPES",
    "MASK_MODES",
    "SPG",
    "AttachHandle",
    "MaskMode",
    "PassProgress",
    "PassReport",
    "SPGOptimizer",
    "SPGState",
    "Usage",
    "__version__",
    "optim",
    "reference",
]
