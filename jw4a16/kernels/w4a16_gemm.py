"""Fused W4A16 GEMM: out[M, N] = x[M, K] @ ((q[K, N] - z[g(k), N]) * s[g(k), N]), fp32 accumulation.

One kernel serves every M: a tiled GEMM on tensor cores (tl.dot) for BLOCK_M >= 16 and a GEMV (fp32 FMAs, no
tensor cores) for BLOCK_M == 1, each optionally split along K (SPLIT_K > 1) so that small-M problems still put
every SM to work streaming weights.  Split-K writes fp32 partials [SPLIT_K, M, N] that the caller sums (one XLA
reduce fusion): no atomics, which are slow on AMD and would need a zeroed buffer.

Argument order follows jax-triton: the input arrays, then the scalar M, then the output.  Every shape except M
is a constexpr, because jax-triton gives integer scalars no divisibility specialization (see shared/NOTES.md).

Layout (GPTQ sequential, packed along N):
  x       [M, K]        fp16 | bf16, row-major
  qweight [K, N // 8]   int32; word (k, j) holds columns 8j .. 8j+7, column 8j+i in bits 4i .. 4i+3
  scales  [K // G, N]   x's dtype
  qzeros  [K // G, N // 8] int32 packed like qweight (read only when HAS_ZP)
  out     [M, N] x's dtype when SPLIT_K == 1, else [SPLIT_K, M, N] float32 partial sums
"""

import triton
import triton.language as tl


@triton.jit
def _magic_float(q):
  """4-bit ints (int32 tensor, values < 16) -> float32 tensor equal to 2**23 + q, by ORing q into the mantissa.

  0x4B000000 is float32 2**23; with q < 16 the OR sets the low mantissa bits, so the pattern reads exactly
  2**23 + q.  One LOP and a free bitcast replace an int-to-float convert, whose throughput (16/clk/SM on Hopper)
  would bound the GEMV.  The trick is FasterTransformer's and Marlin's (they use fp16/bf16 magic numbers); the
  float32 one keeps the arithmetic exact for both activation dtypes and runs in Triton's interpreter, which
  does no bf16 arithmetic.
  """
  return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _unpack_rows(words, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
  """[R, BLOCK_N // 8] int32 words -> [R, BLOCK_N] int32 nibbles, column 8j+i from bits 4i of word j.

  UNPACK 0: broadcast the words against 8 shifts and merge the last two dims (may cost a layout conversion).
  UNPACK 1: interleave the 8 nibble planes with a tree of tl.join, whose new dim lives in each thread's
  registers, so the final reshape is free.  Column order: join(a, b) puts a at index 0 of a new minor dim,
  and three levels (over bits 2, 1, 0 of i) flatten to 8j + 4*i2 + 2*i1 + i0 = 8j + i.
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
  """Nibbles [R, BLOCK_N] int32 of packed rows `rows` [R], columns n0 .. n0 + BLOCK_N (n0 % BLOCK_N == 0).

  UNPACK 2 loads each word once per column it holds (the 8 equal addresses of a word merge into one request)
  and shifts per column: no reshape at all.  UNPACK 0 and 1 load each word once and unpack in registers.
  """
  NW: tl.constexpr = N // 8
  if UNPACK == 2:
    offs_n = n0 + tl.arange(0, BLOCK_N)
    words = tl.load(ptr + rows[:, None] * NW + (offs_n // 8)[None, :],
                    mask=mask_rows[:, None] & (offs_n < N)[None, :], other=0)
    return (words >> ((offs_n % 8) * 4)[None, :]) & 0xF
  else:
    offs_w = n0 // 8 + tl.arange(0, BLOCK_N // 8)
    words = tl.load(ptr + rows[:, None] * NW + offs_w[None, :], mask=mask_rows[:, None] & (offs_w < NW)[None, :],
                    other=0)
    return _unpack_rows(words, BLOCK_N, UNPACK)


@triton.jit
def w4a16_gemm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    qzeros_ptr,
    M,
    out_ptr,
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
):
  DTYPE: tl.constexpr = x_ptr.dtype.element_ty
  MAGIC: tl.constexpr = 8388608.0  # 2**23, see _magic_float
  # K range of one split: a multiple of BLOCK_K, so only the last split can run past K.
  K_SPLIT: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
  EVEN_K: tl.constexpr = K % BLOCK_K == 0 and K_SPLIT * SPLIT_K == K
  # One group row per K step when a step never straddles groups.
  ROW_SCALES: tl.constexpr = GROUP_SIZE % BLOCK_K == 0

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

  if BLOCK_M == 1:
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
  else:
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

  k_begin = pid_k * K_SPLIT
  for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
    kk = k0 + offs_k
    mask_k = kk < K
    if EVEN_K:
      x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None], other=0.0)
      w = _magic_float(_load_nibbles(qweight_ptr, kk, offs_k >= 0, n0, N, BLOCK_N, UNPACK))  # 2**23 + q
    else:
      x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
      w = _magic_float(_load_nibbles(qweight_ptr, kk, mask_k, n0, N, BLOCK_N, UNPACK))

    if ROW_SCALES:
      g = tl.minimum(k0, K - 1) // GROUP_SIZE  # clamped: the last split may start past K
      s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
      if HAS_ZP:
        z = _magic_float(_load_nibbles(qzeros_ptr, g + tl.arange(0, 1), tl.arange(0, 1) == 0, n0, N, BLOCK_N,
                                       UNPACK))
      else:
        z = MAGIC + ZP_BIAS
    else:
      g = tl.minimum(kk, K - 1) // GROUP_SIZE
      s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
      if HAS_ZP:
        z = _magic_float(_load_nibbles(qzeros_ptr, g, offs_k >= 0, n0, N, BLOCK_N, UNPACK))
      else:
        z = MAGIC + ZP_BIAS
    # (2**23 + q) - (2**23 + z) = q - z exactly; times s is exact in float32; the cast rounds once, as the
    # reference's dequantization does.
    w = ((w - z) * s).to(DTYPE, fp_downcast_rounding="rtne")

    if BLOCK_M == 1:
      acc += tl.sum(tl.reshape(x.to(tl.float32), (BLOCK_K, 1)) * w.to(tl.float32), axis=0)
    else:
      acc = tl.dot(x, w, acc)

  if SPLIT_K == 1:
    out_rows = out_ptr + offs_m.to(tl.int64)[:, None] * N
  else:
    out_rows = out_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N
  out = acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
  if BLOCK_M == 1:
    out = out[None, :]
  tl.store(out_rows + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])
