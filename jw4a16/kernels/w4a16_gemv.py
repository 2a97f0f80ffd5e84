"""Decode-shaped W4A16: out[M, N] = x[M, K] @ ((q - z) * s) for M of 1 or 2, fp32 FMAs on CUDA cores / VALUs.

At one row of x the work is streaming weight bytes, and what limits a kernel is how many instructions it spends
per weight (docs/performance.md: the tensor-core kernel spends about 7 in its loop, and is issue-bound).  This
one spends about 4 (sm_90 SASS): a shift and one LOP put nibble j of a word into the mantissa of an fp32 16.0,

    float_bits(((word << (19 - 4j)) & 0x00780000) | 0x41800000) = 16 + q_j      (exact: q_j < 16 sets bits 19..22)

and one FMA accumulates x * (16 + q).  The weights never leave "word planes": plane j holds column 8w + j of
every packed word w, so nothing is interleaved per weight; the eight plane accumulators are interleaved once,
at the store.  Zero point, the +16 and the group scale are applied per K step to the [K_LANES, BLOCK_N // 8]
plane sums (plus one running sum of x):

    sum_k x (q - z) s = s * (sum_k x (16 + q) - (16 + z) * sum_k x)        (one group per lane step: BLOCK_K | G)

Same arguments, layout and split-K epilogue as w4a16_gemm_kernel (kernels/w4a16_gemm.py): x, qweight,
scales, qzeros, M, then out [M, N] in x's dtype, the fp32 partials workspace and the arrival counters.
Constexprs: N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS, BLOCK_N, BLOCK_K, SPLIT_K, K_LANES (tuning.KernelConfig.meta).
"""

import triton
import triton.language as tl

from jw4a16.kernels.splitk import store_tile


@triton.jit
def _plane(words, J: tl.constexpr):
  """16 + (nibble J of each word) as fp32: a shift and one LOP (mask | exponent)."""
  if J < 5:
    moved = words << (19 - 4 * J)
  else:
    moved = words >> (4 * J - 19)  # arithmetic shift: the sign bits it drags in are masked off
  return ((moved & 0x00780000) | 0x41800000).to(tl.float32, bitcast=True)


@triton.jit
def _fma_plane(p, xr, words, J: tl.constexpr):
  """p[L, BNW] += x[k_l] * (16 + q_J[k_l, w]) for one row per K lane: one FMA per weight."""
  return p + xr * _plane(words, J)


@triton.jit
def _correct(acc, p, xsum, scale_rows, mask_w, zw, J: tl.constexpr, HAS_ZP: tl.constexpr, ZP_BIAS: tl.constexpr):
  """acc += s_J * (p - (16 + z_J) * sum_k x): plane J's group correction, once per K step and lane."""
  s = tl.load(scale_rows + J, mask=mask_w, other=0.0).to(tl.float32)
  if HAS_ZP:
    z = 16.0 + ((zw >> (4 * J)) & 0xF).to(tl.float32)
  else:
    z = 16.0 + ZP_BIAS
  return acc + (p - z * xsum) * s


@triton.jit
def w4a16_gemv_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_LANES: tl.constexpr,
):
  """One row of x per program (grid: M * cdiv(N, BLOCK_N) programs, SPLIT_K).

  The program's K range is cut into K_LANES interleaved lanes (tile dim 0: with BLOCK_N // 8 words per warp,
  one warp per lane), each lane BLOCK_K rows per step, so K_LANES warps stream one weight tile together and
  are reduced once, at the end.  Rows inside a lane step are unrolled: each row's words are one load per
  thread and the sum over K is a per-thread chain of FMAs, with every row's load in flight together.
  """
  tl.static_assert(GROUP_SIZE == K or GROUP_SIZE % BLOCK_K == 0, "BLOCK_K must divide GROUP_SIZE")
  NW: tl.constexpr = N // 8
  BNW: tl.constexpr = BLOCK_N // 8
  STEP: tl.constexpr = BLOCK_K * K_LANES  # rows per step of the whole program
  K_SPLIT: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT_K), STEP) * STEP
  EVEN_K: tl.constexpr = K % STEP == 0 and K_SPLIT * SPLIT_K == K

  pid = tl.program_id(0)
  pid_k = tl.program_id(1)
  row = pid % M  # the programs of one weight tile (every row of x) are adjacent: they share it in L2
  pid_n = pid // M

  offs_w = pid_n * BNW + tl.arange(0, BNW)  # packed word columns of this tile
  mask_w = (offs_w < NW)[None, :]
  lanes = tl.arange(0, K_LANES)[:, None]
  x_row = x_ptr + row.to(tl.int64) * K
  w_cols = qweight_ptr + offs_w[None, :]
  scale_cols = scales_ptr + offs_w[None, :] * 8  # + g * N + J: column 8w + J

  # Eight plane accumulators written out: loop-carried values must be tensors, not Python lists of them.
  acc0 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc1 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc2 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc3 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc4 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc5 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc6 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc7 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  k_begin = pid_k * K_SPLIT
  for k0 in range(k_begin, k_begin + K_SPLIT, STEP):
    lane_k = k0 + lanes * BLOCK_K  # [K_LANES, 1] first row of each lane's block
    p0 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p1 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p2 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p3 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p4 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p5 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p6 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    p7 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    xsum = tl.zeros((K_LANES, 1), dtype=tl.float32)
    for r in tl.static_range(BLOCK_K):
      k = lane_k + r
      if EVEN_K:
        words = tl.load(w_cols + k * NW, mask=mask_w, other=0)
        xr = tl.load(x_row + k).to(tl.float32)
      else:
        words = tl.load(w_cols + k * NW, mask=mask_w & (k < K), other=0)
        xr = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
      xsum += xr
      p0 = _fma_plane(p0, xr, words, 0)
      p1 = _fma_plane(p1, xr, words, 1)
      p2 = _fma_plane(p2, xr, words, 2)
      p3 = _fma_plane(p3, xr, words, 3)
      p4 = _fma_plane(p4, xr, words, 4)
      p5 = _fma_plane(p5, xr, words, 5)
      p6 = _fma_plane(p6, xr, words, 6)
      p7 = _fma_plane(p7, xr, words, 7)
    g = tl.minimum(lane_k, K - 1) // GROUP_SIZE  # [K_LANES, 1]; clamped: a lane may start past K
    scale_rows = scale_cols + g * N
    if HAS_ZP:
      zw = tl.load(qzeros_ptr + g * NW + offs_w[None, :], mask=mask_w, other=0)
    else:
      zw = 0
    acc0 = _correct(acc0, p0, xsum, scale_rows, mask_w, zw, 0, HAS_ZP, ZP_BIAS)
    acc1 = _correct(acc1, p1, xsum, scale_rows, mask_w, zw, 1, HAS_ZP, ZP_BIAS)
    acc2 = _correct(acc2, p2, xsum, scale_rows, mask_w, zw, 2, HAS_ZP, ZP_BIAS)
    acc3 = _correct(acc3, p3, xsum, scale_rows, mask_w, zw, 3, HAS_ZP, ZP_BIAS)
    acc4 = _correct(acc4, p4, xsum, scale_rows, mask_w, zw, 4, HAS_ZP, ZP_BIAS)
    acc5 = _correct(acc5, p5, xsum, scale_rows, mask_w, zw, 5, HAS_ZP, ZP_BIAS)
    acc6 = _correct(acc6, p6, xsum, scale_rows, mask_w, zw, 6, HAS_ZP, ZP_BIAS)
    acc7 = _correct(acc7, p7, xsum, scale_rows, mask_w, zw, 7, HAS_ZP, ZP_BIAS)

  # Sum the lanes (once), then interleave the planes: column 8w + 4 i2 + 2 i1 + i0 (w4a16_gemm._unpack_rows).
  even = tl.join(tl.join(tl.sum(acc0, axis=0), tl.sum(acc4, axis=0)),
                 tl.join(tl.sum(acc2, axis=0), tl.sum(acc6, axis=0)))
  odd = tl.join(tl.join(tl.sum(acc1, axis=0), tl.sum(acc5, axis=0)),
                tl.join(tl.sum(acc3, axis=0), tl.sum(acc7, axis=0)))
  acc = tl.reshape(tl.join(even, odd), (BLOCK_N,))
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs = row.to(tl.int64) * N + offs_n
  store_tile(acc, out_ptr + offs, partial_ptr + offs, offs_n < N, M, N, lock_ptr, pid, pid_k, SPLIT_K, 8)
