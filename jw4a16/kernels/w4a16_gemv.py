"""Decode-shaped W4A16: out[M, N] = x[M, K] @ ((q - z) * s) for M of 1 or 2, fp32 FMAs on CUDA cores / VALUs.

At one row of x the work is streaming weight bytes, and what limits a kernel is how many instructions it spends
per weight (docs/performance.md: the tensor-core kernel spends about 7 in its loop, and is issue-bound).  This
one spends about 4.5 (sm_90 SASS, loop included): one LOP puts nibble j of a word into the mantissa of an fp32,
after one shift per two nibbles (_pair puts nibble 2i at bits 15..18 and nibble 2i + 1 at bits 19..22):

    float_bits((moved & 0x00078000) | 0x43800000) = 256 + q_2i         (exponent 2^8, q at mantissa bits 15..18)
    float_bits((moved & 0x00780000) | 0x41800000) = 16 + q_2i+1        (exponent 2^4, q at mantissa bits 19..22)

both exact, and one FMA accumulates x * (OFF + q).  The weights never leave "word planes": plane j holds column
8w + j of every packed word w, so nothing is interleaved per weight; the eight plane accumulators are
interleaved once, at the store.  Zero point, the offset and the group scale are applied per K step to the
[K_LANES, BLOCK_N // 8] plane sums (plus one running sum of x):

    sum_k x (q - z) s = s * (sum_k x (OFF + q) - (OFF + z) * sum_k x)   (one group per lane step: BLOCK_K | G)

The offset costs precision that fp32 has to spare: the sum over a step carries OFF = 256 against q < 16, about
5 of fp32's 24 bits, far below the bf16 output's 8.  The loop is software-pipelined in registers: the 8 rows of
the next step are loaded before the current step's arithmetic, so every warp has its next loads in flight while
it computes (on H100, M = 1: 14336x4096 23.0 -> 19.9 us, 8192x57344 125 -> 114 us; docs/performance.md).
With ROWS = 2 a program takes two rows of x: the planes of each word are built once and feed both rows' FMAs,
so the second row costs FMAs only (H100, M = 2: 1.2 - 1.5x faster than one program per row; 255 registers,
no spills).

Same arguments, layout and split-K epilogue as w4a16_gemm_kernel (kernels/w4a16_gemm.py): x, qweight,
scales, qzeros, M, then out [M, N] in x's dtype, the fp32 partials workspace and the arrival counters.
Constexprs: N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS, BLOCK_N, BLOCK_K, SPLIT_K, K_LANES, ROWS
(tuning.KernelConfig.meta; ROWS is its block_m).
"""

import triton
import triton.language as tl

from jw4a16.kernels.splitk import store_tile


@triton.jit
def _pair(words, I: tl.constexpr):
  """Words shifted so that nibble 2I sits at bits 15..18 and nibble 2I + 1 at bits 19..22: one shift."""
  if I < 2:
    return words << (15 - 8 * I)
  else:
    return words >> (8 * I - 15)  # arithmetic shift: the sign bits it drags in are masked off


@triton.jit
def _plane(moved, J: tl.constexpr):
  """OFF_J + q_J as fp32 from _pair's word: one LOP (mask | exponent); OFF_J = 256 (J even) or 16 (J odd)."""
  if J % 2 == 0:
    return ((moved & 0x00078000) | 0x43800000).to(tl.float32, bitcast=True)  # 2^8 (1 + q 2^15 / 2^23)
  else:
    return ((moved & 0x00780000) | 0x41800000).to(tl.float32, bitcast=True)  # 2^4 (1 + q 2^19 / 2^23)


@triton.jit
def _group_params(scale_rows, mask_w, zw, HAS_ZP: tl.constexpr, ZP_BIAS: tl.constexpr):
  """Per plane J: the group scale s_J [K_LANES, BNW] and OFF_J + z_J, the value _plane's OFF_J + q_J is
  corrected by (OFF_J = 256 for even J, 16 for odd)."""
  s0 = tl.load(scale_rows + 0, mask=mask_w, other=0.0).to(tl.float32)
  s1 = tl.load(scale_rows + 1, mask=mask_w, other=0.0).to(tl.float32)
  s2 = tl.load(scale_rows + 2, mask=mask_w, other=0.0).to(tl.float32)
  s3 = tl.load(scale_rows + 3, mask=mask_w, other=0.0).to(tl.float32)
  s4 = tl.load(scale_rows + 4, mask=mask_w, other=0.0).to(tl.float32)
  s5 = tl.load(scale_rows + 5, mask=mask_w, other=0.0).to(tl.float32)
  s6 = tl.load(scale_rows + 6, mask=mask_w, other=0.0).to(tl.float32)
  s7 = tl.load(scale_rows + 7, mask=mask_w, other=0.0).to(tl.float32)
  if HAS_ZP:
    z0, z1 = 256.0 + (zw & 0xF).to(tl.float32), 16.0 + ((zw >> 4) & 0xF).to(tl.float32)
    z2, z3 = 256.0 + ((zw >> 8) & 0xF).to(tl.float32), 16.0 + ((zw >> 12) & 0xF).to(tl.float32)
    z4, z5 = 256.0 + ((zw >> 16) & 0xF).to(tl.float32), 16.0 + ((zw >> 20) & 0xF).to(tl.float32)
    z6, z7 = 256.0 + ((zw >> 24) & 0xF).to(tl.float32), 16.0 + ((zw >> 28) & 0xF).to(tl.float32)
  else:
    z0, z1, z2, z3 = 256.0 + ZP_BIAS, 16.0 + ZP_BIAS, 256.0 + ZP_BIAS, 16.0 + ZP_BIAS
    z4, z5, z6, z7 = 256.0 + ZP_BIAS, 16.0 + ZP_BIAS, 256.0 + ZP_BIAS, 16.0 + ZP_BIAS
  return s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7


@triton.jit
def _correct(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7, xsum,
             s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7):
  """a_J += s_J * (p_J - (OFF_J + z_J) * sum_k x): the group correction of the 8 planes, once per K step."""
  return (a0 + (p0 - z0 * xsum) * s0, a1 + (p1 - z1 * xsum) * s1, a2 + (p2 - z2 * xsum) * s2,
          a3 + (p3 - z3 * xsum) * s3, a4 + (p4 - z4 * xsum) * s4, a5 + (p5 - z5 * xsum) * s5,
          a6 + (p6 - z6 * xsum) * s6, a7 + (p7 - z7 * xsum) * s7)


@triton.jit
def _live(lane_k, R: tl.constexpr, k_stop, K: tl.constexpr, EVEN_K: tl.constexpr):
  """Row R of every lane's block at lane_k [K_LANES, 1], and whether it is before k_stop (this split's end) and K."""
  k = lane_k + R
  if EVEN_K:
    return k, k < k_stop
  else:
    return k, (k < k_stop) & (k < K)


@triton.jit
def _x(x_row, lane_k, R: tl.constexpr, k_stop, K: tl.constexpr, EVEN_K: tl.constexpr):
  """x [K_LANES, 1] of row R of every lane's block in fp32; zeros past the split or K."""
  k, live = _live(lane_k, R, k_stop, K, EVEN_K)
  return tl.load(x_row + k, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _row(w_cols, x_row, mask_w, lane_k, R: tl.constexpr, k_stop, NW: tl.constexpr, K: tl.constexpr,
         EVEN_K: tl.constexpr):
  """Row R of every lane's block: its words [K_LANES, BNW] and x [K_LANES, 1] in fp32; zeros past the split or K."""
  k, live = _live(lane_k, R, k_stop, K, EVEN_K)
  words = tl.load(w_cols + k * NW, mask=mask_w & live, other=0)
  return words, _x(x_row, lane_k, R, k_stop, K, EVEN_K)


@triton.jit
def _step_rows(w_cols, x_row, mask_w, lane_k, k_stop, NW: tl.constexpr, K: tl.constexpr, EVEN_K: tl.constexpr):
  """The 8 rows of a step (lane_k: each lane's first row): their words, then their x."""
  w0, x0 = _row(w_cols, x_row, mask_w, lane_k, 0, k_stop, NW, K, EVEN_K)
  w1, x1 = _row(w_cols, x_row, mask_w, lane_k, 1, k_stop, NW, K, EVEN_K)
  w2, x2 = _row(w_cols, x_row, mask_w, lane_k, 2, k_stop, NW, K, EVEN_K)
  w3, x3 = _row(w_cols, x_row, mask_w, lane_k, 3, k_stop, NW, K, EVEN_K)
  w4, x4 = _row(w_cols, x_row, mask_w, lane_k, 4, k_stop, NW, K, EVEN_K)
  w5, x5 = _row(w_cols, x_row, mask_w, lane_k, 5, k_stop, NW, K, EVEN_K)
  w6, x6 = _row(w_cols, x_row, mask_w, lane_k, 6, k_stop, NW, K, EVEN_K)
  w7, x7 = _row(w_cols, x_row, mask_w, lane_k, 7, k_stop, NW, K, EVEN_K)
  return w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _step_x(x_row, lane_k, k_stop, K: tl.constexpr, EVEN_K: tl.constexpr):
  """The 8 x values of a step for the second row of x."""
  return (_x(x_row, lane_k, 0, k_stop, K, EVEN_K), _x(x_row, lane_k, 1, k_stop, K, EVEN_K),
          _x(x_row, lane_k, 2, k_stop, K, EVEN_K), _x(x_row, lane_k, 3, k_stop, K, EVEN_K),
          _x(x_row, lane_k, 4, k_stop, K, EVEN_K), _x(x_row, lane_k, 5, k_stop, K, EVEN_K),
          _x(x_row, lane_k, 6, k_stop, K, EVEN_K), _x(x_row, lane_k, 7, k_stop, K, EVEN_K))


@triton.jit
def _planes(words):
  """OFF_J + q_J of every word for J = 0..7, as fp32: one shift per two nibbles and one LOP per nibble."""
  w01 = _pair(words, 0)
  w23 = _pair(words, 1)
  w45 = _pair(words, 2)
  w67 = _pair(words, 3)
  return (_plane(w01, 0), _plane(w01, 1), _plane(w23, 2), _plane(w23, 3),
          _plane(w45, 4), _plane(w45, 5), _plane(w67, 6), _plane(w67, 7))


@triton.jit
def _first_row(words, xa, xb, ROWS: tl.constexpr):
  """The plane products x * (OFF_J + q_J) of a step's first row: p_J for row a of x, r_J for row b (ROWS = 2;
  with ROWS = 1, r_J repeats p_J, unused)."""
  q0, q1, q2, q3, q4, q5, q6, q7 = _planes(words)
  p0, p1, p2, p3, p4, p5, p6, p7 = xa * q0, xa * q1, xa * q2, xa * q3, xa * q4, xa * q5, xa * q6, xa * q7
  if ROWS == 2:
    r0, r1, r2, r3, r4, r5, r6, r7 = xb * q0, xb * q1, xb * q2, xb * q3, xb * q4, xb * q5, xb * q6, xb * q7
  else:
    r0, r1, r2, r3, r4, r5, r6, r7 = p0, p1, p2, p3, p4, p5, p6, p7
  return p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _next_row(p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, words, xa, xb, ROWS: tl.constexpr):
  """p_J += x_a * (OFF_J + q_J) (and r_J += x_b * ... for ROWS = 2): the planes built once, one FMA per weight
  and row of x."""
  q0, q1, q2, q3, q4, q5, q6, q7 = _planes(words)
  p0, p1, p2, p3 = p0 + xa * q0, p1 + xa * q1, p2 + xa * q2, p3 + xa * q3
  p4, p5, p6, p7 = p4 + xa * q4, p5 + xa * q5, p6 + xa * q6, p7 + xa * q7
  if ROWS == 2:
    r0, r1, r2, r3 = r0 + xb * q0, r1 + xb * q1, r2 + xb * q2, r3 + xb * q3
    r4, r5, r6, r7 = r4 + xb * q4, r5 + xb * q5, r6 + xb * q6, r7 + xb * q7
  return p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _interleave(a0, a1, a2, a3, a4, a5, a6, a7, BLOCK_N: tl.constexpr):
  """Sum the lanes of the 8 plane accumulators, then interleave the planes: [BLOCK_N], column 8w + J
  (column 8w + 4 i2 + 2 i1 + i0, as w4a16_gemm._unpack_rows builds it)."""
  even = tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a4, axis=0)), tl.join(tl.sum(a2, axis=0), tl.sum(a6, axis=0)))
  odd = tl.join(tl.join(tl.sum(a1, axis=0), tl.sum(a5, axis=0)), tl.join(tl.sum(a3, axis=0), tl.sum(a7, axis=0)))
  return tl.reshape(tl.join(even, odd), (BLOCK_N,))


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    qzeros_ptr,
    M,
    lock_ptr,
    out_ptr,
    partial_ptr,
    N: tl.constexpr,
    K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_LANES: tl.constexpr,
    ROWS: tl.constexpr,
):
  """ROWS (1 or 2) rows of x per program (grid: cdiv(M, ROWS) * cdiv(N, BLOCK_N) programs, SPLIT_K).

  The program's K range is cut into K_LANES interleaved lanes (tile dim 0: with BLOCK_N // 8 words per warp,
  one warp per lane), each lane BLOCK_K = 8 rows per step, so K_LANES warps stream one weight tile together
  and are reduced once, at the end.  The 8 rows of a step are carried through the loop as 8 tensors (the
  register pipeline): each row's words are one load per thread and the sum over K is a per-thread chain of FMAs.
  With ROWS = 2 the weights are unpacked once for both rows of x (the integer work, the busier pipe) and only
  the FMAs double; an odd M's last program computes its missing row as a copy of the one before, unstored.
  """
  tl.static_assert(BLOCK_K == 8, "the register pipeline carries 8 rows a step (tuning.KernelConfig checks it)")
  tl.static_assert(GROUP_SIZE == K or GROUP_SIZE % BLOCK_K == 0, "BLOCK_K must divide GROUP_SIZE")
  tl.static_assert(ROWS == 1 or ROWS == 2, "one or two rows of x per program")
  NW: tl.constexpr = N // 8
  BNW: tl.constexpr = BLOCK_N // 8
  STEP: tl.constexpr = BLOCK_K * K_LANES  # rows per step of the whole program
  K_SPLIT: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT_K), STEP) * STEP
  EVEN_K: tl.constexpr = K % STEP == 0 and K_SPLIT * SPLIT_K == K

  pid = tl.program_id(0)
  pid_k = tl.program_id(1)
  row_groups = (M + ROWS - 1) // ROWS
  row = (pid % row_groups) * ROWS  # the programs of one weight tile (all of x) are adjacent: they share it in L2
  pid_n = pid // row_groups

  offs_w = pid_n * BNW + tl.arange(0, BNW)  # packed word columns of this tile
  mask_w = (offs_w < NW)[None, :]
  lanes = tl.arange(0, K_LANES)[:, None]
  x_row = x_ptr + row.to(tl.int64) * K
  w_cols = qweight_ptr + offs_w[None, :]
  scale_cols = scales_ptr + offs_w[None, :] * 8  # + g * N + J: column 8w + J

  # Eight plane accumulators per row of x, written out: loop-carried values must be tensors, not lists.
  acc0 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc1 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc2 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc3 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc4 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc5 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc6 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  acc7 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  k_begin = pid_k * K_SPLIT
  k_stop = k_begin + K_SPLIT
  # The register pipeline: step i + 1's rows (n*, y*) are loaded before step i's arithmetic on (c*, x*).
  lane0 = lanes * BLOCK_K
  n0, n1, n2, n3, n4, n5, n6, n7, y0, y1, y2, y3, y4, y5, y6, y7 = _step_rows(
      w_cols, x_row, mask_w, lane0 + k_begin, k_stop, NW, K, EVEN_K)
  if ROWS == 2:
    x_row_b = x_ptr + tl.minimum(row + 1, M - 1).to(tl.int64) * K
    yb0, yb1, yb2, yb3, yb4, yb5, yb6, yb7 = _step_x(x_row_b, lane0 + k_begin, k_stop, K, EVEN_K)
    accb0 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb1 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb2 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb3 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb4 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb5 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb6 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
    accb7 = tl.zeros((K_LANES, BNW), dtype=tl.float32)
  for k0 in range(k_begin, k_stop, STEP):
    lane_k = k0 + lane0  # [K_LANES, 1] first row of each lane's block
    c0, c1, c2, c3, c4, c5, c6, c7 = n0, n1, n2, n3, n4, n5, n6, n7
    x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
    n0, n1, n2, n3, n4, n5, n6, n7, y0, y1, y2, y3, y4, y5, y6, y7 = _step_rows(
        w_cols, x_row, mask_w, lane_k + STEP, k_stop, NW, K, EVEN_K)
    xsum = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
    if ROWS == 2:
      xb0, xb1, xb2, xb3, xb4, xb5, xb6, xb7 = yb0, yb1, yb2, yb3, yb4, yb5, yb6, yb7
      yb0, yb1, yb2, yb3, yb4, yb5, yb6, yb7 = _step_x(x_row_b, lane_k + STEP, k_stop, K, EVEN_K)
      xsumb = xb0 + xb1 + xb2 + xb3 + xb4 + xb5 + xb6 + xb7
    else:
      xb0, xb1, xb2, xb3, xb4, xb5, xb6, xb7 = x0, x1, x2, x3, x4, x5, x6, x7  # unused
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _first_row(c0, x0, xb0, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c1, x1, xb1, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c2, x2, xb2, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c3, x3, xb3, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c4, x4, xb4, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c5, x5, xb5, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c6, x6, xb6, ROWS)
    p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7 = _next_row(
        p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7, c7, x7, xb7, ROWS)
    g = tl.minimum(lane_k, K - 1) // GROUP_SIZE  # [K_LANES, 1]; clamped: a lane may start past K
    scale_rows = scale_cols + g * N
    if HAS_ZP:
      zw = tl.load(qzeros_ptr + g * NW + offs_w[None, :], mask=mask_w, other=0)
    else:
      zw = 0
    s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7 = _group_params(
        scale_rows, mask_w, zw, HAS_ZP, ZP_BIAS)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _correct(
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, p0, p1, p2, p3, p4, p5, p6, p7, xsum,
        s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7)
    if ROWS == 2:
      accb0, accb1, accb2, accb3, accb4, accb5, accb6, accb7 = _correct(
          accb0, accb1, accb2, accb3, accb4, accb5, accb6, accb7, r0, r1, r2, r3, r4, r5, r6, r7, xsumb,
          s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7)

  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  acc = _interleave(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, BLOCK_N)
  if ROWS == 1:
    offs = row.to(tl.int64) * N + offs_n
    store_tile(acc, out_ptr + offs, partial_ptr + offs, offs_n < N, M, N, lock_ptr, pid, pid_k, SPLIT_K, 8)
  else:
    accb = _interleave(accb0, accb1, accb2, accb3, accb4, accb5, accb6, accb7, BLOCK_N)
    rows = row + tl.arange(0, 2)
    tile = tl.permute(tl.join(acc, accb), (1, 0))  # [2, BLOCK_N]
    offs = rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = (rows[:, None] < M) & (offs_n < N)[None, :]
    store_tile(tile, out_ptr + offs, partial_ptr + offs, mask, M, N, lock_ptr, pid, pid_k, SPLIT_K, 4)
