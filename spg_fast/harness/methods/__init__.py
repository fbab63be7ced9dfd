"""The methods the harness compares: ``spg`` (spg-fast itself), ``finetune`` (one network, no
protection), ``one`` (a network per task), ``hat`` (hard attention to the task) and ``ewc`` (elastic
weight consolidation), each a ``Method`` (``base``) with its settings in ``MethodOptions``."""

from __future__ import annotations

from spg_fast.harness.methods.base import Batch, Method, One, TaskData
from spg_fast.harness.methods.ewc import Ewc
from spg_fast.harness.methods.hat import Hat
from spg_fast.harness.methods.options import MethodOptions
from spg_fast.harness.methods.spg import Spg

METHODS = ("spg", "finetune", "one", "hat", "ewc")


def make(name: str, options: MethodOptions, backend: str = "auto") -> Method:
    """The method ``name`` with ``options``; ``backend`` is SPG's implementation."""
    if name == "spg":
        return Spg(options.mask, backend)
    if name == "hat":
        return Hat(
            options.hat_smax,
            options.hat_c,
            options.hat_clipgrad,
            options.hat_thres_cosh,
            options.hat_thres_emb,
        )
    if name == "ewc":
        return Ewc(options.ewc_lambda)
    if name == "one":
        return One()
    if name == "finetune":
        return Method()
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")


__all__ = ["METHODS", "Batch", "Method", "MethodOptions", "TaskData", "make"]
