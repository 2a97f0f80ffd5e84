"""W4A16 from "fragment-packed" weights (layout.to_fragment_packed), the kernel for packing="fragment".

The swapped tile of w4a16_gemm (out^T = W^T x^T: block_n weight columns as the MMA's M, the rows of x as its N)
reading weights repacked along K in the order Hopper's wgmma register operand holds them, so the dequantized
tile needs no layout conversion through shared memory and each bf16x2 (fp16x2) register pair is one shift and
one LOP3:

    ((word >> 4 q) & 0x000F000F) | 0x43004300  ->  the pair (128 + q_lo, 128 + q_hi) as two bf16

(scripts/layout_probe.py shows both effects on a minimal loop.)  On H100 it ran 1.25 - 2.23x faster than the
dispatcher's picks on GPTQ's packing from M = 2 to 256, and at M = 1 from 9 % slower to 20 % faster than the gemv
kernel (docs/performance.md, session 7).  On other targets it is correct (Triton picks their MMA layouts) but not tuned.

Arguments as the other kernels (x, qweight, scales, qzeros, M, locks, out, partials) except qweight:
  qweight [ceil(N / ROW_BLOCK), 8 K] int32 (ROW_BLOCK = jw4a16.checks.FRAGMENT_ROWS), fragment-packed: each
  block of ROW_BLOCK weight columns holds K block b (64 values, 8 words per column) of all its columns in one
  piece, so a tile reads 2 KB runs where a row of words per column read 32-byte pieces K / 2 bytes apart (on
  H100 that was 10 - 35 % slower on the two widest weights at M = 1 and 16; docs/performance.md, session 8).
  qzeros stay in the kernel layout [K // G, N // 8].
Constexprs: N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS, BLOCK_M, BLOCK_N, BLOCK_K (a multiple of 64 dividing K and the
group; for groups of 32, 64: each step's block then holds two groups, pieces 0 - 1 of _pieces the first and 2 - 3
the second, and SCALE_W must be 1 or 2), SPLIT_K, and
  SCALE_W: 1 applies the group's scale and zero to the weight tile in DTYPE before the dot (exact difference,
    one rounding, as the reference), so the accumulator runs through the MMA chain untouched; 2 the same with the
    scales read as int32 pairs (see the K loop); 0 runs the dot on B + q and corrects the fp32 accumulator after
    each K step: acc += (dot - (B + z) * rowsum(x)) * s.
  PTX: 1 on NVIDIA only, the unpacking's AND + OR as one inline-PTX LOP3 (ptxas does not fuse two immediates)
    whose result is the register pair itself (_magic_pairs).

w4a16_frag_norm_kernel is the same kernel (one body, _frag_body) with a Llama layer's RMSNorm and residual add
folded in (NORM, RES, RES_GAMMA: its docstring), for jw4a16.ops.w4a16_matmul's norm and residual arguments.
"""

import triton
import triton.language as tl

from jw4a16.kernels.splitk import store_tile

ROW_BLOCK = tl.constexpr(64)  # weight columns per block of the packing (jw4a16.checks.FRAGMENT_ROWS)


@triton.jit
def _halves(v, DTYPE: tl.constexpr):
  """The low and high 16 bits of int32 v as two DTYPE values, joined along a new minor dim (a register pair)."""
  return tl.join(v.to(tl.int16).to(DTYPE, bitcast=True), (v >> 16).to(tl.int16).to(DTYPE, bitcast=True))


@triton.jit
def _magic_pairs(v, MASK: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr, PTX: tl.constexpr):
  """(v & MASK) | MAGIC as the register pair [..., 2] of DTYPE that its two 16-bit halves are (low half first).
  PTX: one LOP3 (ptxas does not fuse the two immediates by itself) whose 32-bit result is the pair's register as
  it stands.  The portable path splits the word into halves and joins them, which on sm_90 cost 65 byte permutes
  (PRMT) of the 299 instructions of a K step (gate/up's M = 1 pick; docs/performance.md, session 20)."""
  if PTX:
    asm: tl.constexpr = f"lop3.b32 $0, $1, {MASK}, {MAGIC}, 0xea;"
    # pack=2: each call takes two elements of the (word, word) pair and writes both halves of one register.  The
    # result dtype is spelled out per branch: inline_asm_elementwise does not take the constexpr DTYPE itself.
    if DTYPE == tl.bfloat16:
      return tl.inline_asm_elementwise(asm, "=r,r,r", [tl.join(v, v)], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
      return tl.inline_asm_elementwise(asm, "=r,r,r", [tl.join(v, v)], dtype=tl.float16, is_pure=True, pack=2)
  else:
    return _halves((v & MASK) | MAGIC, DTYPE)


@triton.jit
def _pieces(words, DTYPE: tl.constexpr, PTX: tl.constexpr, HI16: tl.constexpr):
  """Fragment-packed words [BN, W] -> four [BN, W, 2] DTYPE tensors, piece q holding nibbles q and q + 4 of each word
  as B + v (B = 128 for bf16, 1024 for fp16), or with HI16 pieces 1 and 3 as B + 16 v (one shift less per word)."""
  MAGIC: tl.constexpr = 0x43004300 if DTYPE == tl.bfloat16 else 0x64006400
  LO: tl.constexpr = 0x000F000F
  HI: tl.constexpr = 0x00F000F0
  w8 = words >> 8
  b0 = _magic_pairs(words, LO, MAGIC, DTYPE, PTX)
  b2 = _magic_pairs(w8, LO, MAGIC, DTYPE, PTX)
  if HI16:
    b1 = _magic_pairs(words, HI, MAGIC, DTYPE, PTX)
    b3 = _magic_pairs(w8, HI, MAGIC, DTYPE, PTX)
  else:
    b1 = _magic_pairs(words >> 4, LO, MAGIC, DTYPE, PTX)
    b3 = _magic_pairs(words >> 12, LO, MAGIC, DTYPE, PTX)
  return b0, b1, b2, b3


@triton.jit
def _k_order(b0, b1, b2, b3, BN: tl.constexpr, BK: tl.constexpr):
  """The four pieces of _pieces -> one [BN, BK] tile, K in natural order."""
  t = tl.join(tl.join(b0, b1), tl.join(b2, b3))  # [BN, BK // 8 (= b, c, h), p, q0, q1]
  t = tl.reshape(t, (BN, BK // 64, 4, 2, 2, 2, 2))  # [n, b, c, h, p, q0, q1]
  return tl.reshape(tl.permute(t, (0, 1, 6, 5, 3, 2, 4)), (BN, BK))  # k = 64 b + 16 q + 8 h + 2 c + p


@triton.jit
def _group_params(scales_ptr, qzeros_ptr, g, n0, offs_n, mask_n, N: tl.constexpr, HAS_ZP: tl.constexpr,
                  DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr):
  """Group g's scales [BLOCK_N] (columns n0 + offs) and, with HAS_ZP, its zero points [BLOCK_N] int32 (else
  zeros).  PAIRS: the scales are read as int32 pairs (N is even): Triton's pipeliner stages a load through shared
  memory (cp.async) only if each thread's piece is at least 32 bits, and one 16-bit scale a thread stayed an
  ld.global in the K loop that the step waited for (docs/performance.md, session 10)."""
  if PAIRS:
    offs_p = n0 // 2 + tl.arange(0, BLOCK_N // 2)
    pairs = tl.load(scales_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + g * (N // 2) + offs_p,
                    mask=offs_p < N // 2, other=0)
    s = tl.reshape(_halves(pairs, DTYPE), (BLOCK_N,))  # columns 2 i and 2 i + 1 from pair i
  else:
    s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
  if HAS_ZP:  # per pair of columns, as the scales: the pair's packed word, its two nibbles joined
    offs_p = n0 // 2 + tl.arange(0, BLOCK_N // 2)
    zw = tl.load(qzeros_ptr + g * (N // 8) + offs_p // 4, mask=offs_p < N // 2, other=0)
    sh = (offs_p % 4) * 8
    zq = tl.reshape(tl.join((zw >> sh) & 0xF, (zw >> (sh + 4)) & 0xF), (BLOCK_N,))
  else:
    zq = tl.zeros_like(offs_n)
  return s, zq


@triton.jit
def _zeros(zq, HAS_ZP: tl.constexpr, ZP_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
  """The group's zero points [BLOCK_N, 1] in fp32: _group_params' zq, or ZP_BIAS without zero points."""
  if HAS_ZP:
    return zq.to(tl.float32)[:, None]
  else:
    return tl.full((BLOCK_N, 1), ZP_BIAS, dtype=tl.float32)


@triton.jit
def _scaled_pieces(b_lo, b_hi, s, zq, B: tl.constexpr, HI16: tl.constexpr, DTYPE: tl.constexpr):
  """Two pieces of _pieces (an even one, b_lo, and the odd one after it, b_hi) dequantized with the scales s and
  zero points zq [BLOCK_N, 1] of their group: (B + q - (B + z)) * s in DTYPE, exact difference, one rounding;
  with HI16 the odd piece holds B + 16 q and the even one is scaled by 16 s (see _group_step)."""
  z_lo = (B + zq).to(DTYPE)[:, :, None]
  z_hi = (B + 16 * zq).to(DTYPE)[:, :, None] if HI16 else z_lo
  s_lo = (16 * s)[:, :, None]
  s_hi = s[:, :, None] if HI16 else s_lo
  return (b_lo - z_lo) * s_lo, (b_hi - z_hi) * s_hi


@triton.jit
def _group_step(acc, words, xt, s, zq, s2, zq2, g, HAS_ZP: tl.constexpr, ZP_BIAS: tl.constexpr,
                B: tl.constexpr, SCALE_W: tl.constexpr, PTX: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr):
  """acc [BLOCK_N, BLOCK_M] += W^T x^T over BK values of K inside group g: words [BLOCK_N, BK // 8] (a step's
  words of each column), xt [BK, BLOCK_M], s and zq the group's _group_params.  s2, zq2: for groups of 32 (BK =
  64, SCALE_W > 0) the second group's, which pieces 2 and 3 hold (K values 32 - 63 of the block); else s, zq."""
  DTYPE: tl.constexpr = xt.dtype
  s = s[:, None]
  zq = _zeros(zq, HAS_ZP, ZP_BIAS, BLOCK_N)
  if SCALE_W:  # w = (B + q - (B + z)) * s in DTYPE (exact difference, one rounding), then a plain accumulating dot
    # fp16: pieces 1, 3 hold B + 16 q (a shift less; bf16 has no room: its bit 7 is the exponent's), scaled by s,
    # the others by 16 s; the accumulator is scaled back after the loop
    HI16: tl.constexpr = DTYPE == tl.float16
    b0, b1, b2, b3 = _pieces(words, DTYPE, PTX, HI16)
    w0, w1 = _scaled_pieces(b0, b1, s, zq, B, HI16, DTYPE)
    w2, w3 = _scaled_pieces(b2, b3, s2[:, None], _zeros(zq2, HAS_ZP, ZP_BIAS, BLOCK_N), B, HI16, DTYPE)
    w = _k_order(w0, w1, w2, w3, BLOCK_N, BK)
    acc = tl.dot(w, xt, acc)
    # Without a use of acc inside the step, Triton 3.6 leaves this dot's wgmmas in flight across the loop's back
    # edge while the next step's dequantization rewrites their register operand w (undefined in PTX; wrong
    # results on H100, docs/performance.md, session 9).  A use makes it wait for them here.
    acc = tl.where(g >= 0, acc, 0.0)
  else:  # the dot on B + q, the group's correction in fp32: acc += (dot - (B + z) * rowsum(x)) * s
    b0, b1, b2, b3 = _pieces(words, DTYPE, PTX, 0)
    part = tl.dot(_k_order(b0, b1, b2, b3, BLOCK_N, BK), xt)  # [BLOCK_N, BLOCK_M]
    xsum = tl.reshape(tl.sum(xt.to(tl.float32), axis=0), (1, xt.shape[1]))
    acc += (part - (B + zq) * xsum) * s.to(tl.float32)
  return acc


@triton.jit
def w4a16_frag_kernel(
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
    SCALE_W: tl.constexpr = 0,
    PTX: tl.constexpr = 0,
):
  _frag_body(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, M, lock_ptr, x_ptr, x_ptr, x_ptr, x_ptr, out_ptr,
             partial_ptr, partial_ptr, out_ptr, N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
             SCALE_W, PTX, 0, 0, 0, 0.0)


@triton.jit
def w4a16_frag_norm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    qzeros_ptr,
    M,
    lock_ptr,
    gamma_ptr,
    ssq_in_ptr,
    res_ptr,
    res_gamma_ptr,
    out_ptr,
    partial_ptr,
    ssq_out_ptr,
    hg_out_ptr,
    N: tl.constexpr,
    K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SCALE_W: tl.constexpr = 0,
    PTX: tl.constexpr = 0,
    NORM: tl.constexpr = 0,
    RES: tl.constexpr = 0,
    RES_GAMMA: tl.constexpr = 0,
    EPS: tl.constexpr = 1e-5,
    PARTIALS: tl.constexpr = 0,
):
  """w4a16_frag_kernel with a Llama layer's norm and residual folded in (jw4a16.ops.w4a16_matmul's norm_weight
  and residual), so the decode step runs no norm kernels between its matmuls:

  NORM = 1: x is the hidden state h [M, K]; the product uses rms_norm(h) = gamma * (h * rstd).to(dtype), rstd =
    rsqrt(sum(ssq_in[m, :]) / K + EPS) from ssq_in [M, K // 64], the fp32 sums of squares of h per 64 columns
    that the matmul which wrote h left (RES below); each K step scales its x tile so.  That costs the K loop a
    pass of the x tile through registers and back to shared memory (the dot reads it there): on H100 +0.7 - 2.2
    us at M = 1 and up to +14 us at M = 16 on the Llama-3-8B shapes (docs/performance.md, session 16).
  NORM = 2: x is h * gamma already (RES_GAMMA's hg); the fp32 product's rows are scaled by rstd before the
    output is rounded, so the K loop is the plain kernel's.
  RES: writes out = (x @ W).to(dtype) + res [M, N] and ssq_out [M, N // 64] of that sum (kernels/splitk.py);
    with RES_GAMMA also hg_out = out * res_gamma [N] (the next NORM = 2 matmul's x).
  PARTIALS = 1: each program writes its fp32 product (after NORM = 2's row scale) to its slot pid_k of partial
    [SPLIT_K, M, N] (any SPLIT_K, 1 included) and stops: no arrival ticket, no sum, out untouched.  The consumer
    sums the slots in order and rounds (reference.sum_partials: bit for bit what the epilogue writes), so the tile's
    last program no longer waits for the others' partials through L2 (a fence, the ticket and the loads: on H100
    1.2 - 1.9 us of an M = 1 launch, docs/performance.md, session 17).  Not with RES.
  Unused pointers may be any array (the constexprs leave them untouched).
  """
  _frag_body(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, M, lock_ptr, gamma_ptr, ssq_in_ptr, res_ptr,
             res_gamma_ptr, out_ptr, partial_ptr, ssq_out_ptr, hg_out_ptr, N, K, GROUP_SIZE, HAS_ZP, ZP_BIAS,
             BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, SCALE_W, PTX, NORM, RES, RES_GAMMA, EPS, PARTIALS)


@triton.jit
def _frag_body(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, M, lock_ptr, gamma_ptr, ssq_in_ptr, res_ptr,
               res_gamma_ptr, out_ptr, partial_ptr, ssq_out_ptr, hg_out_ptr, N: tl.constexpr, K: tl.constexpr,
               GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, ZP_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_W: tl.constexpr,
               PTX: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr, RES_GAMMA: tl.constexpr,
               EPS: tl.constexpr, PARTIALS: tl.constexpr = 0):
  DTYPE: tl.constexpr = x_ptr.dtype.element_ty
  B: tl.constexpr = 128.0 if DTYPE == tl.bfloat16 else 1024.0
  tl.static_assert(BLOCK_K % 64 == 0, "fragment-packed blocks are 64 K values")
  tl.static_assert(K % BLOCK_K == 0, "fragment packing needs K % 64 == 0; this kernel, K % BLOCK_K == 0")
  # groups of 32: two per 64-value block, one step per block, weights scaled before the dot (_group_step)
  HALVES: tl.constexpr = GROUP_SIZE == 32 and K > 32
  tl.static_assert(GROUP_SIZE == K or GROUP_SIZE % BLOCK_K == 0 or (HALVES and BLOCK_K == 64 and SCALE_W > 0),
                   "BLOCK_K must divide GROUP_SIZE (groups of 32: BLOCK_K 64 and SCALE_W 1 or 2)")
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
  # column n's 8-word chunk of K block b: words 8 RB b + 8 (n % RB) + [0, 8) of row n // RB (a last block short of
  # RB columns is zero-padded).  One 64-bit base per tile and int32 offsets inside it (the tile spans BLOCK_N / RB
  # rows of 8 K words): a tensor of 64-bit pointers per column held ~40 more registers on some tiles (sm_90).
  TILE_BLOCKS: tl.constexpr = tl.constexpr(BLOCK_N) // ROW_BLOCK  # constexpr first: the interpreter's BLOCK_N is an int
  tl.static_assert(TILE_BLOCKS * ROW_BLOCK == BLOCK_N, "BLOCK_N must be a multiple of the packing's blocks")
  w_tile = qweight_ptr + (pid_n * TILE_BLOCKS).to(tl.int64) * (ROW_BLOCK * KW)
  cols = tl.arange(0, BLOCK_N)
  offs_w = tl.arange(0, BLOCK_K // 8)
  w_offs = ((cols // ROW_BLOCK) * (ROW_BLOCK * KW) + (cols % ROW_BLOCK) * 8)[:, None] \
      + ((offs_w // 8) * (ROW_BLOCK * 8) + offs_w % 8)[None, :]  # a step's words of each column: 8 per K block
  offs_k = tl.arange(0, BLOCK_K)
  acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
  k_begin = pid_k * K_SPLIT
  # The group's scales and zero points.  SCALE_W = 1: loaded in the step, one 16-bit scale a thread (an ld.global
  # the step waits for); SCALE_W = 2: as int32 pairs, which Triton's pipeliner stages with the words (cp.async).
  # Neither wins everywhere (session 11: 2 ran 0.90 - 1.22x the speed of 1 on the table's picks), so it is tuned.
  # SCALE_W = 0 (the scales feed the fp32 correction, not the dot, so the pipeliner leaves them alone): loaded one
  # step ahead into registers, which measured 0 - 7 % faster on 10 points of session 10's A/B, where the same
  # prefetch made SCALE_W = 1 tiles up to 57 % slower.  Group indices are clamped to K's last group: a split that
  # starts past K, and the last step's prefetch.
  n0 = pid_n * BLOCK_N
  if not SCALE_W:
    s_nxt, zq_nxt = _group_params(scales_ptr, qzeros_ptr, tl.minimum(k_begin, K - 1) // GROUP_SIZE, n0, offs_n,
                                  mask_n, N, HAS_ZP, DTYPE, BLOCK_N, 0)
  if NORM:  # the rows' rstd from the producer's sums of squares per 64 columns
    NS: tl.constexpr = K // 64
    offs_s = tl.arange(0, triton.next_power_of_2(NS))
    ssq = tl.load(ssq_in_ptr + offs_m.to(tl.int64)[None, :] * NS + offs_s[:, None],
                  mask=mask_m[None, :] & (offs_s < NS)[:, None], other=0.0)
    rstd = tl.rsqrt(tl.sum(ssq, axis=0) / K + EPS)[None, :]  # [1, BLOCK_M]
  for k0 in range(k_begin, tl.minimum(k_begin + K_SPLIT, K), BLOCK_K):  # a split may start past K: no steps
    words = tl.load(w_tile + (w_offs + (k0 // 64) * (ROW_BLOCK * 8)), mask=mask_n[:, None], other=0)
    xt = tl.load(x_cols + (k0 + offs_k)[:, None], mask=mask_m[None, :], other=0.0)
    if NORM == 1:  # transformers' order: the scaled row rounded to the dtype, then times the weight
      # as int32 pairs, which the pipeliner stages (one 16-bit value a thread stayed an ld.global in the loop)
      offs_g = k0 // 2 + tl.arange(0, BLOCK_K // 2)
      gamma = tl.reshape(_halves(tl.load(gamma_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs_g), DTYPE),
                         (BLOCK_K, 1))
      xt = (xt.to(tl.float32) * rstd).to(DTYPE) * gamma
    if SCALE_W:
      s_cur, zq_cur = _group_params(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, n0, offs_n, mask_n, N, HAS_ZP, DTYPE,
                                    BLOCK_N, SCALE_W == 2)
      if HALVES:
        s_two, zq_two = _group_params(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE + 1, n0, offs_n, mask_n, N, HAS_ZP,
                                      DTYPE, BLOCK_N, SCALE_W == 2)
      else:
        s_two, zq_two = s_cur, zq_cur
    else:
      s_cur, zq_cur = s_nxt, zq_nxt
      s_two, zq_two = s_cur, zq_cur
      s_nxt, zq_nxt = _group_params(scales_ptr, qzeros_ptr, tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE, n0,
                                    offs_n, mask_n, N, HAS_ZP, DTYPE, BLOCK_N, 0)
    acc = _group_step(acc, words, xt, s_cur, zq_cur, s_two, zq_two, k0 // GROUP_SIZE, HAS_ZP, ZP_BIAS, B, SCALE_W,
                      PTX, BLOCK_N, BLOCK_K)

  if SCALE_W:
    acc = acc * 0.0625
  if NORM == 2:  # x was h * gamma: the norm's row scale, on each partial (the split-K sum is linear)
    acc = acc * rstd
  acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
  mask = mask_m[:, None] & mask_n[None, :]
  offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
  if PARTIALS:  # this split's product to its slot; the consumer sums the slots (w4a16_frag_norm_kernel's docstring)
    tl.static_assert(RES == 0, "PARTIALS leaves the sum to the consumer: no residual epilogue")
    tl.store(partial_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
  elif RES:
    NB: tl.constexpr = BLOCK_N // 64
    offs_b = pid_n * NB + tl.arange(0, NB)
    ssq_offs = offs_m.to(tl.int64)[:, None] * (N // 64) + offs_b[None, :]
    store_tile(acc, out_ptr + offs, partial_ptr + offs, mask, M, N, lock_ptr, pid, pid_k, SPLIT_K, 1, res_ptr + offs,
               ssq_out_ptr + ssq_offs, mask_m[:, None] & (offs_b < N // 64)[None, :], RES,
               res_gamma_ptr + offs_n[None, :], hg_out_ptr + offs, RES_GAMMA)
  else:
    store_tile(acc, out_ptr + offs, partial_ptr + offs, mask, M, N, lock_ptr, pid, pid_k, SPLIT_K, 1)
