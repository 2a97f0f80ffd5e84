"""The split-K epilogue shared by both kernels: the last program of a tile to finish sums the partials.

With SPLIT_K > 1 the SPLIT_K programs of one output tile each write their fp32 partial to slot pid_k of a
workspace [SPLIT_K, M, N] and then take a ticket from the tile's arrival counter (one int32 per tile, zero when
the launch starts).  The program that draws ticket SPLIT_K - 1 arrived last: every other partial is in memory,
so it sums all SPLIT_K slots, its own included, in slot order (the result is the same whichever program arrives
last; holding its own tile in registers instead spills the 64x128 tiles), writes the tile of `out` in the
output dtype, and sets the counter back to zero.  One launch does the whole op, with no second kernel to reduce
the partials; only integer atomics are used (one per program), so it suits AMD as well, where float atomics are
slow.  Because every launch leaves its counters at zero, one zeroed buffer serves every launch after it
(jw4a16.ops passes a constant of the compiled program; no memset per call).

RES = 1 (the frag kernel's fused residual, jw4a16.ops.w4a16_matmul(..., residual=)): the tile that is written is
h = out.to(dtype) + residual (in the activation dtype, as the model adds), and each row's sum of squares of h in
fp32 over each 64 columns goes to ssq [M, N // 64] (BLOCK_N a multiple of 64, N % 64 == 0), from which the next
matmul's RMSNorm (NORM) forms the row's rstd without another pass over h; RES_GAMMA also writes h times the next
norm's weight, which that matmul then multiplies as it is (NORM = 2).

Ordering: the barrier makes all of the program's partial stores happen before its ticket, and the ticket's
acq_rel (gpu scope) releases them to, and acquires the others' for, the last program; the partials are then
read with .cg (L2, not the SM's L1 cache).
"""

import triton
import triton.language as tl


@triton.jit
def _write(total, out_ptrs, mask, res_ptrs, ssq_ptrs, ssq_mask, RES: tl.constexpr, gamma_ptrs, hg_ptrs,
           RES_GAMMA: tl.constexpr):
  """The tile's output: total [BM, BN] fp32 rounded to the output dtype, plus the residual with RES (and its
  sums of squares per 64 columns to ssq_ptrs [BM, BN // 64]; with RES_GAMMA also the sum times gamma [1, BN] to
  hg_ptrs)."""
  y = total.to(out_ptrs.dtype.element_ty, fp_downcast_rounding="rtne")
  if RES:
    y = y + tl.load(res_ptrs, mask=mask, other=0.0)
    h = y.to(tl.float32)
    h = tl.where(mask, h * h, 0.0)
    tl.store(ssq_ptrs, tl.sum(tl.reshape(h, (h.shape[0], h.shape[1] // 64, 64)), axis=2), mask=ssq_mask)
    if RES_GAMMA:
      tl.store(hg_ptrs, y * tl.load(gamma_ptrs, mask=mask, other=0.0), mask=mask)
  tl.store(out_ptrs, y, mask=mask)


@triton.jit
def store_tile(acc, out_ptrs, partial_ptrs, mask, M, N: tl.constexpr, lock_ptr, tile, pid_k,
               SPLIT_K: tl.constexpr, UNROLL: tl.constexpr, res_ptrs=None, ssq_ptrs=None, ssq_mask=None,
               RES: tl.constexpr = 0, gamma_ptrs=None, hg_ptrs=None, RES_GAMMA: tl.constexpr = 0):
  """Writes the fp32 tile `acc` to `out_ptrs` (SPLIT_K == 1) or runs the split-K epilogue above.

  partial_ptrs point into slot 0 of the workspace [SPLIT_K, M, N] for this tile's elements.  UNROLL (a power
  of two): read up to that many slots per unrolled chunk, their loads in flight together: 8 for the gemv
  kernel's 1 x BLOCK_N tiles, 1 for the tile kernel (its 64 x 128 tiles spill registers when unrolled).
  RES: the fused residual (module docstring); res_ptrs as out_ptrs, ssq_ptrs [BM, BN // 64] and their mask;
  RES_GAMMA: also the output times gamma_ptrs' values [1, BN] to hg_ptrs (as out_ptrs).
  """
  if SPLIT_K == 1:
    _write(acc, out_ptrs, mask, res_ptrs, ssq_ptrs, ssq_mask, RES, gamma_ptrs, hg_ptrs, RES_GAMMA)
  else:
    zero = pid_k.to(tl.int64) * 0  # int64 offsets: SPLIT_K * M * N may pass 2**31
    slot = (zero + M) * N
    tl.store(partial_ptrs + (zero + pid_k) * slot, acc, mask=mask)
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLIT_K - 1:
      total = tl.zeros_like(acc)
      # chunks of C slots (C | SPLIT_K, C <= UNROLL), each chunk unrolled
      C: tl.constexpr = UNROLL if SPLIT_K % UNROLL == 0 else (2 if SPLIT_K % 2 == 0 else 1)
      for s0 in range(0, SPLIT_K, C):
        for j in tl.static_range(C):
          total += tl.load(partial_ptrs + (zero + s0 + j) * slot, mask=mask, other=0.0, cache_modifier=".cg")
      _write(total, out_ptrs, mask, res_ptrs, ssq_ptrs, ssq_mask, RES, gamma_ptrs, hg_ptrs, RES_GAMMA)
      tl.store(lock_ptr + tile, 0)  # every ticket is drawn: the counter is ready for the next launch
