"""Independent writers of GPTQ, AWQ and compressed-tensors (with weight_g_idx) checkpoints, from the formats'
documented layouts (shared/NOTES.md, the libraries' packers), with explicit per-nibble loops that share no code
with jw4a16.layout.  GPTQModel (7.7.0) and AutoAWQ (0.2.9) come only as source distributions built against CUDA
torch; building them on our CPU machines was not attempted.  compressed-tensors >= 0.19 no longer writes
weight_g_idx.  So these writers stand in for those three producers."""

import json
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def pack_rows(vals, order=(0, 1, 2, 3, 4, 5, 6, 7)):
  """[R, C] values 0..15 -> [R // 8, C] int32: word r holds rows 8r..8r+7, logical row order[i] in bits 4i."""
  r, c = vals.shape
  out = np.zeros((r // 8, c), np.uint32)
  for w in range(r // 8):
    for i in range(8):
      out[w] |= vals[8 * w + order[i]].astype(np.uint32) << np.uint32(4 * i)
  return out.view(np.int32)


def pack_cols(vals, order=(0, 1, 2, 3, 4, 5, 6, 7)):
  return np.ascontiguousarray(pack_rows(np.ascontiguousarray(vals.T), order).T)


def _random(k, n, g, seed, act_order, symmetric):
  rng = np.random.default_rng(seed)
  q = rng.integers(0, 16, (k, n))
  z = np.full((k // g, n), 8) if symmetric else rng.integers(1, 16, (k // g, n))  # v1 GPTQ cannot store zero 0
  s = (rng.random((k // g, n)) * 0.01 + 0.001).astype(np.float16)
  g_idx = (rng.permutation(k) // g).astype(np.int32) if act_order else (np.arange(k) // g).astype(np.int32)
  dense = ((q - z[g_idx]) * s.astype(np.float32)[g_idx]).astype(np.float16)
  return q, z, s, g_idx, dense


def _config(path, qc, k, n):
  cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": k, "intermediate_size": n, "dtype": "float16",
         "quantization_config": qc}
  (pathlib.Path(path) / "config.json").write_text(json.dumps(cfg))


def write_gptq(path, k=256, n=64, g=64, *, act_order=True, symmetric=False, v2=False, seed=0):
  """AutoGPTQ layout: qweight [K/8, N] packed along K, qzeros [K/G, N/8] along N storing zero - 1 (v1) or zero
  (v2), scales [K/G, N], g_idx [K].  Returns the dense [K, N] weight the checkpoint means."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  q, z, s, g_idx, dense = _random(k, n, g, seed, act_order, symmetric)
  stored_z = z if v2 else (z - 1) & 0xF
  save_file({"layer.qweight": pack_rows(q), "layer.qzeros": pack_cols(stored_z), "layer.scales": s,
             "layer.g_idx": g_idx, "norm.weight": np.ones(k, np.float16)}, str(path / "model.safetensors"))
  _config(path, {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": act_order, "sym": symmetric,
                 "checkpoint_format": "gptq_v2" if v2 else "gptq"}, k, n)
  return dense


def write_awq(path, k=256, n=64, g=64, *, seed=0):
  """AWQ GEMM layout: qweight [K, N/8], qzeros [K/G, N/8] packed along N in order [0,2,4,6,1,3,5,7]."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  q, z, s, g_idx, dense = _random(k, n, g, seed, False, False)
  order = (0, 2, 4, 6, 1, 3, 5, 7)
  save_file({"layer.qweight": pack_cols(q, order), "layer.qzeros": pack_cols(z, order), "layer.scales": s},
            str(path / "model.safetensors"))
  _config(path, {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"}, k, n)
  return dense


def write_ct_gidx(path, k=256, n=64, g=64, *, seed=0, symmetric=False):
  """compressed-tensors pack-quantized with actorder "group" (weight_g_idx), as written before 0.19: weight_packed
  [N, K/8] along K storing q + 8 ... here q already in 0..15 (the stored nibble), weight_zero_point
  [N/8, K/G] along N (stored zp + 8), weight_scale [N, K/G], weight_shape [N, K]."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  q, z, s, g_idx, dense = _random(k, n, g, seed, True, symmetric)
  tensors = {"layer.weight_packed": pack_cols(q.T), "layer.weight_scale": np.ascontiguousarray(s.T).astype(
      ml_dtypes.bfloat16), "layer.weight_shape": np.array([n, k], np.int64), "layer.weight_g_idx": g_idx}
  if not symmetric:
    tensors["layer.weight_zero_point"] = pack_rows(np.ascontiguousarray(z.T))
  save_file(tensors, str(path / "model.safetensors"))
  weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": g,
             "actorder": "group"}
  _config(path, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                 "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": []}, k, n)
  # scales were rounded to bf16 in this format: recompute the meaning with the stored scales
  s_b = s.astype(ml_dtypes.bfloat16).astype(np.float32)
  return ((q - z[g_idx]) * s_b[g_idx]).astype(np.float32)
