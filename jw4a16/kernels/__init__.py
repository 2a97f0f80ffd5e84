"""Triton kernels. This package imports only `triton` and `triton.language`."""

from jw4a16.kernels.w4a16_gemm import w4a16_gemm_kernel

__all__ = ["w4a16_gemm_kernel"]
