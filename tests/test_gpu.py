"""The full jax.jit -> jax-triton -> kernel path on a GPU (JW4A16_TEST_GPU=1 pytest -m gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jw4a16
from jw4a16 import tuning
from tests.helpers import assert_close, make_weights, make_x

pytestmark = pytest.mark.gpu

MS = [1, 3, 16, 33, 130]
GROUPS = [32, 64, 128, 256, -1]


def test_gpu_path_is_triton():
  assert jw4a16.resolve_backend() == "triton"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("act_order", [False, True])
def test_jit_matches_reference(m, group_size, symmetric, dtype, act_order):
  k, n = 512, 200
  qw, s, qz, g_idx, w = make_weights(k, n, group_size, symmetric=symmetric, dtype=dtype, act_order=act_order)
  x = make_x((m, k), dtype)
  f = jax.jit(lambda x, qw, s, qz: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=group_size, g_idx=g_idx))
  out = f(x, jnp.asarray(qw), jnp.asarray(s), None if qz is None else jnp.asarray(qz))
  assert out.dtype == x.dtype and out.shape == (m, n)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256, 1024])
@pytest.mark.parametrize("kn", [(4096, 6144), (14336, 4096)])
def test_real_shapes_every_bucket(m, kn):
  k, n = kn
  qw, s, qz, _, w = make_weights(k, n, 128, dtype="bfloat16")
  x = make_x((m, k))
  out = jax.jit(lambda x: jw4a16.w4a16_matmul(x, qw, s, group_size=128))(x)
  assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")


def test_leading_dims_vmap_and_nesting():
  k, n = 256, 64
  qw, s, qz, _, w = make_weights(k, n, 64, symmetric=False)
  x = make_x((2, 3, 5, k))
  ref = np.asarray(x, np.float64) @ w
  op = lambda x: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64)  # noqa: E731
  assert_close(jax.jit(op)(x), ref, "bfloat16")
  assert_close(jax.vmap(op)(x), ref, "bfloat16")
  assert_close(jax.jit(jax.vmap(jax.vmap(op)))(x), ref, "bfloat16")
  # vmap over stacked weights (one launch per member)
  qws = jnp.stack([qw, qw]); ss = jnp.stack([s, s]); qzs = jnp.stack([qz, qz])
  out = jax.vmap(lambda x, a, b, c: jw4a16.w4a16_matmul(x, a, b, c, group_size=64))(x[:2, 0], qws, ss, qzs)
  assert_close(out, ref[:2, 0], "bfloat16")


def test_empty_m():
  qw, s, _, _, _ = make_weights(128, 64, 64)
  out = jax.jit(lambda x: jw4a16.w4a16_matmul(x, qw, s, group_size=64))(jnp.zeros((0, 128), jnp.bfloat16))
  assert out.shape == (0, 64)


@pytest.mark.parametrize("cfg", sorted({c for m in (1, 16, 64, 512) for c in tuning.candidate_configs(
    m, 1024, 512, 128)}, key=str)[::7])
def test_candidate_configs(cfg):
  """A spread of the tuning space compiles and computes the right thing on this GPU."""
  qw, s, _, _, w = make_weights(1024, 512, 128)
  x = make_x((max(cfg.block_m, 3), 1024))
  out = jw4a16.w4a16_matmul(x, qw, s, group_size=128, config=cfg, backend="triton")
  assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")


@pytest.mark.parametrize("cfg", [tuning.gemv_config(bn, bk, lanes, split) for bn, bk, lanes, split in (
    (256, 8, 4, 1), (512, 8, 2, 3), (1024, 8, 1, 1), (256, 8, 16, 5), (512, 8, 4, 8), (2048, 8, 8, 2))], ids=str)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kng", [(4096, 6144, 128), (200, 1040, -1), (512, 72, 32)])
def test_gemv_configs(cfg, dtype, symmetric, kng):
  """The gemv kernel on the GPU: uneven and past-K splits, N past and not a multiple of a tile, K not a
  multiple of a step, zero points, both dtypes, several rows of x."""
  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  x = make_x((3, k), dtype)
  out = jw4a16.w4a16_matmul(x, qw, s, qz, group_size=g, config=cfg, backend="triton")
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("cfg", [tuning.KernelConfig(bm, bn, bk, split_k=split, num_stages=3, swap_ab=1)
                                 for bm, bn, bk, split in ((16, 64, 128, 4), (32, 64, 64, 3), (16, 128, 64, 1),
                                                           (8, 64, 128, 2))], ids=str)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kng", [(4096, 6144, 128), (200, 1040, -1), (512, 72, 32)])
def test_swap_ab_configs(cfg, dtype, symmetric, kng):
  """The swapped tile (out^T = W^T x^T) on the GPU: M not a multiple of its rows, uneven splits, N past and not
  a multiple of a tile, K not a multiple of a step, zero points, both dtypes."""
  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  x = make_x((2 * cfg.block_m + 3, k), dtype)
  cfg = tuning.legalize(cfg, k, k if g == -1 else g)
  out = jw4a16.w4a16_matmul(x, qw, s, qz, group_size=g, config=cfg, backend="triton")
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


SPLIT_CONFIGS = [tuning.gemv_config(512, 8, 4, 32), tuning.gemv_config(512, 8, 2, 7),
                 tuning.gemv_config(256, 8, 16, 16, rows=2),
                 tuning.KernelConfig(16, 128, 64, split_k=32), tuning.KernelConfig(64, 64, 128, split_k=5),
                 tuning.KernelConfig(16, 64, 128, split_k=8, swap_ab=1)]


@pytest.mark.parametrize("cfg", SPLIT_CONFIGS, ids=str)
def test_split_k_epilogue_is_exact_and_deterministic(cfg):
  """The last program of each tile sums every slot in slot order: 30 launches over many tiles (each a race
  between the programs of a tile) give bitwise the same output, and it is right.  A program that read a slot
  before its writer finished would make the runs differ (the workspace is not cleared between launches)."""
  k, n = 8192, 4096
  qw, s, _, _, w = make_weights(k, n, 128)
  x = make_x((2 if cfg.kernel == "gemv" else 40, k))
  f = jax.jit(lambda x, qw: [jw4a16.w4a16_matmul(x, qw, s, group_size=128, config=cfg, backend="triton")
                             for _ in range(3)])
  outs = [np.asarray(o).view(np.uint16) for _ in range(10) for o in f(x, qw)]
  assert all((o == outs[0]).all() for o in outs)
  assert_close(outs[0].view(jnp.bfloat16), np.asarray(x, np.float64) @ w, "bfloat16")


@pytest.mark.parametrize("packing", ["gptq", "fragment", "auto"])
@pytest.mark.parametrize("name", ["jw4a16/assets/tiny-llama-w4a16", "tests/fixtures/llama-w4a16-asym",
                                  "tests/fixtures/llama-w4a16-lmhead"])
def test_llama_logits_on_gpu(name, packing):
  """The real checkpoint through the Triton path: logits against transformers' (bf16 tolerance)."""
  import json  # noqa: PLC0415

  from jw4a16.models import llama  # noqa: PLC0415

  m = llama.load(name, progress=False, packing=packing)
  if packing == "auto":  # H100 / H200 load the fragment packing
    want = "fragment" if jw4a16.ops.current_target().name in tuning.FRAGMENT_TARGETS else "gptq"
    assert {spec[3] for _, spec in m.quant.layers} == {want}
  fx = json.load(open(f"{name}/fixture.json"))
  ref = np.load(f"{name}/reference_logits.npy")
  got = np.asarray(m(np.array([fx["input_ids"]])))
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2
  r = m.generate(np.array([fx["input_ids"]]), 8)
  assert r.tokens.shape == (1, 8)


@pytest.mark.parametrize("cfg", [None, SPLIT_CONFIGS[0], SPLIT_CONFIGS[2]], ids=str)
def test_ffi_and_legacy_launchers_agree(monkeypatch, cfg):
  """Both launchers run the same compiled kernel: bitwise equal outputs, and each lowers to its own target."""
  from jw4a16 import launch, ops  # noqa: PLC0415

  k, n = 4096, 1024
  qw, s, qz, _, _ = make_weights(k, n, 128, symmetric=False)
  x = make_x((3, k))
  outs = {}
  for launcher in ("ffi", "legacy"):
    monkeypatch.setenv(launch.LAUNCHER_ENV, launcher)
    ops._batched_kernel_call.cache_clear()  # the launcher is read when a shape is first traced: trace afresh
    f = jax.jit(lambda x, qw: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=128, config=cfg, backend="triton"))
    text = f.lower(x, qw).as_text()
    target = launch.FFI_TARGET if launcher == "ffi" else launch.LEGACY_TARGET
    assert f"@{target}(" in text, text[:2000]
    outs[launcher] = np.asarray(f(x, qw)).view(np.uint16)
  assert (outs["ffi"] == outs["legacy"]).all()


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gemv_two_rows_per_program(m, symmetric):
  """Two rows of x per gemv program, odd M included (the last program's second row is computed, not stored)."""
  k, n = 4096, 1000
  qw, s, qz, _, w = make_weights(k, n, 128, symmetric=symmetric)
  x = make_x((m, k))
  cfg = tuning.gemv_config(256, 8, 16, 8, rows=2)
  out = jax.jit(lambda x: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=128, config=cfg, backend="triton"))(x)
  assert out.shape == (m, n)
  assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fragment_jit_matches_reference(m, group_size, symmetric, dtype):
  """packing="fragment" through the dispatcher (act-order weights: sorted once, then repacked, perm passed)."""
  k, n = 512, 200
  qw, s, qz, g_idx, w = make_weights(k, n, group_size, symmetric=symmetric, dtype=dtype, act_order=symmetric)
  qweight = jw4a16.QuantizedWeight.from_act_order(qw, s, qz, g_idx if symmetric else np.arange(k) // (
      k if group_size == -1 else group_size), group_size=group_size).repack("fragment")
  x = make_x((m, k), dtype)
  out = jax.jit(lambda x, w: jw4a16.quantized_matmul(x, w))(x, qweight)
  assert out.dtype == x.dtype and out.shape == (m, n)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


FRAG_CONFIGS = [tuning.KernelConfig(bm, bn, bk, split_k=split, num_warps=warps, num_stages=stages, kernel="frag",
                                    scale_w=sw)
                for bm, bn, bk, split, warps, stages, sw in (
                    (8, 64, 128, 1, 4, 3, 0), (8, 128, 128, 4, 4, 3, 1), (16, 64, 128, 3, 4, 3, 0),
                    (16, 64, 64, 8, 4, 4, 1), (32, 128, 128, 2, 8, 2, 1), (64, 128, 128, 1, 4, 3, 1),
                    (64, 64, 64, 5, 4, 4, 1), (128, 128, 64, 2, 8, 3, 1), (128, 256, 64, 1, 8, 4, 1),
                    (256, 128, 64, 1, 8, 3, 1), (8, 128, 128, 4, 4, 3, 2), (16, 64, 128, 8, 4, 3, 2),
                    (64, 128, 128, 1, 4, 3, 2), (128, 64, 64, 1, 4, 3, 2),
                    # the H100 heuristic's SCALE_W = 2 tiles at M = 32 and 128 - 256 (not yet run on a GPU here)
                    (32, 64, 128, 4, 4, 3, 2), (128, 128, 64, 2, 8, 3, 2))]


@pytest.mark.parametrize("cfg", FRAG_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kng", [(4096, 6144, 128), (256, 1040, -1), (512, 72, 64), (1024, 200, 32)])
def test_frag_configs(cfg, dtype, symmetric, kng):
  """The frag kernel's tiles on the GPU: M not a multiple of its rows, even, uneven and empty splits, N past and
  not a multiple of a tile, zero points, both dtypes, both scale placements, the inline-PTX unpacking."""
  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  x = make_x((2 * cfg.block_m + 3, k), dtype)
  cfg = tuning.legalize(cfg, k, k if g == -1 else g)
  fq = jw4a16.layout.to_fragment_packed(qw)
  out = jw4a16.w4a16_matmul(x, fq, s, qz, group_size=g, packing="fragment", config=cfg, backend="triton")
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32, 64, 128, 131, 256, 1024])
@pytest.mark.parametrize("kn", [(4096, 6144), (14336, 4096), (4096, 28672), (28672, 8192)])
@pytest.mark.parametrize("dtype,symmetric", [("bfloat16", True), ("float16", True), ("float16", False)])
def test_fragment_real_shapes_every_bucket(m, kn, dtype, symmetric):
  """The shipped table's frag entries (and the dequantize-then-GEMM route from the fragment packing at M = 1024);
  float16 symmetric is where session 7's racing configs failed (test_frag_scaled_weights_do_not_race)."""
  k, n = kn
  qw, s, qz, _, w = make_weights(k, n, 128, dtype=dtype, symmetric=symmetric)
  fq = jw4a16.layout.to_fragment_packed(qw)
  x = make_x((m, k), dtype)
  out = jax.jit(lambda x: jw4a16.w4a16_matmul(x, fq, s, qz, group_size=128, packing="fragment"))(x)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,dtype", [(4096, "bfloat16"), (4096, "float16"), (8192, "bfloat16")])
def test_fragment_lm_head_shape(m, k, dtype):
  """Llama-3-8B's and -70B's lm_heads in int4 (4096 / 8192 x 128256; the 8B one is llama_bench's w4a16-int4-head):
  the table's M = 1 and 16 entries for them."""
  n = 128256
  qw, s, qz, _, w = make_weights(k, n, 128, dtype=dtype)
  fq = jw4a16.layout.to_fragment_packed(qw)
  x = make_x((m, k), dtype)
  out = jax.jit(lambda x: jw4a16.w4a16_matmul(x, fq, s, qz, group_size=128, packing="fragment"))(x)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("kng", [(4096, 6144, 128), (14336, 4096, 128), (512, 200, 32), (768, 72, -1), (320, 64, 64)])
@pytest.mark.parametrize("dtype,symmetric", [("bfloat16", True), ("float16", False)])
@pytest.mark.parametrize("launcher", ["legacy", "ffi"])
def test_dequant_kernel_is_bit_identical_to_the_reference(kng, dtype, symmetric, launcher, monkeypatch):
  """The dequantize-then-GEMM route's W [K, N] from the fragment packing (kernels/dequant.py), and the route's
  product at M = 512 against float64."""
  from jw4a16 import ops  # noqa: PLC0415
  from jw4a16.reference import dequantize_fragment_nk  # noqa: PLC0415

  monkeypatch.delenv(ops.DEQUANT_ENV, raising=False)
  k, n, g = kng
  qw, s, qz, _, w = make_weights(k, n, g, dtype=dtype, symmetric=symmetric)
  fq = jnp.asarray(jw4a16.layout.to_fragment_packed(qw))
  qz = None if qz is None else jnp.asarray(qz)
  got = jax.jit(lambda a, b, c: ops.dequantize_fragment_call(a, b, c, group_size=g, zp_bias=8, dtype=b.dtype,
                                                             launcher=launcher))(fq, jnp.asarray(s), qz)
  want = jax.jit(lambda a, b, c: dequantize_fragment_nk(a, b, c, group_size=g).T)(fq, jnp.asarray(s), qz)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
  x = make_x((512, k), dtype)
  out = jax.jit(lambda x: jw4a16.w4a16_matmul(x, fq, s, qz, group_size=g, packing="fragment"))(x)
  assert_close(out, np.asarray(x, np.float64) @ w, dtype)


@pytest.mark.parametrize("case", [
    # (K, N, M, dtype, config): where wgmmas left in flight across the K loop gave wrong results before session 9
    (8192, 57344, 1, "bfloat16", tuning.KernelConfig(16, 128, 128, num_warps=4, num_stages=3, kernel="frag",
                                                     scale_w=1)),  # 4.5 - 58 % error in 20 of 20 launches
    (4096, 6144, 131, "bfloat16", tuning.KernelConfig(64, 128, 128, num_warps=8, num_stages=4, kernel="frag",
                                                      scale_w=1)),  # 44 % once
    (4096, 6144, 64, "float16", tuning.KernelConfig(64, 128, 128, num_warps=8, num_stages=3, kernel="frag",
                                                    scale_w=1)),  # 0.4 - 13 % in session 7
    # the same tiles with the scales read as int32 pairs (SCALE_W = 2, session 11)
    (8192, 57344, 1, "bfloat16", tuning.KernelConfig(16, 128, 128, num_warps=4, num_stages=3, kernel="frag",
                                                     scale_w=2)),
    (4096, 6144, 64, "float16", tuning.KernelConfig(64, 128, 128, num_warps=8, num_stages=3, kernel="frag",
                                                    scale_w=2)),
], ids=lambda c: f"{c[0]}x{c[1]}-m{c[2]}-{c[3]}-sw{c[4].scale_w}")
def test_frag_scaled_weights_do_not_race(case):
  """SCALE_W = 1 chains the accumulator through the K loop's dots; the kernel makes each step wait for its wgmmas
  (kernels/w4a16_frag.py).  Twenty launches of each config that raced without it."""
  k, n, m, dtype, cfg = case
  qw, s, _, _, w = make_weights(k, n, 128, dtype=dtype)
  fq = jnp.asarray(jw4a16.layout.to_fragment_packed(qw))
  f = jax.jit(lambda x, q: jw4a16.w4a16_matmul(x, q, s, group_size=128, packing="fragment", config=cfg,
                                               backend="triton"))
  x = make_x((m, k), dtype)
  want = np.asarray(x, np.float64) @ w
  for _ in range(20):
    assert_close(f(x, fq), want, dtype)


@pytest.mark.parametrize("packing", ["gptq", "fragment"])
def test_split_k_counters_are_left_zero_for_the_next_launch(packing):
  """ops passes the split-K counters as a constant of the program, never zeroed again: each launch must leave them
  zero.  A scan runs two configs with the same number of tiles (XLA may merge their equal constants) five times,
  each on other rows; a counter left at SPLIT_K would stop the next launch from writing its output."""
  k, n = 4096, 1024
  qw, s, _, _, w = make_weights(k, n, 128)
  q = jnp.asarray(jw4a16.layout.to_fragment_packed(qw)) if packing == "fragment" else jnp.asarray(qw)
  kernel = "frag" if packing == "fragment" else "tile"
  cfgs = [tuning.KernelConfig(16, 64, 128, split_k=split, kernel=kernel) for split in (4, 8)]

  def step(carry, x):
    return carry, [jw4a16.w4a16_matmul(x, q, s, group_size=128, packing=packing, config=c, backend="triton")
                   for c in cfgs]

  xs = make_x((5, 16, k))
  f = jax.jit(lambda xs: jax.lax.scan(step, 0, xs)[1])
  for _ in range(2):
    for outs in f(xs):
      for i in range(5):
        assert_close(outs[i], np.asarray(xs[i], np.float64) @ w, "bfloat16")


def test_frag_split_k_is_deterministic():
  k, n = 8192, 4096
  qw, s, _, _, w = make_weights(k, n, 128)
  fq = jnp.asarray(jw4a16.layout.to_fragment_packed(qw))
  cfg = tuning.KernelConfig(16, 64, 128, split_k=16, kernel="frag")
  f = jax.jit(lambda x, q: [jw4a16.w4a16_matmul(x, q, s, group_size=128, packing="fragment", config=cfg,
                                                backend="triton") for _ in range(3)])
  x = make_x((20, k))
  outs = [np.asarray(o).view(np.uint16) for _ in range(10) for o in f(x, fq)]
  assert all((o == outs[0]).all() for o in outs)
  assert_close(outs[0].view(jnp.bfloat16), np.asarray(x, np.float64) @ w, "bfloat16")


ATTENTION_CASES = [  # b, s, kvh, r, d, index, dtype
    (1, 256, 8, 4, 128, 0, "bfloat16"), (1, 256, 8, 4, 128, 200, "bfloat16"), (16, 2048, 8, 4, 128, 1500, "bfloat16"),
    (3, 130, 2, 5, 64, 129, "float16"), (2, 8192, 8, 4, 128, 8000, "float16"), (4, 512, 32, 1, 128, 77, "bfloat16")]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_attention_on_gpu(case):
  """jw4a16.attention.attention at T = 1 runs the Triton decode kernel (index traced, as in the model's step):
  against float64 numpy, and the same output on a second call (its split counters were left at zero)."""
  from jw4a16 import attention  # noqa: PLC0415
  from tests.test_attention import naive  # noqa: PLC0415

  b, s, kvh, r, d, index, dtype = case
  keys = jax.random.split(jax.random.key(sum(case[:6])), 3)
  q = jax.random.normal(keys[0], (b, 1, kvh * r, d), dtype)
  k, v = (jax.random.normal(kk, (b, s, kvh, d), dtype) for kk in keys[1:])
  assert attention.kernel_unavailable_reason(q, k) is None
  f = jax.jit(attention.attention)
  got = np.asarray(f(q, k, v, np.int32(index)), np.float32)
  want = naive(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32), index)
  assert np.abs(got - want).max() < 3e-2 and np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  np.testing.assert_array_equal(np.asarray(f(q, k, v, np.int32(index)), np.float32), got)


@pytest.mark.parametrize("split", [1, 2, 8, 32])
def test_decode_attention_splits(split):
  from jw4a16 import attention  # noqa: PLC0415
  from tests.test_attention import naive  # noqa: PLC0415

  b, s, kvh, r, d = 2, 1024, 8, 4, 128
  keys = jax.random.split(jax.random.key(split), 3)
  q = jax.random.normal(keys[0], (b, kvh * r, d), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (b, s, kvh, d), jnp.bfloat16) for kk in keys[1:])
  lengths = jnp.array([1000, 3], jnp.int32)
  got = np.asarray(jax.jit(attention.decode_attention, static_argnames="split")(q, k, v, lengths, split=split),
                   np.float32)
  for bi, n in enumerate((1000, 3)):
    want = naive(np.asarray(q[bi:bi + 1, None], np.float32), np.asarray(k[bi:bi + 1], np.float32),
                 np.asarray(v[bi:bi + 1], np.float32), n - 1)[0, 0]
    assert np.abs(got[bi] - want).max() < 3e-2


@pytest.mark.parametrize("launcher", ["legacy", "ffi"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_step_on_gpu(case, launcher, monkeypatch):
  """attention_step at T = 1 runs the step kernel (index traced, caches donated as in the model's step): the
  output against float64 numpy, the caches against the jnp path's (v exact; k, rotated in fp32 and rounded once,
  within one bf16 / fp16 step), nothing else in the caches changed, the compiled step copies no cache (the
  aliased outputs are the donated buffers), and a second call gives the same output (counters left at zero)."""
  from jw4a16 import attention  # noqa: PLC0415
  from tests.test_attention import naive, naive_rope  # noqa: PLC0415

  monkeypatch.setenv("JW4A16_LAUNCHER", launcher)
  b, s, kvh, r, d, index, dtype = case
  h = kvh * r
  keys = jax.random.split(jax.random.key(sum(case[:6]) + 1), 3)
  qkv = jax.random.normal(keys[0], (b, (h + 2 * kvh) * d), dtype)
  k, v = (jax.random.normal(kk, (b, s, kvh, d), dtype) for kk in keys[1:])
  ang = index / 10000.0 ** (np.arange(0, d, 2) / d)
  cos, sin = (jnp.asarray(np.concatenate([f(ang), f(ang)]), dtype) for f in (np.cos, np.sin))
  assert attention.kernel_unavailable_reason(jax.ShapeDtypeStruct((b, 1, h, d), qkv.dtype), k) is None
  want_out, want_k, want_v = jax.jit(attention.attention_step_reference)(qkv, cos, sin, k, v, np.int32(index))
  k_np, v_np = np.asarray(k, np.float32), np.asarray(v, np.float32)
  f = jax.jit(attention.attention_step, donate_argnums=(3, 4))
  hlo = f.lower(qkv, cos, sin, k, v, np.int32(index)).compile().as_text()
  assert not any(" copy(" in line and f"[{b},{s},{kvh},{d}]" in line for line in hlo.splitlines()), hlo
  out, kc, vc = f(qkv, cos, sin, k, v, np.int32(index))
  kc, vc = np.asarray(kc, np.float32), np.asarray(vc, np.float32)
  np.testing.assert_array_equal(vc, np.asarray(want_v, np.float32))
  np.testing.assert_allclose(kc[:, index], np.asarray(want_k, np.float32)[:, index], rtol=1e-2, atol=1e-2)
  for c, old in ((kc, k_np), (vc, v_np)):
    np.testing.assert_array_equal(np.delete(c, index, axis=1), np.delete(old, index, axis=1))
  q_rot = naive_rope(np.asarray(qkv[:, :h * d], np.float32).reshape(b, 1, h, d), index, d)
  want = naive(q_rot, kc, vc, index)[:, 0]
  got = np.asarray(out, np.float32)
  assert np.abs(got - want).max() < 3e-2 and np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  assert np.linalg.norm(got - np.asarray(want_out, np.float32)) / np.linalg.norm(want) < 2e-2
  out2, _, _ = f(qkv, cos, sin, jnp.asarray(k_np, dtype), jnp.asarray(v_np, dtype), np.int32(index))
  np.testing.assert_array_equal(np.asarray(out2, np.float32), got)


@pytest.mark.parametrize("shape,dtype,with_res", [((1, 1, 4096), "bfloat16", True), ((16, 1, 4096), "bfloat16", False),
                                                   ((2, 37, 8192), "float16", True), ((3, 896), "bfloat16", True)])
def test_rms_norm_on_gpu(shape, dtype, with_res):
  """jw4a16.norm.rms_norm runs the kernel (under jit, leading batch dims): the residual sum exactly as XLA's, the
  norm within a step of the dtype of the jnp reference's and of float64 numpy."""
  from jw4a16 import norm  # noqa: PLC0415
  from tests.test_norm import naive  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(shape[-1]), 3)
  x = 3 * jax.random.normal(keys[0], shape, dtype)
  w = jax.random.normal(keys[1], shape[-1:], dtype)
  r = 3 * jax.random.normal(keys[2], shape, dtype) if with_res else None
  assert norm.kernel_unavailable_reason(x, w) is None
  got = jax.jit(norm.rms_norm, static_argnums=2)(x, w, 1e-5, r)
  want = jax.jit(norm.rms_norm_reference, static_argnums=2)(x, w, 1e-5, r)
  if with_res:
    (got, res), (want, want_res) = got, want
    np.testing.assert_array_equal(np.asarray(res, np.float32), np.asarray(want_res, np.float32))
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
  ref = naive(np.asarray(x, np.float32), np.asarray(w, np.float32), 1e-5,
              None if r is None else np.asarray(r, np.float32))
  np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)


def test_generate_decodes_with_the_ffi_launcher(monkeypatch):
  """generate traces its decode step with launch.decode_launcher() ("ffi" on NVIDIA: jaxlib's FFI Triton call,
  which XLA's command buffers take) and gives the same tokens as with every launch legacy ($JW4A16_LAUNCHER=legacy)."""
  from jw4a16 import launch  # noqa: PLC0415
  from jw4a16.models import llama  # noqa: PLC0415

  monkeypatch.delenv(launch.LAUNCHER_ENV, raising=False)
  assert launch.decode_launcher() == "ffi"  # the test GPUs are NVIDIA
  ids = np.array([[5, 17, 3, 99, 42, 7]], np.int32)
  m = llama.load("tests/fixtures/llama-w4a16-asym", progress=False)
  got = m.generate(ids, 16).tokens
  args = (m.params, jnp.ones((1,), jnp.int32), llama.init_cache(m.cfg, 1, 128), np.int32(6), jax.random.key(0),
          0.0, None, None)
  with launch.use_launcher(launch.decode_launcher()):
    assert f"{launch.FFI_TARGET}" in m._decode.lower(*args).as_text()
    assert f"{launch.FFI_TARGET}" in m._decode_n.lower(*args, llama.DECODE_CHUNK).as_text()  # what generate runs
  monkeypatch.setenv(launch.LAUNCHER_ENV, "legacy")
  m_legacy = llama.load("tests/fixtures/llama-w4a16-asym", progress=False)
  assert launch.FFI_TARGET not in m_legacy._decode.lower(*args).as_text()
  np.testing.assert_array_equal(got, m_legacy.generate(ids, 16).tokens)


def test_llama_decode_step_kernel_matches_reference_attention(monkeypatch):
  """The model's decode step with the attention kernel against the same step with the reference attention
  ($JW4A16_DECODE_ATTENTION=0, read at trace time): logits within the bf16 tolerance of test_llama_logits_on_gpu
  (measured 1.2e-2 relative on H100: the reference rounds the scores to bf16 before the softmax, as transformers'
  eager attention does; the kernel keeps them in fp32)."""
  from jw4a16.models import llama  # noqa: PLC0415

  m = llama.load("tests/fixtures/llama-w4a16-asym", progress=False)
  ids = np.array([[5, 17, 3, 99, 42, 7]], np.int32)
  outs = []
  for flag in ("1", "0"):
    monkeypatch.setenv("JW4A16_DECODE_ATTENTION", flag)
    step = jax.jit(lambda p, ids, c, i: m.module.apply({"params": p}, ids, c, i))
    _, cache = step(m.params, ids, llama.init_cache(m.cfg, 1, 128), np.int32(0))
    logits, _ = step(m.params, ids[:, :1], cache, np.int32(ids.shape[1]))
    outs.append(np.asarray(logits))
  assert np.linalg.norm(outs[0] - outs[1]) / np.linalg.norm(outs[1]) < 2e-2


@pytest.mark.parametrize("m", [1, 2, 16, 33])
@pytest.mark.parametrize("kn,norm,residual", [((4096, 6144), True, False), ((4096, 28672), True, False),
                                               ((14336, 4096), False, True), ((4096, 4096), False, True),
                                               ((4096, 4096), True, True)])
@pytest.mark.parametrize("dtype,symmetric", [("bfloat16", True), ("float16", False)])
def test_fused_norm_and_residual_on_gpu(m, kn, norm, residual, dtype, symmetric):
  """The frag kernel's NORM / RES (w4a16_matmul's norm_weight, residual) at the decode picks of the Llama-3-8B
  projections, through jit, against the jnp norm and the float64 product (tests/test_fused_norm.py)."""
  from jw4a16 import reference  # noqa: PLC0415
  from tests.test_fused_norm import EPS, _expected, _inputs  # noqa: PLC0415

  k, n = kn
  qw, s, qz, _, w = make_weights(k, n, 128, dtype=dtype, symmetric=symmetric)
  fq = jw4a16.layout.to_fragment_packed(qw)
  h, gamma, res = _inputs(m, k, n, dtype)
  kw = dict(group_size=128, packing="fragment", norm_eps=EPS)
  f = jax.jit(lambda h, ssq, r: jw4a16.w4a16_matmul(h, fq, s, qz, norm_weight=gamma if norm else None,
                                                    norm_ssq=ssq, residual=r, **kw))
  out = f(h, reference.sum_squares(h) if norm else None, res if residual else None)
  if residual:
    out, ssq = out
    np.testing.assert_allclose(np.asarray(ssq), np.asarray(reference.sum_squares(out)), rtol=1e-5)
  assert_close(out, _expected(h, gamma, res, w, norm, residual), dtype)


@pytest.mark.parametrize("m", [1, 16, 33])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prescaled_norm_chain_on_gpu(m, dtype):
  """o_proj -> gate/up of a Llama-3-8B layer on the frag kernel: RES with RES_GAMMA (the residual sum times the
  post-attention norm's weight), then NORM = 2 (only the rows' scale), against the jnp norm of h."""
  from jw4a16 import reference  # noqa: PLC0415
  from tests.test_fused_norm import EPS, _inputs  # noqa: PLC0415

  qo, so, _, _, wo = make_weights(4096, 4096, 128, dtype=dtype)
  qg, sg, _, _, wg = make_weights(4096, 28672, 128, dtype=dtype, seed=3)
  fo, fg = jw4a16.layout.to_fragment_packed(qo), jw4a16.layout.to_fragment_packed(qg)
  a, gamma, res = _inputs(m, 4096, 4096, dtype)
  kw = dict(group_size=128, packing="fragment")

  @jax.jit
  def f(a, res):
    h, ssq, hg = jw4a16.w4a16_matmul(a, fo, so, residual=res, residual_norm_weight=gamma, **kw)
    return h, ssq, hg, jw4a16.w4a16_matmul(hg, fg, sg, norm_ssq=ssq, norm_eps=EPS, **kw)

  h, ssq, hg, out = f(a, res)
  assert_close(h, np.asarray(a, np.float64) @ wo + np.asarray(res, np.float64), dtype)
  np.testing.assert_allclose(np.asarray(ssq), np.asarray(reference.sum_squares(h)), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(hg, np.float32), np.asarray(h * gamma, np.float32))
  assert_close(out, np.asarray(reference.rms_norm_from_ssq(h, gamma, EPS), np.float64) @ wg, dtype)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("kn,norm", [((4096, 6144), 1), ((4096, 28672), 2), ((4096, 4096), 0), ((14336, 4096), 0)])
@pytest.mark.parametrize("dtype,symmetric", [("bfloat16", True), ("float16", False)])
def test_partials_on_gpu(m, kn, norm, dtype, symmetric):
  """w4a16_matmul(..., partials=True) on the frag kernel (PARTIALS) at the decode picks of the Llama-3-8B
  projections: one slot per split of the pick, and their sum in slot order (reference.sum_partials) is bit for bit
  the plain launch's output (the split-K epilogue's sum), with the norm in the K loop (1) or as the row scale (2)."""
  from jw4a16 import reference  # noqa: PLC0415
  from tests.test_fused_norm import EPS, _inputs  # noqa: PLC0415

  k, n = kn
  qw, s, qz, _, _ = make_weights(k, n, 128, dtype=dtype, symmetric=symmetric)
  fq = jw4a16.layout.to_fragment_packed(qw)
  h, gamma, _ = _inputs(m, k, n, dtype)
  kw = dict(group_size=128, packing="fragment", norm_eps=EPS, norm_weight=gamma if norm == 1 else None,
            norm_ssq=reference.sum_squares(h) if norm else None)
  f = jax.jit(lambda h, p: jw4a16.w4a16_matmul(h, fq, s, qz, partials=p, **kw), static_argnums=1)
  slots, out = f(h, True), f(h, False)
  cfg = tuning.select_config(m, k, n, 128, dtype, not symmetric, jw4a16.ops.current_target(), "fragment")
  assert slots.shape == (cfg.split_k, m, n) and slots.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(reference.sum_partials(slots, jnp.dtype(dtype)), np.float32),
                                np.asarray(out, np.float32))


@pytest.mark.parametrize("b,s,parts,split", [(1, 256, 8, 1), (1, 2048, 4, 8), (16, 512, 2, 2)])
def test_attention_step_sums_slots_on_gpu(b, s, parts, split):
  """The step kernel on q/k/v as float32 split-K slots: out and caches bit for bit those of the launch on their sum,
  at Llama-3-8B heads."""
  from jw4a16 import attention, reference  # noqa: PLC0415

  kvh, h, d, index = 8, 32, 128, s // 2 + 3
  keys = jax.random.split(jax.random.key(b + s), 3)
  slots = jax.random.normal(keys[0], (parts, b, (h + 2 * kvh) * d), jnp.float32)
  k, v = (jax.random.normal(kk, (b, s, kvh, d), jnp.bfloat16) for kk in keys[1:])
  ang = index / 500000.0 ** (np.arange(0, d, 2) / d)
  cos, sin = (jnp.asarray(np.concatenate([f(ang), f(ang)]), jnp.bfloat16) for f in (np.cos, np.sin))
  lengths = jnp.full((b,), index + 1, jnp.int32)
  step = jax.jit(lambda q, k, v: attention.decode_attention_step(q, cos, sin, k, v, lengths, split=split))
  got = step(slots, k, v)
  want = step(reference.sum_partials(slots, jnp.bfloat16), k, v)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_llama_decode_with_slots_matches_epilogue_sums(monkeypatch):
  """The model's decode step hands q/k/v and gate/up over as split-K slots (llama.takes_slots) on the fragment
  packing: logits and greedy tokens bit for bit those of the same model with every projection's output summed in
  its own epilogue."""
  from jw4a16.models import llama  # noqa: PLC0415

  ids = np.array([[5, 17, 3, 99, 42, 7]], np.int32)
  m = llama.load("tests/fixtures/llama-w4a16-asym", progress=False, packing="fragment")
  assert llama.folds_norms(m.cfg) and m.cfg.fuse_qkv and m.cfg.fuse_gate_up

  def decode(model):
    step = jax.jit(lambda p, ids, c, i: model.module.apply({"params": p}, ids, c, i))
    _, cache = step(model.params, ids, llama.init_cache(model.cfg, 1, 128), np.int32(0))
    return np.asarray(step(model.params, ids[:, :1], cache, np.int32(ids.shape[1]))[0]), model.generate(ids, 12).tokens

  logits, tokens = decode(m)
  monkeypatch.setattr(llama, "takes_slots", lambda layer, fold, t: False)
  m2 = llama.load("tests/fixtures/llama-w4a16-asym", progress=False, packing="fragment")
  logits2, tokens2 = decode(m2)
  np.testing.assert_array_equal(logits, logits2)
  np.testing.assert_array_equal(tokens, tokens2)
