"""Optimizers with SPG's mask fused into the update: torch's constructor signatures
plus ``spg=``."""

from spg_fast.optim.adam import Adam, AdamW
from spg_fast.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
