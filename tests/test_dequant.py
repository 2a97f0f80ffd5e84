"""The dequantize-then-GEMM route: its Triton kernel (kernels/dequant.py) in the interpreter, bit for bit against
`reference.dequantize_fragment_nk`, and the route's switch ($JW4A16_DEQUANT; tests/test_gpu.py runs the kernel and
the route on a GPU)."""

import numpy as np
import pytest

import jax.numpy as jnp

from jw4a16 import layout, ops
from jw4a16.reference import dequantize_fragment_nk
from tests.helpers import assert_close, make_weights, make_x
from tests.interpret import run_dequant_kernel

CASES = [  # k, n, group, symmetric, dtype, block_k
    (256, 128, 128, True, "bfloat16", 256), (512, 72, 32, False, "float16", 256), (512, 64, -1, True, "bfloat16", 128),
    (384, 200, 64, False, "bfloat16", 128), (256, 64, 256, True, "float16", 64), (256, 136, 128, False, "bfloat16", 64)]


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=[f"k{c[0]}-n{c[1]}-g{c[2]}-{'sym' if c[3] else 'asym'}-{c[4]}-bk{c[5]}"
                                             for c in CASES])
def test_kernel_matches_reference_bit_for_bit(case):
  k, n, group, symmetric, dtype, block_k = case
  qw, s, qz, _, w = make_weights(k, n, group, symmetric=symmetric, dtype=dtype)
  words = layout.to_fragment_packed(qw)
  got = run_dequant_kernel(words, s, qz, group_size=group, block_k=block_k)
  want = np.asarray(dequantize_fragment_nk(jnp.asarray(words), jnp.asarray(s), None if qz is None else jnp.asarray(qz),
                                           group_size=group)).T
  assert got.dtype == want.dtype and got.shape == (k, n)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  np.testing.assert_array_equal(got.astype(np.float64), w)  # and both are the exact dequantized weight


def test_block_k_divides_k():
  assert [ops._dequant_block_k(k) for k in (4096, 14336, 384, 320, 64)] == [256, 256, 128, 64, 64]


def test_route_switch_rejects_unknown_values(monkeypatch):
  qw, s, _, _, _ = make_weights(256, 64, 128)
  monkeypatch.setenv(ops.DEQUANT_ENV, "cuda")
  with pytest.raises(ValueError, match="JW4A16_DEQUANT='cuda' must be one of"):
    ops.dequant_gemm(make_x((4, 256)), jnp.asarray(qw), jnp.asarray(s), None, group_size=128, zp_bias=8)


@pytest.mark.parametrize("packing", ["gptq", "fragment"])
def test_xla_route_matches_float64(monkeypatch, packing):
  """The route without the kernel ($JW4A16_DEQUANT=xla for the fragment packing; the GPTQ packing always)."""
  qw, s, qz, _, w = make_weights(256, 64, 64, symmetric=False)
  monkeypatch.setenv(ops.DEQUANT_ENV, "xla")
  x = make_x((5, 256))
  qweight = layout.to_fragment_packed(qw) if packing == "fragment" else qw
  out = ops.dequant_gemm(x, jnp.asarray(qweight), jnp.asarray(s), jnp.asarray(qz), group_size=64, zp_bias=8,
                         packing=packing)
  assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")
