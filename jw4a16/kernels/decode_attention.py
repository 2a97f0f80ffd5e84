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
  partials to their common max, sums them and writes the R heads' outputs, loading them all at once.

q [B, H, D] and out [B, H, D] (head h = g * R + r), caches [B, S, KVH, D] (the model's layout), lengths [B]
int32 >= 1.  D a power of two.

`decode_attention_step_kernel` is the same attention with the rest of the step's attention work folded in: it
reads q and the new k and v from the q/k/v projection's output row, applies the rotary embedding to q and k, and
writes the new k and v into the caches in place (aliased outputs) before attending.  In XLA those were four more
kernels a layer (the rotary's multiply and concatenate fusions, two dynamic-update-slice fusions: ~5.3 us of GPU
time and four launches a layer of the Llama-3-8B decode step, session 14).  With PARTS = S > 0 its qkv is the
projection's S float32 split-K slots [S, B, (H + 2 KVH) D] (jw4a16.ops.w4a16_matmul(..., partials=True)), which it
sums in slot order and rounds to the caches' dtype as it loads them: what the projection's own epilogue would have
written, without that epilogue's wait for the other splits (session 17).
"""

import triton
import triton.language as tl


def block_rows(r: int) -> int:
  """BLOCK_R for R query heads a kv head: a power of two >= 16, so that tl.dot lands on the matrix units."""
  return max(16, triton.next_power_of_2(r))


def step_rows(r: int) -> int:
  """The step kernel's ROWS for R query heads a kv head: the q rows it loads and rotates, a power of two >= R (the
  dot's BLOCK_R tile repeats them)."""
  return triton.next_power_of_2(r)


@triton.jit
def _split_range(len_ptr, b, pid_s, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr):
  """(length, start, end) of split pid_s of sequence b: ceil(length / SPLIT) positions rounded up to BLOCK_S."""
  length = tl.load(len_ptr + b)
  chunk = tl.cdiv(tl.cdiv(length, SPLIT), BLOCK_S) * BLOCK_S
  start = pid_s * chunk
  return length, start, tl.minimum(start + chunk, length)


@triton.jit
def _attend(q, k_ptr, v_ptr, row0, g, start, end, m_i, l_i, acc, KVH: tl.constexpr, D: tl.constexpr,
            SCALE: tl.constexpr, BLOCK_S: tl.constexpr):
  """The online softmax over cache positions [start, end) of kv head g, from the state (m_i, l_i, acc)."""
  offs_d = tl.arange(0, D)
  offs_s = tl.arange(0, BLOCK_S)
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
  return m_i, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc, out_ptr, lock_ptr, part_acc_ptr, part_ml_ptr, pid_bg, pid_s, R: tl.constexpr,
            D: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr):
  """out = acc / l for SPLIT == 1; else this split's partial (its R rows) to the workspaces, and the last of the
  SPLIT programs of (b, g) to arrive combines them (the same ordering and counter reset as kernels/splitk.py).
  The combine issues every load at once, [SPLIT, ROWS, D] (ROWS: a power of two >= R) and the SPLIT (m, l) pairs,
  then reduces in registers: one L2 round trip after the ticket, where loading the maxima first and the partials
  after them took two (session 18, docs/performance.md)."""
  offs_r = tl.arange(0, BLOCK_R)
  offs_d = tl.arange(0, D)
  rmask = offs_r < R
  if SPLIT == 1:
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (pid_bg * R + offs_r[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])
  else:
    slot = pid_bg * SPLIT + pid_s
    tl.store(part_acc_ptr + (slot * BLOCK_R + offs_r[:, None]) * D + offs_d[None, :], acc, mask=rmask[:, None])
    tl.store(part_ml_ptr + (slot * 2) * BLOCK_R + offs_r, m_i, mask=rmask)
    tl.store(part_ml_ptr + (slot * 2 + 1) * BLOCK_R + offs_r, l_i, mask=rmask)
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr + pid_bg, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLIT - 1:
      first = pid_bg * SPLIT
      offs_p = tl.arange(0, SPLIT)
      offs_c = tl.arange(0, ROWS)
      # [SPLIT, ROWS, 1] and [SPLIT, ROWS, D]: one 3-d layout for the maxima, sums and partials, no conversions
      mask = (offs_c < R)[None, :, None]
      slots = first + offs_p[:, None, None]
      row = slots * BLOCK_R + offs_c[None, :, None]  # the partials' rows; each slot's m, then its l, BLOCK_R apart
      ml = part_ml_ptr + slots * (2 * BLOCK_R) + offs_c[None, :, None]
      m_all = tl.load(ml, mask=mask, other=float("-inf"), cache_modifier=".cg")
      l_all = tl.load(ml + BLOCK_R, mask=mask, other=0.0, cache_modifier=".cg")
      parts = tl.load(part_acc_ptr + row * D + offs_d[None, None, :], mask=mask, other=0.0, cache_modifier=".cg")
      m_max = tl.max(m_all, axis=0)  # [ROWS, 1]
      m_safe = tl.where(m_max > float("-inf"), m_max, 0.0)  # rows past R: every split empty
      w_all = tl.exp(m_all - m_safe[None, :, :])  # 0 for empty splits (m = -inf)
      l_tot = tl.sum(l_all * w_all, axis=0)
      out = tl.sum(parts * w_all, axis=0) / tl.where(l_tot > 0, l_tot, 1.0)  # [ROWS, D]
      tl.store(out_ptr + (pid_bg * R + offs_c[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
               mask=(offs_c < R)[:, None])
      tl.store(lock_ptr + pid_bg, 0)  # every ticket is drawn: the counter is ready for the next launch


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, lock_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                            S: tl.constexpr, KVH: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                            SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                            SPLIT: tl.constexpr, ROWS: tl.constexpr = 0):
  pid_bg = tl.program_id(0)
  pid_s = tl.program_id(1)
  b = pid_bg // KVH
  g = pid_bg % KVH
  offs_r = tl.arange(0, BLOCK_R)
  offs_d = tl.arange(0, D)
  head = pid_bg * R + offs_r  # rows of q and out: b * H + g * R + r
  q = tl.load(q_ptr + head[:, None] * D + offs_d[None, :], mask=(offs_r < R)[:, None], other=0.0)
  _, start, end = _split_range(len_ptr, b, pid_s, SPLIT, BLOCK_S)
  row0 = b.to(tl.int64) * S  # int64: B * S * KVH * D may pass 2**31
  m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_R], tl.float32)
  acc = tl.zeros([BLOCK_R, D], tl.float32)
  m_i, l_i, acc = _attend(q, k_ptr, v_ptr, row0, g, start, end, m_i, l_i, acc, KVH, D, SCALE, BLOCK_S)
  QR: tl.constexpr = BLOCK_R if ROWS == 0 else ROWS
  _finish(m_i, l_i, acc, out_ptr, lock_ptr, part_acc_ptr, part_ml_ptr, pid_bg, pid_s, R, D, BLOCK_R, SPLIT, QR)


@triton.jit
def _rope(x, swapped, cos, sin, D: tl.constexpr):
  """x * cos + rotate_half(x) * sin in fp32, for heads x (last axis D) and swapped = their halves exchanged:
  rotate_half(x) = [-x2, x1]."""
  sign = tl.where(tl.arange(0, D) < D // 2, -1.0, 1.0)
  return x.to(tl.float32) * cos + swapped.to(tl.float32) * sign * sin


@triton.jit
def _load_qkv(ptrs, mask, PARTS: tl.constexpr, SLOT: tl.constexpr, DTYPE: tl.constexpr):
  """Values of the q/k/v row at ptrs: as stored (PARTS = 0), or the sum of PARTS float32 slots SLOT elements
  apart, added in slot order and rounded to DTYPE (jw4a16.reference.sum_partials)."""
  if PARTS == 0:
    return tl.load(ptrs, mask=mask, other=0.0)
  total = tl.load(ptrs, mask=mask, other=0.0)
  for i in tl.static_range(1, PARTS):
    total += tl.load(ptrs + i * SLOT, mask=mask, other=0.0)
  return total.to(DTYPE)


@triton.jit
def decode_attention_step_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, len_ptr, lock_ptr, out_ptr, k_out_ptr,
                                 v_out_ptr, part_acc_ptr, part_ml_ptr, S: tl.constexpr, KVH: tl.constexpr,
                                 R: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_S: tl.constexpr, SPLIT: tl.constexpr, PARTS: tl.constexpr = 0,
                                 SLOT: tl.constexpr = 0, ROWS: tl.constexpr = 0):
  """A whole decode step's attention from the q/k/v projection's output: qkv [B, (H + 2 KVH) * D] ([q | k | v],
  heads in order), cos and sin [D] of the new position.  Rotates q and the new k, writes the new k and v at
  position length - 1 of the caches (k_out / v_out alias k / v: in place) and attends positions 0 .. length - 1.
  The split that holds position length - 1 writes it and takes it from registers; no program reads it from
  memory, so no program waits for the write.  PARTS, SLOT: qkv as float32 split-K slots (module docstring), SLOT =
  B (H + 2 KVH) D elements apart.  ROWS (a power of two >= R, or 0 for BLOCK_R): the q rows loaded and rotated;
  with fewer than BLOCK_R, the [ROWS, D] tile is repeated to the dot's BLOCK_R rows (the copies' outputs are never
  stored), so the slots' loads hold ROWS rows of registers, not BLOCK_R."""
  pid_bg = tl.program_id(0)
  pid_s = tl.program_id(1)
  b = pid_bg // KVH
  g = pid_bg % KVH
  offs_r = tl.arange(0, BLOCK_R)
  offs_d = tl.arange(0, D)
  rmask = offs_r < R
  swap_d = (offs_d + D // 2) % D
  row = qkv_ptr + b.to(tl.int64) * ((KVH * R + 2 * KVH) * D)
  cos = tl.load(cos_ptr + offs_d).to(tl.float32)
  sin = tl.load(sin_ptr + offs_d).to(tl.float32)
  DTYPE: tl.constexpr = k_ptr.dtype.element_ty
  # Every load of the projection row first, together (the new k and v too, though only the split holding the new
  # position uses them): after the attention loop they cost a dependent round trip of their own.
  QR: tl.constexpr = BLOCK_R if ROWS == 0 else ROWS
  offs_q = tl.arange(0, QR)
  q_ptrs = row + (g * R + offs_q[:, None]) * D
  q = _rope(_load_qkv(q_ptrs + offs_d[None, :], (offs_q < R)[:, None], PARTS, SLOT, DTYPE),
            _load_qkv(q_ptrs + swap_d[None, :], (offs_q < R)[:, None], PARTS, SLOT, DTYPE), cos, sin, D)
  q = q.to(DTYPE)
  if QR < BLOCK_R:  # row r of the dot's tile is q row r % QR
    q = tl.reshape(tl.broadcast_to(q[None, :, :], (BLOCK_R // QR, QR, D)), (BLOCK_R, D))
  k_row = row + (KVH * R + g) * D
  whole = offs_d < D
  k_new = _rope(_load_qkv(k_row + offs_d, whole, PARTS, SLOT, DTYPE),
                _load_qkv(k_row + swap_d, whole, PARTS, SLOT, DTYPE), cos, sin, D).to(DTYPE)
  v_new = _load_qkv(row + (KVH * R + KVH + g) * D + offs_d, whole, PARTS, SLOT, DTYPE)
  length, start, end = _split_range(len_ptr, b, pid_s, SPLIT, BLOCK_S)
  last = length - 1
  row0 = b.to(tl.int64) * S
  holds_new = (start <= last) & (last < end)  # this split holds the new position: it writes it, and attends it
  if holds_new:  # no program reads position `last` from the caches (the loops stop before it): write it now
    cache_off = ((row0 + last) * KVH + g) * D + offs_d
    tl.store(k_out_ptr + cache_off, k_new)
    tl.store(v_out_ptr + cache_off, v_new)
  m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_R], tl.float32)
  acc = tl.zeros([BLOCK_R, D], tl.float32)
  m_i, l_i, acc = _attend(q, k_ptr, v_ptr, row0, g, start, tl.minimum(end, last), m_i, l_i, acc, KVH, D, SCALE,
                          BLOCK_S)
  if holds_new:  # the new position from registers
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * SCALE  # [BLOCK_R]
    m_new = tl.maximum(m_i, s_new)
    p = tl.exp(s_new - m_new)
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
    m_i = m_new
  _finish(m_i, l_i, acc, out_ptr, lock_ptr, part_acc_ptr, part_ml_ptr, pid_bg, pid_s, R, D, BLOCK_R, SPLIT, QR)
