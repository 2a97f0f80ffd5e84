"""packing="fragment" on the CPU: the layout's inverse, validation, QuantizedWeight.repack, the reference path, the
dispatcher's configs, the layers, the model loader and the Orbax round trip.  (The kernel itself runs in the
interpreter in test_frag_interpret.py and test_kernel_interpret.py, and on the GPU in test_gpu.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jw4a16
from jw4a16 import checkpoint, layout, tuning
from jw4a16 import nnx as jnnx
from jw4a16.models import llama
from jw4a16.quantize import layer_params
from tests.helpers import make_weights, make_x

K, N, G = 256, 72, 64


@pytest.mark.parametrize("xp", [np, jnp])
def test_from_fragment_packed_inverts(xp):
  q = np.random.default_rng(0).integers(-2**31, 2**31 - 1, (K, N // 8)).astype(np.int32)
  f = layout.to_fragment_packed(xp.asarray(q))
  assert f.shape == (2, 8 * K)  # N = 72: one block of 64 columns and one of 8, zero-padded
  np.testing.assert_array_equal(np.asarray(layout.from_fragment_packed(f, N)), q)
  assert not np.asarray(layout.unpack_fragment(f))[N:].any()  # the padding columns
  with pytest.raises(ValueError, match=r"must be \[ceil\(N / 64\), 8 K\] with K a multiple of 64, got shape \(8, 9\)"):
    layout.from_fragment_packed(np.zeros((8, 9), np.int32))
  with pytest.raises(ValueError, match=r"hold 2 blocks of 64 columns, not N = 136"):
    layout.from_fragment_packed(f, 136)


def test_fragment_blocks_hold_each_k_chunk_of_64_columns_in_one_piece():
  """Row j of the packed words holds columns 64 j .. 64 j + 63, K block b (64 values) of them in words
  512 b .. 512 b + 511, column n's 8 words at 8 (n % 64): a tile reads one 2 KB run per K block."""
  rng = np.random.default_rng(1)
  q = rng.integers(0, 16, (256, 136))  # [K, N]: two whole blocks of columns and one of 8
  f = layout.to_fragment_packed(layout.pack_int4(q, axis=1))
  eight = layout.to_fragment_packed(layout.pack_int4(q[:, 64:72], axis=1))  # columns 64 .. 71 alone: [1, 8 K]
  for n in range(64, 72):  # their 8 words of each K block, in the second row at 8 (n % 64)
    np.testing.assert_array_equal(f[1].reshape(4, 64, 8)[:, n % 64], eight[0].reshape(4, 64, 8)[:, n - 64])
  assert not f[2].reshape(4, 64, 8)[:, 8:].any()


def test_matmul_fragment_equals_gptq_and_jit_vmap():
  qw, s, qz, _, _ = make_weights(K, N, G, symmetric=False)
  fq = layout.to_fragment_packed(qw)
  x = make_x((2, 3, K))
  ref = jw4a16.w4a16_matmul(x, qw, s, qz, group_size=G)
  got = jax.jit(lambda x: jw4a16.w4a16_matmul(x, fq, s, qz, group_size=G, packing="fragment"))(x)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
  per_row = jax.vmap(lambda r: jw4a16.w4a16_matmul(r, fq, s, qz, group_size=G, packing="fragment"))(x)
  np.testing.assert_array_equal(np.asarray(per_row, np.float32), np.asarray(ref, np.float32))
  w = jw4a16.dequantize(fq, s, qz, group_size=G, packing="fragment")
  np.testing.assert_array_equal(np.asarray(w), np.asarray(jw4a16.dequantize(qw, s, qz, group_size=G)))


def test_fragment_bad_input():
  qw, s, qz, _, _ = make_weights(K, N, G)
  fq = layout.to_fragment_packed(qw)
  x = make_x((2, K))
  with pytest.raises(ValueError, match=r"packing='frag' must be one of \('gptq', 'fragment'\)"):
    jw4a16.w4a16_matmul(x, qw, s, group_size=G, packing="frag")
  with pytest.raises(ValueError, match=r"K mismatch: x.shape\[-1\]=256 but qweight.shape=\(256, 9\) "
                                       r"\(qweight is \[ceil"):
    jw4a16.w4a16_matmul(x, qw, s, group_size=G, packing="fragment")  # GPTQ words passed as fragment
  with pytest.raises(ValueError, match=r"holds 64 columns in blocks of 64 but scales has N=72; expected qweight "
                                       r"\[2, 2048\]"):
    jw4a16.w4a16_matmul(x, fq[:1], s, group_size=G, packing="fragment")
  with pytest.raises(ValueError, match="needs packing='gptq'"):
    jw4a16.w4a16_matmul(x, fq, s, group_size=G, packing="fragment", g_idx=jnp.arange(K) // G)
  with pytest.raises(ValueError, match="needs K to be a multiple of 64 and group_size a multiple of it or 32, got "
                                       "K=96, group_size=32"):
    jw4a16.w4a16_matmul(make_x((2, 96)), jnp.zeros((2, 8 * 96), jnp.int32), jnp.ones((3, N), jnp.bfloat16),
                        group_size=32, packing="fragment")
  with pytest.raises(ValueError, match="config.kernel='tile' does not read packing='fragment'"):
    jw4a16.w4a16_matmul(x, fq, s, group_size=G, packing="fragment", config=tuning.KernelConfig(16, 64, 64))
  frag_cfg = tuning.KernelConfig(16, 64, 64, kernel="frag")
  with pytest.raises(ValueError, match="config.kernel='frag' does not read packing='gptq'"):
    jw4a16.w4a16_matmul(x, qw, s, group_size=G, config=frag_cfg)


def test_quantized_weight_repack():
  w = jw4a16.quantize(jax.random.normal(jax.random.key(0), (K, N)), group_size=G, symmetric=False)
  f = w.repack("fragment")
  assert f.packing == "fragment" and f.qweight.shape == (2, 8 * K) and f.shape == w.shape == (K, N)
  assert f.repack("fragment") is f
  np.testing.assert_array_equal(np.asarray(f.repack("gptq").qweight), np.asarray(w.qweight))
  x = make_x((3, K))
  np.testing.assert_array_equal(np.asarray(jw4a16.quantized_matmul(x, f), np.float32),
                                np.asarray(jw4a16.quantized_matmul(x, w), np.float32))
  stacked = jw4a16.QuantizedWeight(np.stack([np.asarray(w.qweight)] * 2), np.asarray(w.scales), group_size=G)
  assert stacked.repack("fragment").qweight.shape == (2, 2, 8 * K)
  np.testing.assert_array_equal(np.asarray(stacked.repack("fragment").repack("gptq").qweight), stacked.qweight)
  with pytest.raises(ValueError, match="K=96, group_size=32; keep packing='gptq'"):
    jw4a16.quantize(jnp.ones((96, N)), group_size=32).repack("fragment")
  # groups of 32: two per packed block of 64 values
  w32 = jw4a16.quantize(jax.random.normal(jax.random.key(1), (K, N)), group_size=32, symmetric=False)
  np.testing.assert_array_equal(np.asarray(jw4a16.quantized_matmul(x, w32.repack("fragment")), np.float32),
                                np.asarray(jw4a16.quantized_matmul(x, w32), np.float32))


def test_dispatcher_configs_for_fragment():
  for m in (1, 2, 16, 64, 256, 300):
    cfg = tuning.select_config(m, 4096, 6144, 128, "bfloat16", False, tuning.H100, "fragment")
    assert cfg.kernel == "frag" and cfg.block_k % 64 == 0, (m, cfg)
    heur = tuning.frag_heuristic(m, 4096, 6144, 128)
    assert heur.kernel == "frag" and heur.scale_w == (2 if 16 < m <= 256 else 1), (m, heur)
    assert tuning.frag_heuristic(m, 4096, 6144, 128, tuning.MI300X).scale_w == 1
  # the shipped H100 table has measured entries for the benchmark shapes
  assert tuning.table_key(16, 4096, 28672, 128, "bfloat16", False, "fragment") in tuning.shipped_table("h100")
  assert tuning.table_key(16, 4096, 28672, 128, "bfloat16", False).endswith("_sym")
  # block_k clamps to the group and to a divisor of K
  assert tuning.select_config(4, 192, 64, 64, "bfloat16", False, tuning.H100, "fragment").block_k == 64
  cands = tuning.frag_candidates(4, 4096, 6144, 128)
  assert cands and all(c.kernel == "frag" and tuning.fits(c, tuning.H100) for c in cands)
  assert {c.scale_w for c in cands} == {0, 1, 2}
  # 64-deep steps at small M (session 15: the faster M = 1 picks of three decode projections)
  assert {(c.block_k, c.num_stages) for c in cands} == {(128, 3), (64, 3), (64, 4)}
  # 16-row tiles scaling the weights (fenced off before session 9: they raced) are searched again
  assert any(c.block_m == 16 and c.scale_w for c in tuning.frag_candidates(16, 8192, 57344, 128))
  # accumulators of 256 registers a thread spilled hundreds of bytes: not searched
  assert not tuning.frag_acc_fits(tuning.KernelConfig(128, 256, 64, num_warps=4, kernel="frag"))
  assert tuning.frag_acc_fits(tuning.KernelConfig(128, 256, 64, num_warps=8, kernel="frag"))
  assert all(tuning.frag_acc_fits(c) for c in tuning.frag_candidates(1024, 4096, 28672, 128))
  with pytest.raises(ValueError, match="multiples of 64"):
    tuning.KernelConfig(16, 64, 32, kernel="frag")
  # groups of 32 on the frag kernel: 64-deep steps, weights scaled before the dot
  g32 = tuning.legalize(tuning.KernelConfig(16, 64, 128, kernel="frag", scale_w=0), 4096, 32)
  assert (g32.block_k, g32.scale_w) == (64, 1)
  assert tuning.legalize(tuning.KernelConfig(16, 64, 128, kernel="frag", scale_w=2), 4096, 32).scale_w == 2
  with pytest.raises(ValueError, match="takes group_size=32 with block_k=64 and scale_w 1 or 2"):
    tuning.check_config(tuning.KernelConfig(16, 64, 64, kernel="frag", scale_w=0), 4096, 32)
  assert tuning.select_config(16, 4096, 6144, 32, "bfloat16", True, tuning.H100, "fragment").block_k == 64
  with pytest.raises(ValueError, match="block_k=64 and block_n=32 must be multiples of 64"):
    tuning.KernelConfig(16, 32, 64, kernel="frag")
  with pytest.raises(ValueError, match="scale_w=1 must be 0, 1 or 2, and not 0 only for kernel 'frag'"):
    tuning.KernelConfig(16, 64, 64, scale_w=1)


def test_preferred_packing_on_cpu_is_gptq():
  assert jw4a16.preferred_packing(4096, 128) == "gptq"


def test_layers_with_fragment_packing():
  w = jw4a16.quantize(jax.random.normal(jax.random.key(1), (K, N)) * 0.05, group_size=G, symmetric=False)
  b = jnp.arange(N, dtype=jnp.bfloat16)
  x = make_x((2, 3, K))
  ref = jw4a16.W4A16Dense(N, group_size=G, symmetric=False).apply({"params": layer_params(w, b)}, x)
  layer = jw4a16.W4A16Dense(N, group_size=G, symmetric=False, packing="fragment")
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  assert shapes["qweight"].value.shape == (2, 8 * K)
  assert shapes["qweight"].names == ("mlp", "embed")  # the logical axes follow qweight's [ceil(N / 64), 8 K]
  y = layer.apply({"params": layer_params(w.repack("fragment"), b)}, x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
  lin = jnnx.W4A16Linear(K, N, group_size=G, symmetric=False, packing="fragment", rngs=nnx.Rngs(0)).load(w, b)
  assert lin.qweight.get_value().shape == (2, 8 * K)
  np.testing.assert_array_equal(np.asarray(lin(x), np.float32), np.asarray(ref, np.float32))
  # groups of 32 take the fragment packing too (two groups per packed block)
  shapes32 = jax.eval_shape(jw4a16.W4A16Dense(N, group_size=32, packing="fragment").init, jax.random.key(0), x)
  assert shapes32["params"]["qweight"].value.shape == (2, 8 * K)


def test_model_fragment_matches_gptq_and_orbax_keeps_packing(tmp_path):
  path = "jw4a16/assets/tiny-llama-w4a16"
  ids = np.array([[1, 5, 9, 2]], np.int32)
  base = llama.load(path, progress=False, packing="gptq")
  frag = llama.load(path, progress=False, packing="fragment")
  assert {spec[3] for _, spec in frag.quant.layers} == {"fragment"}
  np.testing.assert_array_equal(np.asarray(frag(ids)), np.asarray(base(ids)))
  assert {spec[3] for _, spec in llama.load(path, progress=False).quant.layers} == {"gptq"}  # auto, on CPU
  w = jw4a16.quantize(jax.random.normal(jax.random.key(2), (K, N)), group_size=G).repack("fragment")
  checkpoint.save({"proj": w}, tmp_path / "ckpt")
  back, _ = checkpoint.restore(tmp_path / "ckpt")
  assert back["proj"].packing == "fragment"
  np.testing.assert_array_equal(np.asarray(back["proj"].qweight), np.asarray(w.qweight))
  # format version 1 held fragment-packed weights as [N, K // 8]: such a directory is refused, not misread
  meta_path = tmp_path / "ckpt" / "jw4a16.json"
  meta = json.loads(meta_path.read_text())
  meta_path.write_text(json.dumps({**meta, "format_version": 1}))
  with pytest.raises(checkpoint.CheckpointError, match="format_version 1 with packing='fragment' weights in the old"):
    checkpoint.restore(tmp_path / "ckpt")
  checkpoint.save({"proj": w.repack("gptq")}, tmp_path / "v1")  # a version-1 GPTQ directory still reads
  meta_path = tmp_path / "v1" / "jw4a16.json"
  meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 1}))
  assert checkpoint.restore(tmp_path / "v1")[0]["proj"].packing == "gptq"
