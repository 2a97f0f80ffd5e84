"""Triton kernels. This package imports only `triton` and `triton.language`."""

from jw4a16.kernels.w4a16_gemm import w4a16_gemm_kernel
from jw4a16.kernels.w4a16_gemv import w4a16_gemv_kernel

# KernelConfig.kernel -> the kernel; both take the same arguments and constexprs.
KERNELS = {"tile": w4a16_gemm_kernel, "gemv": w4a16_gemv_kernel}

__all__ = ["KERNELS", "w4a16_gemm_kernel", "w4a16_gemv_kernel"]
