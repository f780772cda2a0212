"""Kernels (torch, with Triton on CUDA): cut cross-entropy and low-bit packing."""

from memft.kernels.cut_cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
