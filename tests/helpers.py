"""Test weights built through the real packing path, and the error metrics with their tolerances."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jw4a16.layout import pack_int4

# Relative error ||out - ref|| / ||ref|| and max |out - ref| / max |ref|, against the float64 product of x and the
# dequantized weight rounded once to x's dtype (what the reference computes).  The kernel applies scales to fp32
# partial sums and never rounds the weight, so the difference is that weight rounding (2**-9 relative per weight
# in bf16, 2**-12 in fp16, averaging out over K) plus the output rounding; measured ~1.5e-3 (bf16) and ~2e-4
# (fp16) on the norm.
TOL = {
    # bf16: 4e-3 on the norm and 2**-7 (two output ulps) on the max leave room for the above and nothing for a
    # wrong nibble, scale or zero (errors >= 1e-2; tests/test_kernel_interpret.py::test_wrong_nibble_order_is_caught)
    "bfloat16": dict(rel=4e-3, max=2**-7),
    # fp16: the same margins scaled by the 8x finer mantissa.
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
