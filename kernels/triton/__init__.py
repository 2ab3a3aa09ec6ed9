"""Triton sparse convolution kernels (CSR and BSR weights) for CUDA GPUs.

``csr_conv2d`` / ``bsr_conv2d`` take an NCHW input and a sparse weight in the layouts of
docs/format.md, and return the convolution with its fused epilogue (bias, ReLU, residual).
Importing this package never imports triton; ``available()`` says whether the kernels can run
(a GPU, or the CPU interpreter with TRITON_INTERPRET=1 set before triton is imported).
Design and roofline: docs/triton-kernels.md.
"""
from .launch import available, bsr_conv2d, csr_conv2d, unavailable_reason

__all__ = ["available", "unavailable_reason", "csr_conv2d", "bsr_conv2d"]
