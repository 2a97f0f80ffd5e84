"""Round-to-nearest int4 quantization of float weights into kernel layout, and Flax parameter conversion.

Symmetric (uint4b8): per group and column, s = absmax / 7 rounded to the scale dtype, q = clip(round(w / s), -8, 7)
stored as q + 8 (zero point 8).  Since s >= absmax / 7.5 even after rounding, no value clips and
    |w - dequantize(quantize(w))| <= s / 2 + |w| * eps   (eps: the scale dtype's rounding, 2**-8 bf16, 2**-11 fp16)
Asymmetric: s = (max - min) / 15, an integer zero point z = clip(round(-min / s), 0, 15), q = clip(round(w / s) + z,
0, 15); the rounded zero point can push one end past the grid by up to s / 2, so the bound is one step:
    |w - dequantize(quantize(w))| <= s + |w| * eps
All-zero groups get s = 1 (and dequantize to exactly 0 in the symmetric case).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jw4a16 import checks
from jw4a16.layout import pack_int4
from jw4a16.qweight import QuantizedWeight


def quantize(w, *, group_size: int = 128, symmetric: bool = True, dtype=jnp.bfloat16) -> QuantizedWeight:
  """Float kernel [K, N] (x @ w layout, as flax Dense stores it) -> QuantizedWeight with scales in `dtype`."""
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"quantize: w must be a [K, N] kernel, got shape {w.shape}")
  k, n = w.shape
  if n % 8:
    raise ValueError(f"quantize: N={n} (w.shape[1]) must be a multiple of 8")
  g = checks.resolve_group_size(group_size, k)
  wg = w.reshape(k // g, g, n)
  if symmetric:
    amax = jnp.max(jnp.abs(wg), axis=1)
    s = jnp.where(amax > 0, amax / 7.0, 1.0).astype(dtype)
    q = jnp.clip(jnp.round(wg / s.astype(jnp.float32)[:, None, :]), -8, 7) + 8
    qzeros = None
  else:
    lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
    s = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(dtype)
    sf = s.astype(jnp.float32)
    z = jnp.clip(jnp.round(-lo / sf), 0, 15)
    q = jnp.clip(jnp.round(wg / sf[:, None, :]) + z[:, None, :], 0, 15)
    qzeros = pack_int4(z.astype(jnp.int32), axis=1)
  qweight = pack_int4(q.reshape(k, n).astype(jnp.int32), axis=1)
  return QuantizedWeight(qweight, s, qzeros, None, g, 8)


def error_bound(w, qw: QuantizedWeight):
  """The documented per-element bound on |w - dequantize(quantize(w))| (see the module docstring)."""
  k, _ = qw.shape
  s = jnp.repeat(qw.scales.astype(jnp.float32), qw.group_size, axis=0)[:k]
  eps = 2.0**-8 if qw.scales.dtype == jnp.bfloat16 else 2.0**-11
  return (0.5 if qw.symmetric else 1.0) * s + jnp.abs(jnp.asarray(w, jnp.float32)) * eps


def layer_params(w: QuantizedWeight, bias=None) -> dict:
  """The parameter dict of one W4A16Dense / W4A16Linear holding `w` (and `bias`)."""
  p = {"qweight": w.qweight, "scales": w.scales}
  if w.qzeros is not None:
    p["qzeros"] = w.qzeros
  if w.perm is not None:
    p["perm"] = w.perm
  if bias is not None:
    p["bias"] = bias
  return p


def quantize_dense_params(params, select: Callable[[tuple[str, ...]], bool] = lambda path: True, *,
                          group_size: int = 128, symmetric: bool = True, dtype=jnp.bfloat16):
  """Walks a Flax linen params tree; every Dense ({'kernel' [K, N], 'bias'?}) whose path `select` accepts becomes
  W4A16Dense params (bias cast to `dtype`).  Other leaves pass through.  Use with a model whose selected layers
  are W4A16Dense (same names)."""

  def walk(node, path):
    if isinstance(node, dict) or hasattr(node, "items"):
      node = dict(node)
      kernel = node.get("kernel")
      if kernel is not None and getattr(kernel, "ndim", 0) == 2 and select(path):
        bias = node.get("bias")
        qw = quantize(kernel, group_size=group_size, symmetric=symmetric, dtype=dtype)
        return layer_params(qw, None if bias is None else jnp.asarray(bias, dtype))
      return {key: walk(v, path + (key,)) for key, v in node.items()}
    return node

  return walk(params, ())


def weight_from_params(p: dict, group_size: int, zp_bias: int = 8, packing: str = "gptq") -> QuantizedWeight:
  return QuantizedWeight(p["qweight"], p["scales"], p.get("qzeros"), p.get("perm"), group_size, zp_bias, packing)


__all__ = ["error_bound", "layer_params", "quantize", "quantize_dense_params", "weight_from_params"]
