"""The op on the CPU (reference path): dispatch, jit, vmap, grad, act-order, and every bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jw4a16
from jw4a16 import ops
from tests.helpers import assert_close, make_weights, make_x

K, N, G = 256, 64, 64


@pytest.fixture
def wts():
  return make_weights(K, N, G, symmetric=False)


def test_cpu_takes_reference_path_and_forcing(monkeypatch):
  assert jw4a16.resolve_backend() == "reference"
  monkeypatch.setenv("JW4A16_BACKEND", "reference")
  assert jw4a16.resolve_backend() == "reference"
  with pytest.raises(RuntimeError, match="backend='triton' was requested"):
    jw4a16.resolve_backend("triton")
  monkeypatch.setenv("JW4A16_BACKEND", "cuda")
  with pytest.raises(ValueError, match="must be one of"):
    jw4a16.resolve_backend()


def test_leading_dims_jit_vmap(wts):
  qw, s, qz, _, w = wts
  x = make_x((2, 3, K))
  ref = np.asarray(x, np.float64) @ w
  op = lambda x: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=G)  # noqa: E731
  assert_close(op(x), ref, "bfloat16")
  assert_close(jax.jit(op)(x), ref, "bfloat16")
  assert_close(jax.jit(jax.vmap(jax.vmap(op)))(x), ref, "bfloat16")


def test_empty_m(wts):
  qw, s, qz, _, _ = wts
  out = jw4a16.w4a16_matmul(jnp.zeros((0, 5, K), jnp.bfloat16), qw, s, qz, group_size=G)
  assert out.shape == (0, 5, N)


def test_grad_raises(wts):
  qw, s, qz, _, _ = wts
  f = lambda x: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=G).astype(jnp.float32).sum()  # noqa: E731
  with pytest.raises(NotImplementedError, match="inference-only"):
    jax.grad(f)(make_x((2, K)))


def test_act_order_concrete_and_traced():
  qw, s, qz, g_idx, w = make_weights(K, N, G, act_order=True)
  x = make_x((3, K))
  ref = np.asarray(x, np.float64) @ w
  assert_close(jw4a16.w4a16_matmul(x, qw, s, qz, group_size=G, g_idx=g_idx), ref, "bfloat16")
  f = jax.jit(lambda x, g: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=G, g_idx=g))
  assert_close(f(x, jnp.asarray(g_idx)), ref, "bfloat16")
  bad = g_idx.copy()
  bad[0] = (bad[0] + 1) % (K // G)
  assert np.isnan(np.asarray(f(x, jnp.asarray(bad)), np.float32)).all()  # a failed check is loud, not wrong
  wt = jw4a16.QuantizedWeight.from_act_order(qw, s, qz, g_idx, group_size=G)
  assert wt.perm is not None
  assert_close(jw4a16.quantized_matmul(x, wt), ref, "bfloat16")


BAD = [
    (dict(x=np.zeros((2, K), np.float32)), TypeError, "x must be float16 or bfloat16, got float32"),
    (dict(qweight=np.zeros((K, N // 8), np.uint32)), TypeError, "qweight must be int32"),
    (dict(qweight=np.zeros((K, N // 8, 1), np.int32)), ValueError, "qweight must be .K, N // 8. int32"),
    (dict(x=np.zeros((2, K + 8), "bfloat16")), ValueError, "K mismatch: x.shape.-1.=264"),
    (dict(scales=np.zeros((K // G, N + 8), "bfloat16")), ValueError, "holds 64 columns but scales has N=72"),
    (dict(scales=np.zeros((K // G, 60), "bfloat16"), qweight=np.zeros((K, 7), np.int32)), ValueError,
     "N=60 .scales.shape.1.. must be a positive multiple of 8"),
    (dict(scales=np.zeros((K // G, N), np.float16)), TypeError, "scales must have x's dtype bfloat16, got float16"),
    (dict(scales=np.zeros((K // G + 1, N), "bfloat16")), ValueError, r"scales.shape=\(5, 64\), expected \[4, 64\]"),
    (dict(qzeros=np.zeros((K // G, N), np.int32)), ValueError, r"qzeros.shape=\(4, 64\), expected \[4, 8\]"),
    (dict(qzeros=np.zeros((K // G, N // 8), np.int8)), TypeError, "qzeros must be int32"),
    (dict(group_size=48), ValueError, "group_size=48 is not supported"),
    (dict(group_size=512, x=np.zeros((2, 768), "bfloat16"), qweight=np.zeros((768, 8), np.int32)), ValueError,
     "group_size=512 is not supported"),
    (dict(group_size=True), TypeError, "group_size must be an int"),
    (dict(g_idx=np.zeros((K + 1,), np.int32)), ValueError, r"g_idx must have shape \[K\]=\[256\]"),
    (dict(g_idx=np.full((K,), 9, np.int32)), ValueError, r"g_idx values must lie in \[0, 4\)"),
    (dict(g_idx=np.zeros((K,), np.int32)), ValueError, "g_idx gives group 0 256 rows"),
    (dict(g_idx=np.zeros((K,), np.float32)), TypeError, "g_idx must be an integer array"),
    (dict(perm=np.zeros((K,), np.int32)), ValueError, "perm must be a permutation"),
    (dict(zp_bias=16), ValueError, "zp_bias must be an int in"),
]


@pytest.mark.parametrize("override,exc,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input(wts, override, exc, match):
  qw, s, qz, _, _ = wts
  args = dict(x=make_x((2, K)), qweight=qw, scales=s, qzeros=qz, group_size=G)
  args.update(override)
  if "group_size" in override and "scales" not in override:
    kk = args["x"].shape[-1]
    args["scales"] = np.zeros((1, N), "bfloat16")
    args["qzeros"] = None
    del kk
  with pytest.raises(exc, match=match):
    jw4a16.w4a16_matmul(jnp.asarray(args.pop("x")), **args)


def test_k_not_multiple_of_group():
  x = make_x((2, 96))
  with pytest.raises(ValueError, match="K=96 .* must be a multiple of group_size=64"):
    jw4a16.w4a16_matmul(x, np.zeros((96, 1), np.int32), np.zeros((1, 8), "bfloat16"), group_size=64)


def test_bad_forced_config():
  with pytest.raises(ValueError, match="block_m=8"):
    jw4a16.KernelConfig(8, 64, 64)
  with pytest.raises(ValueError, match="power of two"):
    jw4a16.KernelConfig(16, 96, 64)


def test_huge_weights_refused():
  big = jax.ShapeDtypeStruct((2**20, 2**12), jnp.int32)  # 2**32 words
  with pytest.raises(ValueError, match="exceed 2\\*\\*31 - 1"):
    from jw4a16 import checks  # noqa: PLC0415

    checks.check_matmul_args(jax.ShapeDtypeStruct((1, 2**20), jnp.bfloat16), big,
                             jax.ShapeDtypeStruct((2**20 // 128, 2**15), jnp.bfloat16), None, 128, 8)


def test_triton_reason_on_cpu():
  assert "not a GPU" in ops.triton_unavailable_reason("cpu")


def test_split_counters_start_at_zero():
  """The split-K counters: zero where the kernel reads them; the default launch's constant ends in a 1 that no
  kernel reads (never an all-zero constant), the FFI launch's buffer is plain zeros made per call."""
  legacy = np.asarray(ops.split_counters(6, "legacy"))
  assert legacy.dtype == np.int32 and legacy.tolist() == [0] * 6 + [1]
  ffi = jax.jit(lambda: ops.split_counters(6, "ffi"))()
  assert ffi.dtype == jnp.int32 and np.asarray(ffi).tolist() == [0] * 6
