"""Fused W4A16 GEMM: out[M, N] = x[M, K] @ ((q[K, N] - z[g(k), N]) * s[g(k), N]), fp32 accumulation.

The dequantization is factored per group instead of applied per weight: within group g,

    sum_k x[m, k] (q[k, n] - z[g, n]) s[g, n] = s[g, n] * (sum_k x[m, k] (B + q[k, n]) - (B + z[g, n]) sum_k x[m, k])

where B + q is what ORing the nibble into the mantissa of the float B gives for free (B = 128 for bf16, 1024 for
fp16: exact, as q < 16 only sets low mantissa bits; the FasterTransformer / Marlin trick).  So the inner loop turns
each weight word into MMA operands with a shift and a LOP per nibble, and the scale, the zero point and the magic
offset are applied per K step to the [BLOCK_M, BLOCK_N] fp32 product (plus one row sum of x), a cost that shrinks
with BLOCK_K / BLOCK_M.
No int-to-float converts, no per-weight float arithmetic.

One kernel serves every M: tl.dot on tensor cores for BLOCK_M >= 16 and a GEMV body for BLOCK_M == 1 (fp32
FMAs); each optionally split along K
(SPLIT_K > 1) so small-M problems still put every SM to work streaming weights.  Split-K partials are summed in
the same launch by the last program of each tile to finish (kernels/splitk.py).

SWAP_AB (tensor-core tiles only) computes the transposed tile out^T = W^T x^T: the dequantized weights become
the dot's first operand, which Hopper's wgmma reads from registers (they still pass through one shared-memory
layout conversion, as in the unswapped tile), x^T is read by the wgmma straight from its pipelined shared-memory
buffer, and BLOCK_M becomes the instruction's N (8 and up), so a small M no longer needs mma.sync or a 64-row
wgmma.  On H100 it is the faster tile from M = 2 to 32 (docs/performance.md, session 6).

Argument order follows jax-triton: the input arrays, the scalar M, the split-K counters (an input: the kernel
leaves them as it found them, zero), then the outputs.  Every shape except M is a constexpr, because jax-triton
gives integer scalars no divisibility specialization (see shared/NOTES.md).

Layout (GPTQ sequential, packed along N):
  x       [M, K]        fp16 | bf16, row-major
  qweight [K, N // 8]   int32; word (k, j) holds columns 8j .. 8j+7, column 8j+i in bits 4i .. 4i+3
  scales  [K // G, N]   x's dtype
  qzeros  [K // G, N // 8] int32 packed like qweight (read only when HAS_ZP)
  locks    [programs along grid axis 0] int32 arrival counters, zero at the launch and reset to zero by it
  out      [M, N]        x's dtype
  partials [SPLIT_K, M, N] float32 workspace (locks and partials are read only when SPLIT_K > 1; partials has one
           element otherwise)
"""

import triton
import triton.language as tl

from jw4a16.kernels.splitk import store_tile


@triton.jit
def _unpack_rows(words, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
  """[R, BLOCK_N // 8] int32 words -> [R, BLOCK_N] int32 nibbles, column 8j+i from bits 4i of word j.

  UNPACK 0: broadcast the words against 8 shifts and merge the last two dims (may cost a layout conversion).
  UNPACK 1: interleave the 8 nibble planes with a tree of tl.join, whose new dim lives in each thread's
  registers, so the final reshape is free.  join(a, b) puts a at index 0 of a new minor dim, and three levels
  (over bits 2, 1, 0 of i) flatten to 8j + 4*i2 + 2*i1 + i0 = 8j + i.
  """
  if UNPACK == 0:
    shifts = tl.arange(0, 8) * 4
    nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(nib, (words.shape[0], BLOCK_N))
  else:
    q0 = words & 0xF
    q1 = (words >> 4) & 0xF
    q2 = (words >> 8) & 0xF
    q3 = (words >> 12) & 0xF
    q4 = (words >> 16) & 0xF
    q5 = (words >> 20) & 0xF
    q6 = (words >> 24) & 0xF
    q7 = (words >> 28) & 0xF
    b0 = tl.join(tl.join(q0, q4), tl.join(q2, q6))
    b1 = tl.join(tl.join(q1, q5), tl.join(q3, q7))
    return tl.reshape(tl.join(b0, b1), (words.shape[0], BLOCK_N))


@triton.jit
def _load_nibbles(ptr, rows, mask_rows, n0, N: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
  """Nibbles [R, BLOCK_N] int32 (values 0..15) of packed rows `rows` [R], columns n0 .. n0 + BLOCK_N."""
  NW: tl.constexpr = N // 8
  offs_w = n0 // 8 + tl.arange(0, BLOCK_N // 8)
  words = tl.load(ptr + rows[:, None] * NW + offs_w[None, :], mask=mask_rows[:, None] & (offs_w < NW)[None, :],
                  other=0)
  return _unpack_rows(words, BLOCK_N, UNPACK)


@triton.jit
def _magic(q, DTYPE: tl.constexpr):
  """Nibbles (int32, < 16) -> DTYPE values B + q, B = 128 (bf16, 0x4300) or 1024 (fp16, 0x6400): one LOP."""
  if DTYPE == tl.bfloat16:
    return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
  else:
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def w4a16_gemm_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UNPACK: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
  DTYPE: tl.constexpr = x_ptr.dtype.element_ty
  B: tl.constexpr = 128.0 if DTYPE == tl.bfloat16 else 1024.0  # see _magic
  tl.static_assert(GROUP_SIZE == K or GROUP_SIZE % BLOCK_K == 0, "BLOCK_K must divide GROUP_SIZE")
  # K range of one split, a multiple of BLOCK_K, so only the last split can run past K.
  K_SPLIT: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
  EVEN_K: tl.constexpr = K % BLOCK_K == 0 and K_SPLIT * SPLIT_K == K

  # Grouped program order: GROUP_M row-blocks share each weight column-block while it is in L2.
  pid = tl.program_id(0)
  pid_k = tl.program_id(1)
  num_pid_m = tl.cdiv(M, BLOCK_M)
  num_pid_n: tl.constexpr = triton.cdiv(N, BLOCK_N)
  pids_in_group = GROUP_M * num_pid_n
  first_m = (pid // pids_in_group) * GROUP_M
  group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
  pid_m = first_m + (pid % pids_in_group) % group_rows
  pid_n = (pid % pids_in_group) // group_rows

  n0 = pid_n * BLOCK_N
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_n = n0 + tl.arange(0, BLOCK_N)
  offs_k = tl.arange(0, BLOCK_K)
  mask_m = offs_m < M
  mask_n = offs_n < N
  # int64 rows: M * K and M * N may pass 2**31.
  x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K

  zoff: tl.constexpr = 0.0 if BLOCK_M == 1 else B  # the GEMV body subtracts B per weight itself
  if HAS_ZP:
    zero_row = tl.zeros((1, BLOCK_N), dtype=tl.float32)
  else:
    zero_row = tl.full((1, BLOCK_N), zoff + ZP_BIAS, dtype=tl.float32)
  if SWAP_AB:
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
  else:
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  k_begin = pid_k * K_SPLIT
  # One flat loop, so Triton's software pipeliner overlaps the loads of step i+1 with step i.  Each step lies
  # inside one group and applies its own correction: acc += (x @ (B + q) - (B + z) * rowsum(x)) * s.
  for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
    kk = k0 + offs_k
    if EVEN_K:
      x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None], other=0.0)
      w = _magic(_load_nibbles(qweight_ptr, kk, offs_k >= 0, n0, N, BLOCK_N, UNPACK), DTYPE)
    else:
      mask_k = kk < K
      x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
      w = _magic(_load_nibbles(qweight_ptr, kk, mask_k, n0, N, BLOCK_N, UNPACK), DTYPE)
    g = tl.minimum(k0, K - 1) // GROUP_SIZE  # clamped: the last split may start past K
    s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_ZP:
      z = zoff + _load_nibbles(qzeros_ptr, g + tl.arange(0, 1), tl.arange(0, 1) == 0, n0, N, BLOCK_N,
                               UNPACK).to(tl.float32)
    else:
      z = zero_row
    if BLOCK_M == 1:
      xt = tl.reshape(x.to(tl.float32), (BLOCK_K, 1))
      part = tl.sum(xt * (w.to(tl.float32) - B), axis=0, keep_dims=True)  # x @ q: exact small integers q
      xsum = tl.sum(xt, axis=0, keep_dims=True)
    elif SWAP_AB:
      part = tl.dot(tl.trans(w), tl.trans(x))  # out^T [BLOCK_N, BLOCK_M]: see the module docstring
      xsum = tl.reshape(tl.sum(x.to(tl.float32), axis=1), (1, BLOCK_M))
    else:
      part = tl.dot(x, w)
      xsum = tl.sum(x.to(tl.float32), axis=1, keep_dims=True)
    if SWAP_AB:
      acc += (part - tl.trans(z) * xsum) * tl.trans(s)
    else:
      acc += (part - z * xsum) * s

  if SWAP_AB:
    acc = tl.trans(acc)
  mask = mask_m[:, None] & mask_n[None, :]
  offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
  store_tile(acc, out_ptr + offs, partial_ptr + offs, mask, M, N, lock_ptr, pid, pid_k, SPLIT_K, 1)
