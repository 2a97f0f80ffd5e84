"""The Triton kernel source on the CPU, in Triton's interpreter, against the float64 oracle."""

import numpy as np
import pytest

from jw4a16 import tuning
from tests.helpers import assert_close, make_weights, make_x

pytestmark = pytest.mark.interpret

MS = [1, 3, 16, 33, 130]
GROUPS = [32, 64, 128, 256, -1]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", MS)
def test_matrix_with_dispatched_configs(m, group_size, symmetric, dtype, act_order):
  """The config the H100 dispatcher picks for this M; N = 200 is a multiple of 8 but of no tile width."""
  from tests.interpret import run_kernel  # noqa: PLC0415 - imports triton after conftest set the interpreter

  k, n = 512, 200
  qw, s, qz, g_idx, w = make_weights(k, n, group_size, symmetric=symmetric, dtype=dtype, act_order=act_order)
  x = make_x((m, k), dtype)
  g = k if group_size == -1 else group_size
  cfg = tuning.select_config(m, k, n, g, dtype, not symmetric, tuning.H100)
  out = run_kernel(x, qw, s, qz, group_size=group_size, cfg=cfg, g_idx=g_idx)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


CONFIGS = [
    tuning.KernelConfig(1, 64, 64, split_k=3, unpack=0),  # GEMV, uneven split
    tuning.KernelConfig(1, 128, 32, split_k=1, unpack=1),  # GEMV, join unpack
    tuning.KernelConfig(16, 64, 128, split_k=4, unpack=0),
    tuning.KernelConfig(16, 32, 32, split_k=7),  # splits past K
    tuning.KernelConfig(32, 128, 64, split_k=2),
    tuning.KernelConfig(64, 64, 128),
    tuning.KernelConfig(128, 128, 64, num_warps=8),
    tuning.KernelConfig(16, 64, 64, split_k=3, swap_ab=1),  # out^T = W^T x^T, uneven split
    tuning.KernelConfig(32, 128, 32, swap_ab=1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("kng", [(512, 72, 128), (256, 40, 32), (200, 48, -1), (384, 24, 64)])
def test_tile_configs(cfg, kng):
  """Tile shapes, split-K (even, uneven, past K), K not a multiple of the tile (channelwise K = 200)."""
  from tests.interpret import run_kernel  # noqa: PLC0415

  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=False, dtype="bfloat16")
  x = make_x((5, k))
  assert_close(run_kernel(x, qw, s, qz, group_size=g, cfg=cfg), np.asarray(x, np.float64) @ w, "bfloat16")


GEMV_CONFIGS = [
    tuning.gemv_config(256, 8, 4, 1),
    tuning.gemv_config(512, 8, 2, 3),  # uneven split
    tuning.gemv_config(1024, 8, 1, 1),
    tuning.gemv_config(256, 8, 16, 5),  # splits past K
    tuning.gemv_config(512, 8, 4, 1, tuning.MI300X),  # 64-wide wavefronts
    tuning.gemv_config(256, 8, 4, 1, rows=2),  # two rows of x per program; M = 3 leaves the last one alone
    tuning.gemv_config(512, 8, 2, 3, rows=2),  # ... with an uneven split
]


@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kng", [(512, 72, 128), (256, 1040, 32), (200, 48, -1)])
def test_gemv_configs(cfg, dtype, kng):
  """The gemv kernel: several rows of x, N past one tile and not a multiple of it, K not a multiple of a step
  (channelwise K = 200), zero points."""
  from tests.interpret import run_kernel  # noqa: PLC0415

  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=False, dtype=dtype)
  x = make_x((3, k), dtype)
  assert_close(run_kernel(x, qw, s, qz, group_size=g, cfg=cfg), np.asarray(x, np.float64) @ w, dtype)


def test_gemv_symmetric_bias():
  """No qzeros: the zero is zp_bias (8 for uint4b8, or another stored bias)."""
  from tests.interpret import run_kernel  # noqa: PLC0415

  qw, s, _, _, w = make_weights(256, 64, 64)
  x = make_x((2, 256))
  assert_close(run_kernel(x, qw, s, None, group_size=64, cfg=tuning.gemv_config(256, 8, 4, 1)),
               np.asarray(x, np.float64) @ w, "bfloat16")


@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_amd_configs(m):
  """The configs the dispatcher picks on MI300 (64-wide wavefronts, AMD tile sizes)."""
  from tests.interpret import run_kernel  # noqa: PLC0415

  k, n = 1024, 136
  qw, s, qz, _, w = make_weights(k, n, 128, symmetric=True, dtype="float16")
  x = make_x((m, k), "float16")
  cfg = tuning.select_config(m, k, n, 128, "float16", False, tuning.MI300X)
  assert_close(run_kernel(x, qw, s, qz, group_size=128, cfg=cfg), np.asarray(x, np.float64) @ w, "float16")


def test_wrong_nibble_order_is_caught():
  """The tests can fail: swapping two nibbles of every word breaks the comparison."""
  from tests.interpret import run_kernel  # noqa: PLC0415

  from jw4a16.layout import pack_int4, unpack_int4  # noqa: PLC0415

  k, n = 256, 64
  qw, s, _, _, w = make_weights(k, n, 128)
  q = unpack_int4(qw, axis=1).reshape(k, n // 8, 8)[:, :, [1, 0, 2, 3, 4, 5, 6, 7]].reshape(k, n)
  x = make_x((4, k))
  for cfg in (tuning.KernelConfig(16, 64, 64), tuning.gemv_config(256, 8, 4, 1)):
    out = run_kernel(x, pack_int4(q, axis=1), s, None, group_size=128, cfg=cfg)
    with pytest.raises(AssertionError, match="rel"):
      assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group_size", [64, 128, -1])
@pytest.mark.parametrize("symmetric,dtype,act_order", [(True, "bfloat16", False), (False, "float16", True)])
def test_frag_with_dispatched_configs(m, group_size, symmetric, dtype, act_order):
  """The frag kernel (packing="fragment") with the configs the dispatcher picks for it on H100."""
  from tests.interpret import run_kernel  # noqa: PLC0415

  k, n = 256, 200
  qw, s, qz, g_idx, w = make_weights(k, n, group_size, symmetric=symmetric, dtype=dtype, act_order=act_order)
  x = make_x((m, k), dtype)
  cfg = tuning.select_config(m, k, n, k if group_size == -1 else group_size, dtype, not symmetric, tuning.H100,
                             "fragment")
  assert cfg.kernel == "frag"
  out = run_kernel(x, qw, s, qz, group_size=group_size, cfg=cfg, g_idx=g_idx)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)
