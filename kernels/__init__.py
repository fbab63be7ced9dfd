"""spg-fast's native code, installed as ``spg_fast.kernels``: the Triton kernels (``triton/``, CUDA, and the CPU under
Triton's interpreter) and the C optimizer steps for CPU tensors (``cpu/``). Each op is one module named after it;
its contract is that of its reference in ``spg_fast.reference`` or, for the optimizer steps, "mask the gradient,
then torch's fused step". ``spg_fast.backend`` chooses among them; nothing here imports the rest of spg_fast."""
