"""RMSNorm with the residual add folded in, one row of the hidden state per program.

A Llama decoder layer normalizes twice, each time right after a residual add: XLA ran each as two kernels (the
add and the sum of squares, then the scaling), four launches a layer of the decode step (session 14,
docs/performance.md).  This kernel does the add, the sum of squares and the scaling in one pass over the row:

  residual_out = x + residual           (in the activation dtype, as transformers adds)
  out = weight * (h * rsqrt(mean(h^2) + EPS)).to(dtype)   with h = residual_out in fp32

which is transformers' LlamaRMSNorm after its residual add.  Without a residual (HAS_RES = 0), h = x and
residual_out is not written.  Rows of N values, contiguous; BLOCK_N = N rounded up to a power of two.
"""

import triton
import triton.language as tl


def launch_params(n: int) -> dict:
  """BLOCK_N and num_warps for rows of n values: a power of two >= n, 16 values a thread (1 - 16 warps)."""
  block_n = triton.next_power_of_2(n)
  return dict(BLOCK_N=block_n, num_warps=max(1, min(16, block_n // 512)))


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr):
  row = tl.program_id(0).to(tl.int64)
  offs = tl.arange(0, BLOCK_N)
  mask = offs < N
  x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
  if HAS_RES:
    x = x + tl.load(res_ptr + row * N + offs, mask=mask, other=0.0)
    tl.store(res_out_ptr + row * N + offs, x, mask=mask)
  h = x.to(tl.float32)
  h = h * tl.rsqrt(tl.sum(h * h, axis=0) / N + EPS)
  w = tl.load(w_ptr + offs, mask=mask, other=0.0)
  tl.store(out_ptr + row * N + offs, w * h.to(w.dtype), mask=mask)
