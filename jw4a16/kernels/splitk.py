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

Ordering: the barrier makes all of the program's partial stores happen before its ticket, and the ticket's
acq_rel (gpu scope) releases them to, and acquires the others' for, the last program; the partials are then
read with .cg (L2, not the SM's L1 cache).
"""

import triton
import triton.language as tl


@triton.jit
def store_tile(acc, out_ptrs, partial_ptrs, mask, M, N: tl.constexpr, lock_ptr, tile, pid_k,
               SPLIT_K: tl.constexpr, UNROLL: tl.constexpr):
  """Writes the fp32 tile `acc` to `out_ptrs` (SPLIT_K == 1) or runs the split-K epilogue above.

  partial_ptrs point into slot 0 of the workspace [SPLIT_K, M, N] for this tile's elements.  UNROLL (a power
  of two): read up to that many slots per unrolled chunk, their loads in flight together: 8 for the gemv
  kernel's 1 x BLOCK_N tiles, 1 for the tile kernel (its 64 x 128 tiles spill registers when unrolled).
  """
  if SPLIT_K == 1:
    tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
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
      tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
      tl.store(lock_ptr + tile, 0)  # every ticket is drawn: the counter is ready for the next launch
