"""w4a16_matmul(..., partials=True): the split-K slots a consumer sums itself.  The frag kernel's PARTIALS in
Triton's interpreter (its slots summed in order are bit for bit what its epilogue writes), the op's other paths,
vmap, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jw4a16
from jw4a16 import reference
from tests.helpers import make_weights, make_x
from tests.test_fused_norm import EPS, run_frag_norm_kernel


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("norm", [0, 1, 2])
@pytest.mark.parametrize("m,bn,split,scale_w,symmetric", [(1, 64, 1, 2, True), (3, 128, 3, 0, False),
                                                          (19, 64, 2, 1, True), (2, 64, 8, 2, True)])
def test_kernel_slots_sum_to_the_epilogue_output(m, bn, split, scale_w, symmetric, norm, dtype):
  """Every slot written (split 8 over K = 256 leaves splits with no K steps: zeros), and their sum in slot order
  rounded to the dtype equals the plain launch's output bit for bit."""
  k, n, g = 256, 192, 128
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  h = jnp.asarray(3.0 * np.asarray(make_x((m, k), "float32", 2)), dtype)
  gamma = jnp.linspace(0.5, 1.5, k).astype(dtype) if norm == 1 else None
  ssq = reference.sum_squares(h) if norm else None
  kw = dict(group_size=g, gamma=gamma, ssq=ssq, res=None, block_m=16, block_n=bn, block_k=64, split=split,
            scale_w=scale_w)
  slots = run_frag_norm_kernel(h, qw, s, qz, partials=True, **kw)
  assert slots.shape == (split, m, n) and np.isfinite(slots).all()
  out = run_frag_norm_kernel(h, qw, s, qz, **kw)[0]
  summed = np.asarray(reference.sum_partials(jnp.asarray(slots), dtype), np.float32)
  np.testing.assert_array_equal(summed, out)
  if split > 1:  # more than one slot carries the product: each alone is not it
    assert np.abs(slots[0] - out).max() > 0


@pytest.fixture
def wts():
  return make_weights(256, 128, 64, symmetric=False)


def test_op_reference_path_is_one_slot(wts):
  qw, s, qz, _, _ = wts
  x = make_x((2, 3, 256))
  gamma = jnp.linspace(0.5, 1.5, 256).astype(jnp.bfloat16)
  for kw in ({}, dict(norm_weight=gamma, norm_eps=EPS)):
    op = lambda x, p: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64, partials=p, **kw)  # noqa: B023, E731
    out, slots = op(x, False), op(x, True)
    assert slots.shape == (1, 2, 3, 128) and slots.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(reference.sum_partials(slots, jnp.bfloat16), np.float32),
                                  np.asarray(out, np.float32))


def test_op_vmap_keeps_the_slot_axis_after_the_batch(wts):
  qw, s, qz, _, _ = wts
  x = make_x((4, 2, 256))
  slots = jax.vmap(lambda x: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64, partials=True))(x)
  assert slots.shape == (4, 1, 2, 128)
  np.testing.assert_array_equal(np.asarray(slots[:, 0]),
                                np.asarray(jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64), np.float32))


def test_op_partials_refuse_a_residual(wts):
  qw, s, qz, _, _ = wts
  with pytest.raises(ValueError, match="partials=True with a residual"):
    jw4a16.w4a16_matmul(make_x((2, 256)), qw, s, qz, group_size=64, partials=True,
                        residual=jnp.ones((2, 128), jnp.bfloat16))


def test_sum_partials_adds_in_slot_order_and_rounds_once():
  # 1 + 2^-8 + 2^-8 in bfloat16 steps would stay 1 (each half-ulp add rounds to even); in fp32 it is 1 + 2^-7
  slots = jnp.asarray([[1.0], [2.0**-8], [2.0**-8]], jnp.float32)
  assert float(reference.sum_partials(slots, jnp.bfloat16)[0]) == 1.0 + 2.0**-7
  with pytest.raises(ValueError, match=r"partials: expected float32 \[S, \.\.\., N\] slots"):
    reference.sum_partials(jnp.ones((2, 3), jnp.bfloat16), jnp.bfloat16)


def test_op_partials_with_act_order():
  qw, s, qz, g_idx, _ = make_weights(256, 64, 64, act_order=True)
  x = make_x((3, 256))
  out = jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64, g_idx=g_idx)
  slots = jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64, g_idx=g_idx, partials=True)
  assert slots.shape == (1, 3, 64)
  np.testing.assert_array_equal(np.asarray(reference.sum_partials(slots, jnp.bfloat16), np.float32),
                                np.asarray(out, np.float32))
