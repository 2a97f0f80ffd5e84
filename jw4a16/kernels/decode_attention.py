"""Decode attention: one query position per sequence against its KV cache, grouped-query heads, in one launch.

For a decode step (T = 1) XLA runs the attention as five kernels (the scores' dot, the softmax's max and sum
reductions, the normalization, the dot with V), ~6.5 us a layer on H100 for a 256-position cache at batch 1 and
~28 us at batch 16, where the K and V reads take ~0.4 and ~5 us (session 13, docs/performance.md).  This kernel
reads each K and V row once for all R = H / KVH query heads that share it:

- grid (B * KVH, SPLIT): program (b * KVH + g, i) owns split i of the valid positions [0, length_b) of sequence
  b, kv head g.  The splits are ceil(length_b / SPLIT) positions each, rounded up to BLOCK_S, so the work follows
  the traced length, not the cache's size; a split past the end has nothing to do.
- Per BLOCK_S positions: scores = q [BLOCK_R, D] @ K^T (fp32, times SCALE), an online softmax (running max m,
  sum l), acc += P @ V with P rounded to the cache's dtype, as flash attention does.  BLOCK_R >= 16 rows (R
  query heads, the rest masked) so that tl.dot lands on the matrix units.
- SPLIT == 1: out = acc / l.  Otherwise each program stores (m, l, acc) to its slot of the fp32 workspaces and
  takes a ticket from its (b, g) counter, as the GEMM's split-K epilogue does (kernels/splitk.py: same ordering,
  same reset to zero, so one zeroed counter buffer serves every launch): the last to arrive rescales the SPLIT
  partials to their common max, sums them and writes the R heads' outputs.

q [B, H, D] and out [B, H, D] (head h = g * R + r), caches [B, S, KVH, D] (the model's layout), lengths [B]
int32 >= 1.  D a power of two.
"""

import triton
import triton.language as tl


def block_rows(r: int) -> int:
  """BLOCK_R for R query heads a kv head: a power of two >= 16, so that tl.dot lands on the matrix units."""
  return max(16, triton.next_power_of_2(r))


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, lock_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                            S: tl.constexpr, KVH: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                            SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                            SPLIT: tl.constexpr):
  pid_bg = tl.program_id(0)
  pid_s = tl.program_id(1)
  b = pid_bg // KVH
  g = pid_bg % KVH
  offs_r = tl.arange(0, BLOCK_R)
  offs_d = tl.arange(0, D)
  offs_s = tl.arange(0, BLOCK_S)
  rmask = offs_r < R
  head = pid_bg * R + offs_r  # rows of q and out: b * H + g * R + r
  q = tl.load(q_ptr + head[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0.0)

  length = tl.load(len_ptr + b)
  chunk = tl.cdiv(tl.cdiv(length, SPLIT), BLOCK_S) * BLOCK_S
  start = pid_s * chunk
  end = tl.minimum(start + chunk, length)
  row0 = b.to(tl.int64) * S  # int64: B * S * KVH * D may pass 2**31

  m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_R], tl.float32)
  acc = tl.zeros([BLOCK_R, D], tl.float32)
  for s0 in range(start, end, BLOCK_S):
    pos = s0 + offs_s
    valid = pos < end
    kv_off = ((row0 + pos[:, None]) * KVH + g) * D + offs_d[None, :]
    k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k)) * SCALE
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: each block holds a valid position
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    m_i = m_new

  out_ptrs = out_ptr + head[:, None] * D + offs_d[None, :]
  if SPLIT == 1:
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
  else:
    slot = pid_bg * SPLIT + pid_s
    tl.store(part_acc_ptr + (slot * BLOCK_R + offs_r[:, None]) * D + offs_d[None, :], acc)
    tl.store(part_ml_ptr + (slot * 2) * BLOCK_R + offs_r, m_i)
    tl.store(part_ml_ptr + (slot * 2 + 1) * BLOCK_R + offs_r, l_i)
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr + pid_bg, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLIT - 1:
      first = pid_bg * SPLIT
      offs_p = tl.arange(0, SPLIT)
      ml = part_ml_ptr + ((first + offs_p[:, None]) * 2) * BLOCK_R + offs_r[None, :]
      m_all = tl.load(ml, cache_modifier=".cg")  # [SPLIT, BLOCK_R]
      l_all = tl.load(ml + BLOCK_R, cache_modifier=".cg")
      m_max = tl.max(m_all, axis=0)
      m_safe = tl.where(m_max > float("-inf"), m_max, 0.0)  # rows past R: every split empty
      w_all = tl.exp(m_all - m_safe[None, :])  # 0 for empty splits (m = -inf)
      l_tot = tl.sum(l_all * w_all, axis=0)
      total = tl.zeros([BLOCK_R, D], tl.float32)
      for i in tl.static_range(SPLIT):  # unrolled: the SPLIT loads go out together, not one L2 trip each
        m_s = tl.load(part_ml_ptr + ((first + i) * 2) * BLOCK_R + offs_r, mask=rmask, other=0.0,
                      cache_modifier=".cg")
        part = tl.load(part_acc_ptr + ((first + i) * BLOCK_R + offs_r[:, None]) * D + offs_d[None, :],
                       mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        total += part * tl.exp(m_s - m_safe)[:, None]
      out = total / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
      tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
      tl.store(lock_ptr + pid_bg, 0)  # every ticket is drawn: the counter is ready for the next launch
