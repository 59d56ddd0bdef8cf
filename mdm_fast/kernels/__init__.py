"""Triton kernels of the fused ops, one file per kernel family."""
