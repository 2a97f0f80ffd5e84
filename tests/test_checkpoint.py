"""Loaders against the real libraries' checkpoints (llm-compressor fixtures) and independent writers; Orbax;
bad inputs; convert."""

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jw4a16
from jw4a16 import checkpoint
from jw4a16.checkpoint import CheckpointError
from tests import checkpoint_writers as writers

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = {"sym": ROOT / "jw4a16/assets/tiny-llama-w4a16", "asym": ROOT / "tests/fixtures/llama-w4a16-asym",
            "actorder": ROOT / "tests/fixtures/llama-w4a16-actorder",
            "lmhead": ROOT / "tests/fixtures/llama-w4a16-lmhead"}  # lmhead: ignore [], the lm_head int4 too


def node(params, dotted):
  for part in dotted.split("."):
    params = params[part]
  return params


def dense_of(w):
  deq = np.asarray(jw4a16.dequantize(w.qweight, w.scales, w.qzeros, group_size=w.group_size), np.float32)
  return deq[np.argsort(np.asarray(w.perm))] if w.perm is not None else deq


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_llm_compressor_fixtures_dequantize_exactly(name):
  """Every quantized Linear equals compressed-tensors' own decompression (saved by scripts/make_fixtures.py)."""
  params, config, scheme = checkpoint.load(FIXTURES[name], progress=False)
  assert scheme.format == "compressed-tensors" and scheme.symmetric == (name != "asym")
  ref = load_file(str(FIXTURES[name] / "reference_weights.safetensors"))
  assert len(ref) == (15 if name == "lmhead" else 14)
  for key, w_ref in ref.items():
    w = node(params, key[: -len(".weight")])
    assert isinstance(w, jw4a16.QuantizedWeight)
    np.testing.assert_array_equal(dense_of(w), w_ref.astype(np.float32).T, err_msg=key)
  if name != "lmhead":
    assert params["lm_head"]["weight"].dtype == np.dtype("bfloat16")  # on the ignore list: float
  assert config["num_hidden_layers"] == 2


@pytest.mark.parametrize("act_order,symmetric,v2", [(True, False, False), (False, True, False), (True, False, True)])
def test_gptq(tmp_path, act_order, symmetric, v2):
  dense = writers.write_gptq(tmp_path, act_order=act_order, symmetric=symmetric, v2=v2)
  params, _, scheme = checkpoint.load(tmp_path, progress=False)
  w = params["layer"]
  assert (w.perm is not None) == act_order
  np.testing.assert_array_equal(dense_of(w), dense.astype(np.float32))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 256)), jnp.float16)
  out = jw4a16.quantized_matmul(x, w)
  ref = np.asarray(x, np.float64) @ dense.astype(np.float64)
  assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 1e-3


def test_awq(tmp_path):
  dense = writers.write_awq(tmp_path)
  params, _, scheme = checkpoint.load(tmp_path, progress=False)
  assert scheme.format == "awq"
  np.testing.assert_array_equal(dense_of(params["layer"]), dense.astype(np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_g_idx(tmp_path, symmetric):
  dense = writers.write_ct_gidx(tmp_path, symmetric=symmetric)
  params, _, _ = checkpoint.load(tmp_path, progress=False, dtype="bfloat16")
  w = params["layer"]
  assert w.perm is not None
  np.testing.assert_array_equal(dense_of(w), dense.astype(ml_bf16()).astype(np.float32))


def ml_bf16():
  import ml_dtypes  # noqa: PLC0415

  return ml_dtypes.bfloat16


def test_orbax_round_trip_bit_exact(tmp_path):
  params, _, _ = checkpoint.load(FIXTURES["asym"], progress=False)
  checkpoint.save(params, tmp_path / "ckpt", metadata={"source_format": "compressed-tensors"})
  back, meta = checkpoint.restore(tmp_path / "ckpt")
  assert meta == {"source_format": "compressed-tensors"}
  a, b = node(params, "model.layers.1.mlp.up_proj"), node(back, "model.layers.1.mlp.up_proj")
  assert isinstance(b, jw4a16.QuantizedWeight) and b.group_size == a.group_size
  for f in ("qweight", "scales", "qzeros"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)).view(np.uint8), np.asarray(getattr(b, f)).view(np.uint8))
  with pytest.raises(FileExistsError):
    checkpoint.save(params, tmp_path / "ckpt")


def copy_fixture(tmp_path, name="asym"):
  dst = tmp_path / name
  shutil.copytree(FIXTURES[name], dst)
  return dst


def edit_tensors(path, fn):
  f = path / "model.safetensors"
  t = load_file(str(f))
  fn(t)
  save_file(t, str(f))


def edit_config(path, fn):
  cfg = json.loads((path / "config.json").read_text())
  fn(cfg)
  (path / "config.json").write_text(json.dumps(cfg))


def test_bad_checkpoints(tmp_path):
  with pytest.raises(CheckpointError, match="config.json: missing"):
    checkpoint.load(tmp_path, progress=False)
  cases = [
      (lambda c: c.pop("quantization_config"), "has no quantization_config"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8),
       "weights of 8 bits"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(type="float"),
       "type 'float'"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="block"),
       "strategy 'block' is not supported"),
      (lambda c: c["quantization_config"].update(format="float-quantized") or
       c["quantization_config"]["config_groups"]["group_0"].update(format="float-quantized"),
       "format 'float-quantized' is not supported"),
      (lambda c: c["quantization_config"].update(quant_method="bitsandbytes"), "'bitsandbytes' is not supported"),
  ]
  for i, (fn, match) in enumerate(cases):
    d = copy_fixture(tmp_path / str(i))
    edit_config(d, fn)
    with pytest.raises(CheckpointError, match=match):
      checkpoint.load(d, progress=False)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale"),
     "tensor 'model.layers.0.self_attn.q_proj.weight_scale' is missing"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale":
                         t["model.layers.0.self_attn.q_proj.weight_scale"][:, :1]}),
     r"'model.layers.0.self_attn.q_proj.weight_scale' has shape \(256, 1\), expected \(256, 2\)"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_packed":
                         t["model.layers.0.mlp.up_proj.weight_packed"].astype(np.int64)}),
     "'model.layers.0.mlp.up_proj.weight_packed' has dtype int64, expected int32"),
])
def test_bad_tensors(tmp_path, edit, match):
  d = copy_fixture(tmp_path)
  edit_tensors(d, edit)
  with pytest.raises(CheckpointError, match=match):
    checkpoint.load(d, progress=False)


def test_truncated_corrupt_and_missing_shard(tmp_path):
  d = copy_fixture(tmp_path / "t")
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    checkpoint.load(d, progress=False)
  d = copy_fixture(tmp_path / "c")
  (d / "model.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(CheckpointError, match="cannot read safetensors header"):
    checkpoint.load(d, progress=False)
  d = copy_fixture(tmp_path / "i")
  names = list(safe_open(str(d / "model.safetensors"), "numpy").keys())
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: ("model-00002-of-00002.safetensors" if i % 2 else "model.safetensors")
                      for i, n in enumerate(names)}}))
  with pytest.raises(CheckpointError, match="names shard.* model-00002-of-00002.safetensors"):
    checkpoint.load(d, progress=False)


def test_sharded_directory_with_index(tmp_path):
  d = copy_fixture(tmp_path)
  t = load_file(str(d / "model.safetensors"))
  names = sorted(t)
  half = len(names) // 2
  save_file({n: t[n] for n in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
  save_file({n: t[n] for n in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
  os.remove(d / "model.safetensors")
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}}))
  params, _, _ = checkpoint.load(d, progress=False)
  a, _, _ = checkpoint.load(FIXTURES["asym"], progress=False)
  np.testing.assert_array_equal(node(params, "model.layers.1.mlp.down_proj").qweight,
                                node(a, "model.layers.1.mlp.down_proj").qweight)


def test_quantized_linear_bias_qwen2_style(tmp_path):
  """Qwen2 keeps float q/k/v biases beside the quantized weights; the model picks them up."""
  from jw4a16.models import llama  # noqa: PLC0415

  d = copy_fixture(tmp_path, "sym")
  bias = (np.arange(256) / 256).astype(ml_bf16())
  edit_tensors(d, lambda t: t.update({f"model.layers.{i}.self_attn.{p}.bias": bias[: (256 if p == "q_proj" else 128)]
                                      for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}))
  edit_config(d, lambda c: c.update(attention_bias=True))
  params, _, _ = checkpoint.load(d, progress=False)
  np.testing.assert_array_equal(node(params, "model.layers.1.self_attn.q_proj_bias"), bias)
  m = llama.load(d, progress=False)
  assert m.cfg.attention_bias and m.cfg.fuse_qkv
  # fused: one [q | k | v] bias beside the concatenated weights
  np.testing.assert_array_equal(np.asarray(m.params["layers_0"]["self_attn"]["qkv_proj"]["bias"]),
                                np.concatenate([bias, bias[:128], bias[:128]]))
  sep = llama.load(d, progress=False, fuse=False)
  assert "bias" in sep.params["layers_0"]["self_attn"]["q_proj"]
  plain = llama.load(FIXTURES["sym"], progress=False)
  ids = np.array([[3, 4, 5]], np.int32)
  assert np.abs(np.asarray(m(ids)) - np.asarray(plain(ids))).max() > 1e-3  # the biases take part
  np.testing.assert_allclose(np.asarray(m(ids)), np.asarray(sep(ids)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["asym", "actorder"])
def test_load_into_fragment_packing(name):
  """load(packing=...) repacks each weight once (act-order rows sorted first); the values are the GPTQ load's."""
  base, _, _ = checkpoint.load(FIXTURES[name], progress=False)
  frag, _, _ = checkpoint.load(FIXTURES[name], progress=False, packing="fragment")
  auto, _, _ = checkpoint.load(FIXTURES[name], progress=False, packing="auto")
  for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
    a, b = node(base, path), node(frag, path)
    assert b.packing == "fragment" and node(auto, path).packing == "gptq"  # auto on a CPU keeps GPTQ's layout
    np.testing.assert_array_equal(np.asarray(b.qweight), jw4a16.layout.to_fragment_packed(np.asarray(a.qweight)))
    w = jw4a16.dequantize(b.qweight, b.scales, b.qzeros, group_size=b.group_size, packing="fragment")
    np.testing.assert_array_equal(np.asarray(w), np.asarray(jw4a16.dequantize(
        a.qweight, a.scales, a.qzeros, group_size=a.group_size)))
  with pytest.raises(ValueError, match="packing='frag' must be 'gptq', 'fragment' or 'auto'"):
    checkpoint.load(FIXTURES[name], progress=False, packing="frag")


def test_repack_params_names_the_layer():
  w = jw4a16.quantize(jnp.ones((96, 64)), group_size=32)  # K = 96: not whole blocks of 64
  with pytest.raises(CheckpointError, match=r"ckpt: model.proj: packing='fragment' needs .* K=96, group_size=32"):
    checkpoint.repack_params({"model": {"proj": w}}, "fragment", "ckpt: ")
  assert checkpoint.repack_params({"model": {"proj": w, "b": 1}}, "gptq")["model"]["proj"] is w
