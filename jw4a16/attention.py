"""Grouped-query attention against a KV cache: the jnp reference (any number of query positions) and, for a decode
step (one query position), the Triton kernel `kernels/decode_attention.py` where it can run.

`attention(q, k_cache, v_cache, index)` is what the Llama model calls for a prefill; for a decode step it calls
`attention_step(qkv, cos, sin, k_cache, v_cache, index)`, which also applies the rotary embedding and writes the
new keys and values into the caches (`kernels/decode_attention.decode_attention_step_kernel`: one launch for what
XLA ran as five kernels of attention and four of rotary and cache writes).  The reference follows Hugging Face
transformers' eager attention in the activation dtype (scores rounded to it, softmax in fp32, probabilities rounded
back), so the CPU path matches transformers to bf16 rounding (tests/test_model.py).  The kernel keeps the scores in
fp32 (flash attention's numerics): on H100 it differs from the reference by bf16 rounding of the output.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from jw4a16 import ops
from jw4a16.reference import sum_partials

BLOCK_S = 64
SPLIT_MAX = 32
DISABLE_ENV = "JW4A16_DECODE_ATTENTION"  # "0": always the reference


def attention_reference(q, k_cache, v_cache, index):
  """q [B, T, H, D] at positions index .. index + T - 1; caches [B, S, KVH, D] -> [B, T, H, D] in q's dtype.
  Causal: position p attends cache slots 0..p (slots past the last write are masked too)."""
  b, t, h, d = q.shape
  s, kvh = k_cache.shape[1], k_cache.shape[2]
  dt = q.dtype
  qg = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k_cache, preferred_element_type=jnp.float32).astype(dt)
  scores = scores * jnp.asarray(d**-0.5, dt)
  q_pos = index + jnp.arange(t)
  mask = jnp.arange(s)[None, :] <= q_pos[:, None]
  scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v_cache, preferred_element_type=jnp.float32).astype(dt)
  return out.reshape(b, t, h, d)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
  """transformers' apply_rotary_pos_emb for one tensor: x [..., D] with cos and sin broadcast against it."""
  return x * cos + rotate_half(x) * sin


def write_cache(cache, new, index):
  """cache [B, S, KVH, D] with new [B, T, KVH, D] at positions index .. index + T - 1 (in place when donated)."""
  return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, index, 0, 0))


def split_qkv(qkv, num_heads: int, num_kv_heads: int, head_dim: int):
  """[..., (H + 2 KVH) * D] -> q [..., H, D], k and v [..., KVH, D]."""
  h, kvh, d = num_heads, num_kv_heads, head_dim
  q, k, v = jnp.split(qkv, [h * d, (h + kvh) * d], axis=-1)
  lead = qkv.shape[:-1]
  return q.reshape(*lead, h, d), k.reshape(*lead, kvh, d), v.reshape(*lead, kvh, d)


def check_attention_args(q, k_cache, v_cache):
  """(B, T, H, D, S, KVH) of valid arguments, else a ValueError naming the argument."""
  if q.ndim != 4:
    raise ValueError(f"q: expected [B, T, H, D], got shape {q.shape}")
  b, t, h, d = q.shape
  for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
    if c.ndim != 4 or c.shape[0] != b or c.shape[3] != d:
      raise ValueError(f"{name}: expected [B={b}, S, KVH, D={d}], got shape {c.shape}")
    if c.dtype != q.dtype:
      raise ValueError(f"{name}: dtype {c.dtype} differs from q's {q.dtype}")
  if k_cache.shape != v_cache.shape:
    raise ValueError(f"v_cache: shape {v_cache.shape} differs from k_cache's {k_cache.shape}")
  s, kvh = k_cache.shape[1], k_cache.shape[2]
  if h % kvh:
    raise ValueError(f"q: {h} heads are not a multiple of the caches' {kvh} kv heads")
  return b, t, h, d, s, kvh


def kernel_unavailable_reason(q, k_cache) -> str | None:
  """None when the decode kernel takes these arguments on this backend, else why not."""
  b, t, h, d = q.shape
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return f"${DISABLE_ENV}=0"
  if t != 1:
    return f"{t} query positions (the kernel is for decode steps, T = 1)"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (the kernel takes bfloat16 or float16)"
  if d < 16 or d & (d - 1):
    return f"head_dim {d} is not a power of two >= 16"
  if h // k_cache.shape[2] > 64:
    return f"{h // k_cache.shape[2]} query heads a kv head (the kernel takes up to 64)"
  if b == 0:
    return "an empty batch"
  if ops.resolve_backend() != "triton":
    return "the Triton path cannot run here (ops.resolve_backend)"
  return None


def check_step_args(qkv, cos, sin, k_cache, v_cache):
  """(B, H, D, S, KVH) of valid `attention_step` arguments, else a ValueError naming the argument.  qkv may be
  float32 split-K slots [P, B, W] (`attention_step`)."""
  if k_cache.ndim != 4:
    raise ValueError(f"k_cache: expected [B, S, KVH, D], got shape {k_cache.shape}")
  b, s, kvh, d = k_cache.shape
  if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
    raise ValueError(f"v_cache: expected {k_cache.dtype} {k_cache.shape} as k_cache, got {v_cache.dtype} "
                     f"{v_cache.shape}")
  slots = qkv.ndim == 3 and qkv.dtype == jnp.float32
  row = qkv[0] if slots else qkv
  if row.ndim != 2 or row.shape[0] != b or row.shape[1] % d or row.shape[1] // d <= 2 * kvh \
     or (row.shape[1] // d - 2 * kvh) % kvh:
    raise ValueError(f"qkv: expected [B={b}, (H + 2 * {kvh}) * {d}] with H a multiple of {kvh} (or float32 slots "
                     f"[P, B, ...] of it), got {qkv.dtype} {qkv.shape}")
  if not slots and qkv.dtype != k_cache.dtype:
    raise ValueError(f"qkv: dtype {qkv.dtype} differs from the caches' {k_cache.dtype} (float32 [P, B, ...] are "
                     "split-K slots)")
  for name, a in (("cos", cos), ("sin", sin)):
    if a.shape != (d,):
      raise ValueError(f"{name}: expected [D={d}], got shape {a.shape}")
  return b, row.shape[1] // d - 2 * kvh, d, s, kvh


def split_for(b: int, kvh: int, s: int, num_sms: int, block_s: int = BLOCK_S) -> int:
  """Splits of the positions per (sequence, kv head): about one program per two SMs, each split at least four
  blocks (4 * block_s positions) of the cache; a power of two <= SPLIT_MAX, rounded down.  Measured on H100
  (session 13, docs/performance.md): 4x more splits than this, or splits of one block, ran 1.1 - 1.4x slower
  (a split costs its partial's store and its share of the combine).  Session 18 measured one-block splits again
  with the combine that loads every partial at once: faster at 540 positions, slower at 128 and at batch 2, the
  same in the Llama-3-8B decode step (docs/performance.md), so the rule stands."""
  want = min(-(-(num_sms // 2) // (b * kvh)), s // (4 * block_s), SPLIT_MAX)
  return 1 << max(0, math.floor(math.log2(max(want, 1))))


def _launch_params(b: int, r: int, kvh: int, s: int, split: int | None, block_s: int):
  """(split, BLOCK_R, launcher, triton_call) of a decode-attention launch; a bad split is refused before
  jax_triton is imported."""
  if split is not None and (split < 1 or split & (split - 1)):
    raise ValueError(f"split={split} must be a power of two >= 1")
  from jw4a16 import launch  # noqa: PLC0415
  from jw4a16.kernels.decode_attention import block_rows  # noqa: PLC0415

  launcher = launch.resolve_launcher()
  return (split or split_for(b, kvh, s, ops.current_target().num_sms, block_s), block_rows(r), launcher,
          launch.triton_call_for(launcher))


def decode_attention(q, k_cache, v_cache, lengths, *, split: int | None = None, block_s: int = BLOCK_S,
                     num_warps: int = 4, num_stages: int = 3):
  """The Triton decode kernel: q [B, H, D], caches [B, S, KVH, D], lengths [B] int32 (sequence b attends cache
  slots 0 .. lengths[b] - 1; each >= 1) -> [B, H, D] in q's dtype.  No fallback: callers go through `attention`,
  which checks `kernel_unavailable_reason` first."""
  b, h, d = q.shape
  s, kvh = k_cache.shape[1], k_cache.shape[2]
  r = h // kvh
  split, block_r, launcher, triton_call = _launch_params(b, r, kvh, s, split, block_s)
  from jw4a16.kernels.decode_attention import decode_attention_kernel, step_rows  # noqa: PLC0415

  slots = b * kvh * split if split > 1 else 1
  out, _, _ = triton_call(
      q, k_cache, v_cache, lengths.astype(jnp.int32), ops.split_counters(b * kvh, launcher),
      kernel=decode_attention_kernel, grid=(b * kvh, split), name="jw4a16_decode_attention",
      out_shape=(jax.ShapeDtypeStruct((b, h, d), q.dtype), jax.ShapeDtypeStruct((slots, block_r, d), jnp.float32),
                 jax.ShapeDtypeStruct((slots, 2, block_r), jnp.float32)),
      num_warps=num_warps, num_stages=num_stages,
      S=s, KVH=kvh, R=r, D=d, SCALE=float(d**-0.5), BLOCK_R=block_r, BLOCK_S=block_s, SPLIT=split,
      ROWS=step_rows(r))
  return out


def decode_attention_step(qkv, cos, sin, k_cache, v_cache, lengths, *, split: int | None = None,
                          block_s: int = BLOCK_S, num_warps: int = 4, num_stages: int = 3):
  """The Triton step kernel: qkv [B, (H + 2 KVH) * D] (or float32 split-K slots [P, B, ...] of it), cos and sin
  [D], caches [B, S, KVH, D], lengths [B] int32 (the new position of sequence b is lengths[b] - 1) -> (out [B, H,
  D], k_cache, v_cache), the caches updated in place (aliased).  No fallback: callers go through
  `attention_step`."""
  b, h, d, s, kvh = check_step_args(qkv, cos, sin, k_cache, v_cache)
  r = h // kvh
  split, block_r, launcher, triton_call = _launch_params(b, r, kvh, s, split, block_s)
  from jw4a16.kernels.decode_attention import decode_attention_step_kernel, step_rows  # noqa: PLC0415

  slots = b * kvh * split if split > 1 else 1
  parts = qkv.shape[0] if qkv.ndim == 3 else 0
  out, k_cache, v_cache, _, _ = triton_call(
      qkv, cos.astype(k_cache.dtype), sin.astype(k_cache.dtype), k_cache, v_cache, lengths.astype(jnp.int32),
      ops.split_counters(b * kvh, launcher),
      kernel=decode_attention_step_kernel, grid=(b * kvh, split), name="jw4a16_decode_attention_step",
      out_shape=(jax.ShapeDtypeStruct((b, h, d), k_cache.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
                 jax.ShapeDtypeStruct((slots, block_r, d), jnp.float32),
                 jax.ShapeDtypeStruct((slots, 2, block_r), jnp.float32)),
      input_output_aliases={3: 1, 4: 2}, num_warps=num_warps, num_stages=num_stages,
      S=s, KVH=kvh, R=r, D=d, SCALE=float(d**-0.5), BLOCK_R=block_r, BLOCK_S=block_s, SPLIT=split, PARTS=parts,
      SLOT=b * (h + 2 * kvh) * d if parts else 0, ROWS=step_rows(r))
  return out, k_cache, v_cache


def attention_step_reference(qkv, cos, sin, k_cache, v_cache, index):
  """What `attention_step` computes, in jnp: split, rotary, cache writes, `attention_reference`."""
  b, h, d, s, kvh = check_step_args(qkv, cos, sin, k_cache, v_cache)
  if qkv.ndim == 3:  # split-K slots: their sum, rounded as the kernel rounds it
    qkv = sum_partials(qkv, k_cache.dtype)
  q, k, v = split_qkv(qkv[:, None], h, kvh, d)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  k_cache, v_cache = write_cache(k_cache, k, index), write_cache(v_cache, v, index)
  return attention_reference(q, k_cache, v_cache, index)[:, 0], k_cache, v_cache


def attention_step(qkv, cos, sin, k_cache, v_cache, index, *, allow_kernel: bool = True):
  """One decode position of every sequence, from the q/k/v projection's output: qkv [B, (H + 2 KVH) * D] ([q | k |
  v], rows of position `index`, before the rotary embedding), or float32 [P, B, (H + 2 KVH) * D], that output as
  split-K slots (`jw4a16.w4a16_matmul(..., partials=True)`: summed here, as the projection would have, see
  `reference.sum_partials`), cos and sin [D] of that position, caches [B, S, KVH, D] -> (out [B, H, D], k_cache,
  v_cache with the rotated k and the v at `index`).  The step kernel where it can run
  (`kernel_unavailable_reason`) and allow_kernel, the jnp reference otherwise."""
  b, h, d, s, kvh = check_step_args(qkv, cos, sin, k_cache, v_cache)
  if allow_kernel and kernel_unavailable_reason(jax.ShapeDtypeStruct((b, 1, h, d), k_cache.dtype), k_cache) is None:
    lengths = jnp.full((b,), 1, jnp.int32) + jnp.asarray(index, jnp.int32)
    return decode_attention_step(qkv, cos, sin, k_cache, v_cache, lengths)
  return attention_step_reference(qkv, cos, sin, k_cache, v_cache, index)


def attention(q, k_cache, v_cache, index, *, allow_kernel: bool = True):
  """q [B, T, H, D] at positions index .. index + T - 1 (index a traced or concrete scalar) against caches
  [B, S, KVH, D] already holding those positions -> [B, T, H, D]: the decode kernel for T = 1 where it can run
  (`kernel_unavailable_reason`) and allow_kernel (False for arrays sharded by GSPMD, which the custom call
  would gather), the reference otherwise."""
  b, t, h, d, s, kvh = check_attention_args(q, k_cache, v_cache)
  if allow_kernel and kernel_unavailable_reason(q, k_cache) is None:
    lengths = jnp.full((b,), 1, jnp.int32) + jnp.asarray(index, jnp.int32)
    return decode_attention(q[:, 0], k_cache, v_cache, lengths)[:, None]
  return attention_reference(q, k_cache, v_cache, index)


__all__ = ["apply_rope", "attention", "attention_reference", "attention_step", "attention_step_reference",
           "check_attention_args", "check_step_args", "decode_attention", "decode_attention_step",
           "kernel_unavailable_reason", "rotate_half", "split_for", "split_qkv", "write_cache"]
