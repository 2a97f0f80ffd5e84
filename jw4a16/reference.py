"""Pure-jnp W4A16 reference: the CPU path and the oracle for the Triton kernel.

Same signature as `jw4a16.w4a16_matmul`.  Dequantizes in float32, rounds the weight once to x's dtype (as the
kernel does), then multiplies with float32 accumulation.
"""

from __future__ import annotations

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
