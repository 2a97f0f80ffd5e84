import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jw4a16
from tests.helpers import assert_close, make_weights, make_x


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_against_float64(group_size, symmetric, dtype, act_order):
  k, n = 256, 48
  qw, s, qz, g_idx, w = make_weights(k, n, group_size, symmetric=symmetric, dtype=dtype, act_order=act_order)
  x = make_x((2, 3, k), dtype)
  out = jw4a16.w4a16_matmul_reference(x, qw, s, qz, group_size=group_size, g_idx=g_idx)
  assert out.dtype == x.dtype and out.shape == (2, 3, n)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)
  # the dequantized weight itself is exact (one rounding of (q - z) * s to the scales' dtype)
  deq = jw4a16.dequantize(qw, s, qz, group_size=group_size, g_idx=g_idx)
  np.testing.assert_array_equal(np.asarray(deq, np.float64), w)


def test_reference_perm_equals_g_idx():
  qw, s, qz, g_idx, w = make_weights(256, 32, 64, act_order=True)
  x = make_x((4, 256))
  qwt = jw4a16.QuantizedWeight.from_act_order(qw, s, qz, g_idx, group_size=64)
  a = jw4a16.w4a16_matmul_reference(x, qwt.qweight, qwt.scales, qwt.qzeros, group_size=64, perm=qwt.perm)
  b = jw4a16.w4a16_matmul_reference(x, qw, s, qz, group_size=64, g_idx=g_idx)
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_jit_of_reference():
  qw, s, qz, _, w = make_weights(128, 16, 64)
  x = make_x((3, 128))
  out = jax.jit(lambda x: jw4a16.w4a16_matmul_reference(x, qw, s, qz, group_size=64))(x)
  assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")
