import jax.numpy as jnp
import numpy as np
import pytest

from jw4a16.layout import AWQ_ORDER, awq_to_kernel, pack_int4, repack_k_to_n, unpack_int4


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jnp"])
@pytest.mark.parametrize("axis", [0, 1])
def test_round_trip(xp, axis):
  v = np.random.default_rng(0).integers(0, 16, (16, 24))
  packed = pack_int4(xp.asarray(v), axis=axis)
  assert packed.dtype == np.int32 and packed.shape == ((2, 24) if axis == 0 else (16, 3))
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed, axis=axis)), v)


def test_nibble_order_is_gptq_sequential():
  """Column 8j+i of row k sits in bits 4i..4i+3 of word (k, j)."""
  v = np.zeros((1, 16), np.int64)
  v[0, 8 + 3] = 0xA
  v[0, 0] = 0x5
  w = pack_int4(v, axis=1)
  assert w[0, 0] == 0x5 and w[0, 1] == 0xA << 12
  v = np.full((1, 8), 15)
  assert pack_int4(v, axis=1)[0, 0] == -1  # all ones: the sign bit is a nibble bit


def test_jnp_and_numpy_agree():
  v = np.random.default_rng(1).integers(0, 16, (8, 64))
  np.testing.assert_array_equal(np.asarray(pack_int4(jnp.asarray(v))), pack_int4(v))


def test_repack_k_to_n_is_not_a_transpose():
  v = np.random.default_rng(2).integers(0, 16, (32, 16))
  along_k = pack_int4(v, axis=0)  # [4, 16]
  np.testing.assert_array_equal(repack_k_to_n(along_k), pack_int4(v, axis=1))
  assert along_k.T.shape != repack_k_to_n(along_k).shape  # a transpose of the words cannot be the answer


def test_awq_order():
  v = np.random.default_rng(3).integers(0, 16, (4, 16))
  awq = pack_int4(v, order=AWQ_ORDER)
  # AWQ stores logical column AWQ_ORDER[i] in bits 4i
  for i, logical in enumerate(AWQ_ORDER):
    assert (awq[0, 0] >> (4 * i)) & 0xF == v[0, logical]
  np.testing.assert_array_equal(awq_to_kernel(awq), pack_int4(v))


def test_pack_rejects_bad_length():
  with pytest.raises(ValueError, match="multiple of 8"):
    pack_int4(np.zeros((3, 12), np.int32))
