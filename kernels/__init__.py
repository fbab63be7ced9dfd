"""Triton kernels for SPG, installed as ``spg_fast.kernels``."""
