"""Fragment-packed int4 weights -> W [K, N] in bf16 / fp16, the first half of the dequantize-then-GEMM route.

From M = 512 on H100 (tuning.DENSE_FROM_M) the op writes the dequantized weight once and lets cuBLAS multiply.
This kernel writes it in [K, N], the layout in which cuBLAS multiplies fastest (x @ W took 0.79 - 0.95x the time
of x @ (W^T)^T on five Llama shapes at M = 1024 - 4096, H100, docs/performance.md session 15), which an XLA
fusion cannot write from the fragment packing without a slow transpose.  One program per 64 weight columns (a
block of the packing) and BLOCK_K values of K unpacks with w4a16_frag's shift-and-LOP3 pieces, dequantizes in
fp32 as the reference does, w = ((q - z) * s) rounded once to the output dtype, and stores the tile transposed.
The result is bit-identical to `reference.dequantize_fragment_nk(...).T`.

Arguments: qweight [ceil(N / 64), 8 K] int32 (layout.to_fragment_packed), scales [K // G, N], qzeros [K // G, N // 8]
int32 in the kernel layout (with HAS_ZP; else any pointer), out [K, N].
Constexprs: N, K, GROUP_SIZE (the group, K for one group), HAS_ZP, ZP_BIAS (the zero without qzeros), BLOCK_K (a
multiple of 64 dividing K; a multiple or a divisor of GROUP_SIZE), PTX (NVIDIA: the unpacking's AND + OR as one
LOP3).
"""

import triton
import triton.language as tl

from jw4a16.kernels.w4a16_frag import ROW_BLOCK, _k_order, _pieces


@triton.jit
def dequant_fragment_kernel(
    qweight_ptr,
    scales_ptr,
    qzeros_ptr,
    out_ptr,
    N: tl.constexpr,
    K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PTX: tl.constexpr = 0,
):
  DTYPE: tl.constexpr = out_ptr.dtype.element_ty
  B: tl.constexpr = 128.0 if DTYPE == tl.bfloat16 else 1024.0
  tl.static_assert(BLOCK_K % 64 == 0 and K % BLOCK_K == 0, "BLOCK_K must be a multiple of 64 dividing K")
  KW: tl.constexpr = K // 8
  pid_n = tl.program_id(0)  # one block of the packing: ROW_BLOCK columns
  pid_k = tl.program_id(1)
  k0 = pid_k * BLOCK_K
  cols = tl.arange(0, ROW_BLOCK)
  offs_n = pid_n * ROW_BLOCK + cols
  mask_n = offs_n < N
  # column c's 8 words of K block b: word 8 ROW_BLOCK b + 8 c + [0, 8) of the block's row (w4a16_frag's addressing)
  offs_w = tl.arange(0, BLOCK_K // 8)
  w_offs = (cols * 8)[:, None] + ((offs_w // 8) * (ROW_BLOCK * 8) + offs_w % 8)[None, :]
  row = qweight_ptr + pid_n.to(tl.int64) * (ROW_BLOCK * KW) + (k0 // 64) * (ROW_BLOCK * 8)
  words = tl.load(row + w_offs, mask=mask_n[:, None], other=0, eviction_policy="evict_first")
  b0, b1, b2, b3 = _pieces(words, DTYPE, PTX, 0)
  q = _k_order(b0, b1, b2, b3, ROW_BLOCK, BLOCK_K).to(tl.float32) - B  # [ROW_BLOCK, BLOCK_K], exact
  # the groups of this block: one (GROUP_SIZE >= BLOCK_K) or NG whole ones
  NG: tl.constexpr = BLOCK_K // GROUP_SIZE if GROUP_SIZE < BLOCK_K else 1
  offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
  s = tl.load(scales_ptr + offs_g[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0.0)
  if HAS_ZP:
    zw = tl.load(qzeros_ptr + offs_g[None, :] * (N // 8) + (offs_n // 8)[:, None], mask=mask_n[:, None], other=0)
    z = ((zw >> ((offs_n % 8) * 4)[:, None]) & 0xF).to(tl.float32)[:, :, None]  # [ROW_BLOCK, NG, 1]
  else:
    z = ZP_BIAS
  q = tl.reshape(q, (ROW_BLOCK, NG, BLOCK_K // NG))
  w = tl.reshape((q - z) * s.to(tl.float32)[:, :, None], (ROW_BLOCK, BLOCK_K))
  offs_k = k0 + tl.arange(0, BLOCK_K)
  out = out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]
  tl.store(out, tl.trans(w.to(DTYPE, fp_downcast_rounding="rtne")), mask=mask_n[None, :])
