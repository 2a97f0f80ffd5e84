"""Test weights built through the real packing path, and the error metrics with their tolerances."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jw4a16.layout import pack_int4

# Relative error ||out - ref|| / ||ref|| and max |out - ref| / max |ref|, kernel against the reference.  Both
# sides dequantize to the same rounded weights, so what is left is fp32 summation order and the single rounding
# of the output to x's dtype.
TOL = {
    # bf16 output: a rounding is up to 2**-9 relative per element; 4e-3 on the norm and 2**-7 (two ulps) on
    # the max leave room for fp32 order differences and nothing for a wrong nibble (errors >= 1e-2).
    "bfloat16": dict(rel=4e-3, max=2**-7),
    # fp16 output: 2**-11 relative per element; same margins scaled.
    "float16": dict(rel=1e-3, max=2**-9),
}


def make_weights(k, n, group_size, *, symmetric=True, dtype="bfloat16", act_order=False, seed=0):
  """Random int4 weights packed by pack_int4; returns (qweight, scales, qzeros, g_idx, W) with W float64 [K, N]
  the exact dequantized weight (rounded to dtype, as the op rounds it)."""
  rng = np.random.default_rng(seed)
  g = k if group_size == -1 else group_size
  q = rng.integers(0, 16, (k, n))
  z = rng.integers(0, 16, (k // g, n)) if not symmetric else np.full((k // g, n), 8)
  s = (rng.random((k // g, n)) * 0.02 + 0.005).astype(np.float32).astype(getattr(ml_dtypes, dtype)
                                                                             if dtype == "bfloat16" else np.float16)
  g_idx = (rng.permutation(k) // g).astype(np.int32) if act_order else np.arange(k, dtype=np.int32) // g
  w = ((q - z[g_idx]) * s.astype(np.float32)[g_idx]).astype(s.dtype).astype(np.float64)
  qz = None if symmetric else pack_int4(z, axis=1)
  return pack_int4(q, axis=1), s, qz, (g_idx if act_order else None), w


def make_x(shape, dtype="bfloat16", seed=1):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return jnp.asarray(x, dtype)


def errors(out, ref):
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  assert np.isfinite(out).all(), "non-finite output"
  if ref.size == 0:
    return 0.0, 0.0
  rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
  mx = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
  return rel, mx


def assert_close(out, ref, dtype):
  rel, mx = errors(out, ref)
  tol = TOL[dtype]
  assert rel <= tol["rel"] and mx <= tol["max"], f"rel {rel:.2e} (tol {tol['rel']}), max {mx:.2e} (tol {tol['max']})"
