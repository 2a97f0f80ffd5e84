"""The experimental fragment-packed kernel (kernels/w4a16_frag.py) in Triton's interpreter, and its repack."""

import numpy as np
import pytest
import torch

from jw4a16 import layout
from tests.helpers import assert_close, make_weights, make_x


def test_to_fragment_packed_places_each_value():
  rng = np.random.default_rng(0)
  q = rng.integers(0, 16, (128, 88))  # [K, N]
  words = layout.to_fragment_packed(layout.pack_int4(q, axis=1))
  assert words.shape == (2, 1024) and words.dtype == np.int32
  u = words.astype(np.uint32)
  for n, k in [(0, 0), (3, 1), (5, 2), (7, 9), (11, 17), (23, 63), (2, 64), (19, 127), (64, 5), (87, 100)]:
    b, r = divmod(k, 64)
    qq, h, c, p = r // 16, (r // 8) % 2, (r // 2) % 4, r % 2
    word = 512 * b + 8 * (n % 64) + 2 * c + h
    assert (u[n // 64, word] >> (4 * (qq + 4 * p))) & 0xF == q[k, n], (n, k)
  with pytest.raises(ValueError, match="K = 72 rows, expected a multiple of 64"):
    layout.to_fragment_packed(layout.pack_int4(q[:72], axis=1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kng,bm,bk,split", [((256, 72, 128), 16, 64, 1), ((384, 136, 64), 16, 64, 4),
                                             ((256, 64, -1), 32, 128, 3), ((512, 80, 128), 16, 128, 2)])
@pytest.mark.parametrize("scale_w", [0, 1, 2])
def test_frag_kernel(kng, bm, bk, split, dtype, symmetric, scale_w):
  from jw4a16.kernels.w4a16_frag import w4a16_frag_kernel  # noqa: PLC0415
  from tests.interpret import _torch, patch_interpreter  # noqa: PLC0415

  patch_interpreter()
  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  x = np.asarray(make_x((bm + 3, k), dtype))
  m = x.shape[0]
  out = torch.full((m, n), float("nan"), dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16)
  partials = torch.full((split, m, n) if split > 1 else (1,), float("nan"))
  bn = 64
  grid = (-(-m // bm) * -(-n // bn), split)
  locks = torch.zeros(grid[0] if split > 1 else 1, dtype=torch.int32)
  st = _torch(s)
  w4a16_frag_kernel[grid](_torch(x), _torch(layout.to_fragment_packed(np.asarray(qw))), st,
                          st if qz is None else _torch(qz), m, locks, out, partials, N=n, K=k,
                          GROUP_SIZE=k if g == -1 else g, HAS_ZP=qz is not None, ZP_BIAS=8, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, SPLIT_K=split, SCALE_W=scale_w)
  assert_close(out.float().numpy(), np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,split,scale_w", [(72, 1, 1), (136, 3, 2), (64, 2, 2)])
def test_frag_kernel_groups_of_32(n, split, scale_w, dtype, symmetric):
  """Groups of 32: pieces 0 - 1 of each 64-value block take the first group's scale and zero, 2 - 3 the second's."""
  from jw4a16.kernels.w4a16_frag import w4a16_frag_kernel  # noqa: PLC0415
  from tests.interpret import _torch, patch_interpreter  # noqa: PLC0415

  patch_interpreter()
  k, g, bm, bn = 256, 32, 16, 64
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  x = np.asarray(make_x((bm + 3, k), dtype))
  m = x.shape[0]
  out = torch.full((m, n), float("nan"), dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16)
  partials = torch.full((split, m, n) if split > 1 else (1,), float("nan"))
  grid = (-(-m // bm) * -(-n // bn), split)
  locks = torch.zeros(grid[0] if split > 1 else 1, dtype=torch.int32)
  st = _torch(s)
  w4a16_frag_kernel[grid](_torch(x), _torch(layout.to_fragment_packed(np.asarray(qw))), st,
                          st if qz is None else _torch(qz), m, locks, out, partials, N=n, K=k, GROUP_SIZE=g,
                          HAS_ZP=qz is not None, ZP_BIAS=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=split,
                          SCALE_W=scale_w)
  assert_close(out.float().numpy(), np.asarray(x, np.float64) @ w, dtype)


def test_kernel_block_of_columns_is_the_packings():
  from jw4a16 import checks  # noqa: PLC0415
  from jw4a16.kernels import w4a16_frag  # noqa: PLC0415

  assert w4a16_frag.ROW_BLOCK == checks.FRAGMENT_ROWS
