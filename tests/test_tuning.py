"""Configs, their validation, the dispatcher's choice order and the on-disk tuning cache (no GPU needed)."""

import dataclasses
import json

import pytest

from jw4a16 import tuning


def test_gemv_config_validation():
  with pytest.raises(ValueError, match="block_m=4: the gemv kernel takes 1 or 2 rows of x per program"):
    tuning.KernelConfig(4, 512, 8, kernel="gemv")
  with pytest.raises(ValueError, match="k_lanes=4 .* only for kernel 'gemv'"):
    tuning.KernelConfig(16, 64, 64, k_lanes=4)
  with pytest.raises(ValueError, match="k_lanes=3"):
    tuning.KernelConfig(1, 512, 8, kernel="gemv", k_lanes=3)
  with pytest.raises(ValueError, match="kernel='dot'"):
    tuning.KernelConfig(16, 64, 64, kernel="dot")
  with pytest.raises(ValueError, match="smaller than one warp"):
    tuning.gemv_config(256, 8, 2, 1)  # 2 lanes x 32 words = 64 threads at 4 words: half a warp
  with pytest.raises(ValueError, match="block_k=16: the gemv kernel's register pipeline carries 8 rows"):
    tuning.gemv_config(256, 16, 16, 1)


def test_swap_ab_config_validation():
  assert tuning.KernelConfig(8, 64, 128, swap_ab=1).meta()["SWAP_AB"] == 1  # 8 rows of x: the wgmma's N
  assert tuning.KernelConfig(16, 64, 64).meta()["SWAP_AB"] == 0
  with pytest.raises(ValueError, match="block_m=8: tl.dot needs >= 16"):
    tuning.KernelConfig(8, 64, 64)
  with pytest.raises(ValueError, match="swap_ab=1 must be 0 or 1, and 1 only for kernel 'tile'"):
    tuning.KernelConfig(1, 256, 8, kernel="gemv", k_lanes=16, swap_ab=1)
  with pytest.raises(ValueError, match="swap_ab=2"):
    tuning.KernelConfig(16, 64, 64, swap_ab=2)


@pytest.mark.parametrize("target", [tuning.H100, tuning.MI300X], ids=lambda t: t.name)
def test_gemv_config_warps_cover_the_tile(target):
  """num_warps = k_lanes * block_n / (32 * warp size): every thread loads 4 distinct words."""
  cfg = tuning.gemv_config(1024, 8, 4, 2, target)
  assert cfg.num_warps * target.warp_size * 4 == cfg.k_lanes * cfg.block_n // 8
  assert cfg.meta() == dict(BLOCK_N=1024, BLOCK_K=8, SPLIT_K=2, K_LANES=4, ROWS=1)
  assert cfg.grid(3, 2500) == (3 * 3, 2)  # one program per row of x and tile
  two = tuning.gemv_config(1024, 8, 4, 2, target, rows=2)
  assert two.meta()["ROWS"] == 2 and two.num_warps == cfg.num_warps
  assert two.grid(3, 2500) == (2 * 3, 2)  # rows 0-1 and 2 (alone) of x, per tile


def test_m2_picks_two_rows_per_program_where_measured_faster():
  """At M = 2 the shipped table keeps the two-row gemv (each weight unpacked once for both rows) where it measured
  faster than the swapped tile; elsewhere, and for shapes the table lacks, the swapped tile."""
  cfg = tuning.select_config(2, 14336, 4096, 128, "bfloat16", False, tuning.H100)  # table: gemv measured faster
  assert cfg.kernel == "gemv" and cfg.block_m == 2, cfg
  cfg = tuning.select_config(2, 4096, 6144, 128, "bfloat16", False, tuning.H100)  # table: swapped tile faster
  assert cfg.kernel == "tile" and cfg.swap_ab == 1, cfg
  cfg = tuning.heuristic_config(2, 1024, 3072, 128, tuning.H100)
  assert cfg.kernel == "tile" and cfg.swap_ab == 1 and cfg.block_m == 16, cfg
  assert tuning.gemv_heuristic(2, 1024, 3072, 128).block_m == 2  # the gemv kernel itself, where asked for
  assert tuning.select_config(1, 1024, 3072, 128, "bfloat16", False, tuning.H100).kernel == "gemv"


@pytest.mark.parametrize("m", [1, 2, 4])
def test_gemv_candidates_are_legal(m):
  k, n, g = 4096, 6144, 64
  cands = tuning.gemv_candidates(m, k, n, g)
  assert cands
  for c in cands:
    assert c.kernel == "gemv" and 1 <= c.num_warps <= 8
    assert g % c.block_k == 0 and k // c.split_k >= c.block_k * c.k_lanes
    assert tuning.H100.num_sms <= c.grid(m, n)[0] * c.split_k <= 8 * tuning.H100.num_sms


def test_heuristics_pick_gemv_for_decode():
  assert tuning.heuristic_config(1, 4096, 4096, 128, tuning.H100).kernel == "gemv"
  assert tuning.heuristic_config(2, 4096, 4096, 128, tuning.H100).swap_ab == 1  # GEMV_MAX_M = 1 on H100
  assert tuning.heuristic_config(4, 4096, 4096, 128, tuning.H100).kernel == "tile"
  amd = tuning.heuristic_config(1, 4096, 4096, 128, tuning.MI300X)
  assert amd.kernel == "gemv" and amd.num_warps * 64 * 4 == amd.k_lanes * amd.block_n // 8
  assert tuning.heuristic_config(2, 4096, 4096, 128, tuning.MI300X).kernel == "tile"  # not measured there


@pytest.mark.parametrize("m", [2, 3, 4, 8, 16, 17, 32])
def test_heuristics_swap_ab_for_small_m_on_h100_only(m):
  cfg = tuning.heuristic_config(m, 4096, 6144, 128, tuning.H100)
  assert cfg.kernel == "tile" and cfg.swap_ab == 1 and cfg.block_m == (16 if m <= 16 else 32)
  assert cfg.block_n == 64 and 3.5 * tuning.H100.num_sms <= cfg.grid(m, 6144)[0] * cfg.split_k
  assert tuning.heuristic_config(m, 4096, 6144, 128, tuning.MI300X).swap_ab == 0  # not measured there
  assert tuning.heuristic_config(64, 4096, 6144, 128, tuning.H100).swap_ab == 0  # measured to lose at M = 64


def test_candidates_include_swap_ab_up_to_m64():
  assert any(c.swap_ab for c in tuning.candidate_configs(16, 4096, 6144, 128))
  assert any(c.swap_ab for c in tuning.candidate_configs(64, 4096, 6144, 128))
  assert not any(c.swap_ab for c in tuning.candidate_configs(256, 4096, 6144, 128))


def test_disabled_kernels(monkeypatch):
  monkeypatch.setenv(tuning.DISABLE_ENV, "gemv")
  for m in (1, 2):
    for k, n in ((4096, 6144), (1024, 3072)):  # in the shipped table, and not
      assert tuning.select_config(m, k, n, 128, "bfloat16", False).kernel == "tile"
  monkeypatch.setenv(tuning.DISABLE_ENV, "tile")
  with pytest.raises(ValueError, match="only 'gemv' can be disabled"):
    tuning.select_config(1, 4096, 6144, 128, "bfloat16", False)


def test_select_order_user_cache_then_shipped_then_heuristic(tmp_path, monkeypatch):
  monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
  k, n = 4096, 6144
  shipped = tuning.select_config(1, k, n, 128, "bfloat16", False)
  assert shipped == tuning.shipped_table("h100")[tuning.table_key(1, k, n, 128, "bfloat16", False)]
  mine = dataclasses.replace(shipped, split_k=2)
  path = tuning.record_tuned("h100", {tuning.table_key(1, k, n, 128, "bfloat16", False): mine})
  assert path.parent == tmp_path and not list(tmp_path.glob("*.tmp"))
  assert tuning.select_config(1, k, n, 128, "bfloat16", False) == mine  # a new process would read it too
  assert tuning.select_config(1, 512, 512, 128, "bfloat16", False) == tuning.legalize(
      tuning.heuristic_config(1, 512, 512, 128), 512, 128)


def test_user_cache_skips_entries_an_older_version_wrote(tmp_path, monkeypatch):
  """A gemv entry with block_k=16 (valid before the register pipeline) is dropped, the rest of the cache kept."""
  monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
  good = tuning.gemv_config(512, 8, 8, 4)
  stale = dict(good.to_json(), block_k=16)
  tuning.cache_path("h100").write_text(json.dumps({"a": good.to_json(), "b": stale}))
  assert tuning.user_table("h100") == {"a": good}


def test_scratch_shapes_follow_split_k_and_grid():
  tile = tuning.KernelConfig(16, 128, 64, split_k=4)
  assert tile.scratch_shapes(40, 1000) == ((4, 40, 1000), (3 * 8,))  # 3 row blocks x 8 column blocks
  gemv = tuning.gemv_config(512, 8, 4, 8, tuning.H100)
  assert gemv.scratch_shapes(2, 6144) == ((8, 2, 6144), (2 * 12,))
  assert tuning.KernelConfig(16, 128, 64).scratch_shapes(40, 1000) == ((1,), (1,))


@pytest.mark.parametrize("kn", [(4096, 6144), (4096, 28672), (14336, 4096), (8192, 57344), (28672, 8192), (512, 64)])
def test_gemv_heuristic_splits_to_four_programs_per_sm_at_most_32(kn):
  """The last program of a tile reads every split's partial: splits stop at ~4 programs per SM, 32 ways, or
  one K step per split, whichever comes first."""
  k, n = kn
  c = tuning.gemv_heuristic(1, k, n, 128)
  programs = c.grid(1, n)[0] * c.split_k
  assert c.split_k <= 32 and k // c.split_k >= c.block_k * c.k_lanes
  assert programs >= 4 * tuning.H100.num_sms or c.split_k == 32 or k // (2 * c.split_k) < c.block_k * c.k_lanes
  assert c.split_k == 1 or programs // 2 < 4 * tuning.H100.num_sms  # never a split more than needed


def test_dequant_route_starts_earlier_for_small_groups(monkeypatch):
  monkeypatch.delenv("JW4A16_DENSE_FROM_M", raising=False)
  h100 = tuning.H100
  assert not tuning.use_dequant_gemm(511, h100, 128) and tuning.use_dequant_gemm(512, h100, 128)
  assert not tuning.use_dequant_gemm(255, h100, 32) and tuning.use_dequant_gemm(256, h100, 32)
  assert not tuning.use_dequant_gemm(256, h100, 64) and not tuning.use_dequant_gemm(256, h100)
  # the frag kernel's groups of 32 beat that route at M = 256: the fragment packing keeps DENSE_FROM_M
  assert not tuning.use_dequant_gemm(511, h100, 32, "fragment") and tuning.use_dequant_gemm(512, h100, 32, "fragment")
  monkeypatch.setenv("JW4A16_DENSE_FROM_M", "16")
  assert tuning.use_dequant_gemm(16, h100, 128) and not tuning.use_dequant_gemm(15, h100, 32)


def test_launch_takes_the_dequant_route_for_group_32_at_m256(monkeypatch):
  """ops._launch answers through XLA (no Triton import) where use_dequant_gemm says so."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from jw4a16 import ops  # noqa: PLC0415
  from tests.helpers import assert_close, make_weights, make_x  # noqa: PLC0415

  monkeypatch.delenv("JW4A16_DENSE_FROM_M", raising=False)
  monkeypatch.setattr(ops, "current_target", lambda: tuning.H100)
  k, n = 256, 64
  qw, s, _, _, w = make_weights(k, n, 32)
  x = make_x((256, k))
  out = ops._launch(jnp.asarray(x), jnp.asarray(qw), jnp.asarray(s), None, group_size=32, zp_bias=8, config=None)
  assert_close(out, np.asarray(x, np.float64) @ w, "bfloat16")
