"""Run every Triton kernel under the interpreter on machines without a CUDA device (CI),
compiled otherwise."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
