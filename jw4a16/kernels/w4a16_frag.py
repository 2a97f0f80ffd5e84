"""W4A16 on Hopper's wgmma from "fragment-packed" weights (layout.to_fragment_packed), for small M.

Experimental (work in progress, not dispatched): the swapped tile of w4a16_gemm (out^T = W^T x^T) reading
weights repacked along K in the order the wgmma's register operand holds them, so the dequantized tile needs no
layout conversion through shared memory and each bf16x2 (fp16x2) register pair is one shift and one LOP3:

    ((word >> 4 q) & 0x000F000F) | 0x43004300  ->  the pair (128 + q_lo, 128 + q_hi) as two bf16

(scripts/layout_probe.py shows both effects on a minimal loop, sm_90, Triton 3.9.)  The group correction is the
tile kernel's: acc += (x^T-dot - (B + z) * rowsum(x)) * s per K step.

Arguments as the other kernels (x, qweight, scales, qzeros, M, out, partials, locks) except qweight:
  qweight [N, K // 8] int32, fragment-packed.  qzeros stay in the kernel layout [K // G, N // 8].
Constexprs: N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS, BLOCK_M, BLOCK_N, BLOCK_K (a multiple of 64), SPLIT_K.
"""

import triton
import triton.language as tl

from jw4a16.kernels.splitk import store_tile


@triton.jit
def _halves(v, DTYPE: tl.constexpr):
  """The low and high 16 bits of int32 v as two DTYPE values, joined along a new minor dim (a register pair)."""
  return tl.join(v.to(tl.int16).to(DTYPE, bitcast=True), (v >> 16).to(tl.int16).to(DTYPE, bitcast=True))


@triton.jit
def _dequant_tile(words, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr):
  """Fragment-packed words [BN, BK // 8] -> B + q [BN, BK] in DTYPE, K in natural order (B = 128 or 1024)."""
  MAGIC: tl.constexpr = 0x43004300 if DTYPE == tl.bfloat16 else 0x64006400
  b0 = _halves((words & 0x000F000F) | MAGIC, DTYPE)
  b1 = _halves(((words >> 4) & 0x000F000F) | MAGIC, DTYPE)
  b2 = _halves(((words >> 8) & 0x000F000F) | MAGIC, DTYPE)
  b3 = _halves(((words >> 12) & 0x000F000F) | MAGIC, DTYPE)
  t = tl.join(tl.join(b0, b1), tl.join(b2, b3))  # [BN, BK // 8 (= b, c, h), p, q0, q1]
  t = tl.reshape(t, (BN, BK // 64, 4, 2, 2, 2, 2))  # [n, b, c, h, p, q0, q1]
  return tl.reshape(tl.permute(t, (0, 1, 6, 5, 3, 2, 4)), (BN, BK))  # k = 64 b + 16 q + 8 h + 2 c + p


@triton.jit
def w4a16_frag_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    qzeros_ptr,
    M,
    out_ptr,
    partial_ptr,
    lock_ptr,
    N: tl.constexpr,
    K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
  DTYPE: tl.constexpr = x_ptr.dtype.element_ty
  B: tl.constexpr = 128.0 if DTYPE == tl.bfloat16 else 1024.0
  tl.static_assert(BLOCK_K % 64 == 0, "fragment-packed blocks are 64 K values")
  tl.static_assert(K % BLOCK_K == 0, "fragment packing needs K % 64 == 0; this kernel, K % BLOCK_K == 0")
  tl.static_assert(GROUP_SIZE == K or GROUP_SIZE % BLOCK_K == 0, "BLOCK_K must divide GROUP_SIZE")
  K_SPLIT: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
  KW: tl.constexpr = K // 8

  pid = tl.program_id(0)
  pid_k = tl.program_id(1)
  num_pid_m = tl.cdiv(M, BLOCK_M)
  pid_m = pid % num_pid_m  # the row blocks of one weight tile are adjacent: they share it in L2
  pid_n = pid // num_pid_m
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  mask_m = offs_m < M
  mask_n = offs_n < N
  x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * K  # x^T [BLOCK_K, BLOCK_M]
  w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * KW
  offs_w = tl.arange(0, BLOCK_K // 8)
  offs_k = tl.arange(0, BLOCK_K)
  if HAS_ZP:
    zshift = (offs_n % 8) * 4
  acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
  k_begin = pid_k * K_SPLIT
  for k0 in range(k_begin, tl.minimum(k_begin + K_SPLIT, K), BLOCK_K):  # a split may start past K: no steps
    words = tl.load(w_rows + (k0 // 8 + offs_w)[None, :], mask=mask_n[:, None], other=0)
    w = _dequant_tile(words, BLOCK_N, BLOCK_K, DTYPE)
    xt = tl.load(x_cols + (k0 + offs_k)[:, None], mask=mask_m[None, :], other=0.0)
    part = tl.dot(w, xt)  # [BLOCK_N, BLOCK_M]
    xsum = tl.reshape(tl.sum(xt.to(tl.float32), axis=0), (1, BLOCK_M))
    g = k0 // GROUP_SIZE
    s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_ZP:
      zw = tl.load(qzeros_ptr + g * (N // 8) + offs_n // 8, mask=mask_n, other=0)
      z = (B + ((zw >> zshift) & 0xF).to(tl.float32))[:, None]
    else:
      z = tl.full((BLOCK_N, 1), B + ZP_BIAS, dtype=tl.float32)
    acc += (part - z * xsum) * s

  acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
  mask = mask_m[:, None] & mask_n[None, :]
  offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
  store_tile(acc, out_ptr + offs, partial_ptr + offs, mask, M, N, lock_ptr, pid, pid_k, SPLIT_K, 1)
