"""The tensor dtypes the Triton kernels take (no Triton import, so the backend can ask without Triton installed)."""

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPORTANCE_DTYPES = (torch.float32, torch.bfloat16)
