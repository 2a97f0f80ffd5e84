"""RMSNorm with the residual add folded in: the jnp reference against numpy, the Triton kernel in the interpreter
against the reference, argument checks and the dispatch (tests/test_gpu.py runs the kernel on a GPU)."""

import ml_dtypes
import numpy as np
import pytest

import jax.numpy as jnp

from jw4a16 import norm
from tests.interpret import run_rms_norm_kernel


def naive(x, weight, eps, residual=None):
  """float64 RMSNorm (after x + residual)."""
  x = np.asarray(x, np.float64) + (0 if residual is None else np.asarray(residual, np.float64))
  return np.asarray(weight, np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rand(shape, dtype, seed, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_matches_numpy(with_residual):
  x, w = _rand((3, 5, 64), np.float32, 0), _rand((64,), np.float32, 1)
  r = _rand((3, 5, 64), np.float32, 2) if with_residual else None
  got = norm.rms_norm_reference(jnp.asarray(x), jnp.asarray(w), 1e-5, None if r is None else jnp.asarray(r))
  if with_residual:
    got, res = got
    np.testing.assert_allclose(np.asarray(res), x + r, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got), naive(x, w, 1e-5, r), rtol=1e-4, atol=1e-5)


CASES = [  # rows, n, dtype, residual
    (1, 4096, ml_dtypes.bfloat16, True), (3, 4096, ml_dtypes.bfloat16, False), (5, 72, np.float16, True),
    (2, 8192, np.float16, False), (4, 896, ml_dtypes.bfloat16, True)]


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=[f"r{c[0]}-n{c[1]}-{np.dtype(c[2]).name}-res{int(c[3])}" for c in CASES])
def test_kernel_matches_reference(case):
  """Bit for bit where the rounding allows: the residual sum exactly, the norm within one step of the dtype (the
  kernel's fp32 sum runs in another order than XLA's)."""
  rows, n, dtype, with_res = case
  x, w = _rand((rows, n), dtype, 3, 3.0), _rand((n,), dtype, 4)
  r = _rand((rows, n), dtype, 5, 3.0) if with_res else None
  got = run_rms_norm_kernel(x, w, 1e-5, r)
  want = norm.rms_norm_reference(jnp.asarray(x), jnp.asarray(w), 1e-5, None if r is None else jnp.asarray(r))
  if with_res:
    (got, res), (want, want_res) = got, want
    np.testing.assert_array_equal(res.astype(np.float32), np.asarray(want_res, np.float32))
  got, want = got.astype(np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
  assert np.mean(got != want) < 0.02  # most values identical
  np.testing.assert_allclose(got, naive(x, w, 1e-5, r), rtol=2e-2, atol=2e-2)


def test_bad_arguments():
  x = jnp.zeros((2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"weight: expected \[N=64\], got shape \(32,\)"):
    norm.rms_norm(x, jnp.ones((32,), jnp.bfloat16), 1e-5)
  with pytest.raises(ValueError, match=r"residual: expected bfloat16 \(2, 64\) as x, got bfloat16 \(1, 64\)"):
    norm.rms_norm(x, jnp.ones((64,), jnp.bfloat16), 1e-5, residual=x[:1])
  with pytest.raises(ValueError, match="residual: expected bfloat16 .* got float16"):
    norm.rms_norm(x, jnp.ones((64,), jnp.bfloat16), 1e-5, residual=x.astype(jnp.float16))
  with pytest.raises(ValueError, match="x: expected"):
    norm.rms_norm(jnp.zeros((), jnp.bfloat16), jnp.ones((1,), jnp.bfloat16), 1e-5)


def test_dispatch_reasons(monkeypatch):
  x, w = jnp.zeros((2, 64), jnp.bfloat16), jnp.ones((64,), jnp.bfloat16)
  assert "dtypes" in norm.kernel_unavailable_reason(x.astype(jnp.float32), w.astype(jnp.float32))
  assert "dtypes" in norm.kernel_unavailable_reason(x, w.astype(jnp.float16))
  wide = jnp.zeros((1, 65536), jnp.bfloat16)
  assert "32768" in norm.kernel_unavailable_reason(wide, jnp.ones((65536,), jnp.bfloat16))
  monkeypatch.setenv(norm.DISABLE_ENV, "0")
  assert norm.DISABLE_ENV in norm.kernel_unavailable_reason(x, w)
  monkeypatch.delenv(norm.DISABLE_ENV)
  assert "Triton path cannot run" in norm.kernel_unavailable_reason(x, w)  # CPU: the reference
  out, res = norm.rms_norm(x, w, 1e-5, residual=x)
  assert out.shape == res.shape == x.shape
