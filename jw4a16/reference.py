"""Pure-jnp W4A16 reference: the CPU path and the oracle for the Triton kernel.

Same signature as `jw4a16.w4a16_matmul`.  Dequantizes in float32, rounds the weight once to x's dtype (as the
kernel does), then multiplies with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jw4a16 import checks
from jw4a16.layout import from_fragment_packed, unpack_fragment, unpack_int4


def dequantize(qweight, scales, qzeros=None, *, group_size: int, zp_bias: int = 8, g_idx=None, dtype=None,
               packing: str = "gptq"):
  """[K, N // 8] int32 packed weights -> [K, N] floats: W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n].

  g(k) = g_idx[k] when given (act-order rows in checkpoint order), else k // group_size.  `dtype` defaults to
  scales' dtype.  packing="fragment": qweight is [ceil(N / 64), 8 K] (layout.to_fragment_packed).
  """
  if packing == "fragment":
    if g_idx is not None:  # act-order rows in checkpoint order only exist in the GPTQ packing
      qweight = from_fragment_packed(jnp.asarray(qweight), scales.shape[1])
    else:
      return dequantize_fragment_nk(qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias, dtype=dtype).T
  k = qweight.shape[0]
  g = checks.resolve_group_size(group_size, k)
  q = unpack_int4(jnp.asarray(qweight), axis=1).astype(jnp.float32)
  rows = jnp.asarray(g_idx, jnp.int32) if g_idx is not None else jnp.arange(k, dtype=jnp.int32) // g
  s = jnp.asarray(scales).astype(jnp.float32)[rows]
  if qzeros is None:
    z = jnp.float32(zp_bias)
  else:
    z = unpack_int4(jnp.asarray(qzeros), axis=1).astype(jnp.float32)[rows]
  return ((q - z) * s).astype(dtype or scales.dtype)


def dequantize_fragment_nk(qweight, scales, qzeros=None, *, group_size: int, zp_bias: int = 8, dtype=None):
  """Fragment-packed [ceil(N / 64), 8 K] words -> W^T [N, K] floats (no transpose of the whole weight: the
  dequantize-then-GEMM route contracts K of both operands)."""
  q = unpack_fragment(jnp.asarray(qweight), scales.shape[1])  # [N, K]
  n, k = q.shape
  g = checks.resolve_group_size(group_size, k)
  q = q.reshape(n, k // g, g).astype(jnp.float32)  # by group
  s = jnp.asarray(scales).astype(jnp.float32).T[:, :, None]  # [N, K // G, 1]
  z = jnp.float32(zp_bias)
  if qzeros is not None:
    z = unpack_int4(jnp.asarray(qzeros), axis=1).astype(jnp.float32).T[:, :, None]
  return ((q - z) * s).reshape(n, k).astype(dtype or scales.dtype)


def w4a16_matmul_reference(x, qweight, scales, qzeros=None, *, group_size: int, zp_bias: int = 8, g_idx=None,
                           perm=None, packing: str = "gptq"):
  """x [..., K] @ dequantize(...) [K, N] -> [..., N] in x's dtype, fp32 accumulation.

  perm: rows of qweight are already sorted by group (see `jw4a16.QuantizedWeight`); x's columns are gathered by
  it: out = x[..., perm] @ W.
  """
  checks.check_matmul_args(x, qweight, scales, qzeros, group_size, zp_bias, g_idx, perm, packing)
  w = dequantize(qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias, g_idx=g_idx, dtype=x.dtype,
                 packing=packing)
  if perm is not None:
    x = jnp.take(x, jnp.asarray(perm, jnp.int32), axis=-1)
  # float32 operands hold the bf16/fp16 values exactly, so this is the 16-bit product with fp32 accumulation; XLA
  # CPU lacks a bf16 x bf16 -> f32 dot in some contexts (inside shard_map with explicit sharding); "highest"
  # keeps GPUs from using TF32.
  return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest").astype(x.dtype)


SSQ_BLOCK = 64  # columns per partial sum of squares (ops.w4a16_matmul's residual output, norm_ssq input)


def sum_squares(h):
  """h [..., N] (N % 64 == 0) -> [..., N // 64] fp32: the sums of h^2 in fp32 over each 64 columns, the form in
  which a residual matmul hands its output's squares to the next norm (kernels/splitk.py).  Of h as rounded to
  its dtype: XLA may otherwise square the fp32 value h was rounded from (its excess-precision rewrites)."""
  fi = jnp.finfo(h.dtype)
  f = jax.lax.reduce_precision(h.astype(jnp.float32), fi.nexp, fi.nmant)
  f = f.reshape(*h.shape[:-1], h.shape[-1] // SSQ_BLOCK, SSQ_BLOCK)
  return jnp.sum(f * f, axis=-1)


def rms_norm_from_ssq(h, weight, eps: float, ssq=None):
  """transformers' LlamaRMSNorm of h [..., K] (jw4a16.norm.rms_norm_reference) with the mean square taken from
  ssq [..., K // 64] (sum_squares(h)) when given: weight * (h * rsqrt(mean + eps)).to(dtype).  weight None: h is
  the hidden state times the norm weight already (residual_sum's third output) and ssq the hidden state's squares:
  only the row scale, (h * rsqrt(mean + eps)).to(dtype)."""
  if weight is None and ssq is None:
    raise ValueError("rms_norm_from_ssq: without a weight, the squares (ssq) of the hidden state are needed")
  f = h.astype(jnp.float32)
  total = jnp.sum(f * f if ssq is None else ssq, axis=-1, keepdims=True)
  scaled = (f * jax.lax.rsqrt(total / h.shape[-1] + eps)).astype(h.dtype)
  return scaled if weight is None else weight * scaled


def residual_sum(y, residual, norm_weight=None):
  """(h, sum_squares(h)) with h = y + residual, and with the next norm's weight also h * norm_weight: what
  w4a16_matmul(..., residual=, residual_norm_weight=) returns, in jnp."""
  h = y + residual
  return (h, sum_squares(h)) if norm_weight is None else (h, sum_squares(h), h * norm_weight)


def sum_partials(partials, dtype):
  """w4a16_matmul(..., partials=True)'s slots [S, ..., N] float32 -> the product [..., N] in dtype: the slots added
  in slot order and rounded once (to nearest even), as the frag kernel's split-K epilogue sums and rounds them
  (kernels/splitk.py), so a consumer that sums them itself gets the op's output."""
  if partials.ndim < 2 or partials.dtype != jnp.float32:
    raise ValueError(f"partials: expected float32 [S, ..., N] slots, got {partials.dtype} {partials.shape}")
  total = partials[0]
  for i in range(1, partials.shape[0]):
    total = total + partials[i]
  return total.astype(dtype)
