"""Triton kernels. This package imports only `triton` and `triton.language`."""

from jw4a16.kernels.w4a16_frag import w4a16_frag_kernel, w4a16_frag_norm_kernel
from jw4a16.kernels.w4a16_gemm import w4a16_gemm_kernel
from jw4a16.kernels.w4a16_gemv import w4a16_gemv_kernel

# KernelConfig.kernel -> the kernel; all take the same arguments (frag: qweight fragment-packed) and the shared
# constexprs N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS, plus their tile's (KernelConfig.meta).
KERNELS = {"tile": w4a16_gemm_kernel, "gemv": w4a16_gemv_kernel, "frag": w4a16_frag_kernel}

__all__ = ["KERNELS", "w4a16_frag_kernel", "w4a16_frag_norm_kernel", "w4a16_gemm_kernel", "w4a16_gemv_kernel"]
