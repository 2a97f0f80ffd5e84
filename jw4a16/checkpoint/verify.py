"""Checks converted weights against an independent dequantization written from each format's own layout."""

from __future__ import annotations

import numpy as np

from jw4a16.checkpoint.formats import Scheme
from jw4a16.checkpoint.loaders import quantized_prefixes
from jw4a16.checkpoint.safetensors_dir import CheckpointError, SafetensorsDir
from jw4a16.layout import AWQ_ORDER, unpack_int4
from jw4a16.qweight import QuantizedWeight
from jw4a16.reference import dequantize


def source_dequant(st: SafetensorsDir, prefix: str, scheme: Scheme) -> np.ndarray:
  """The dense [K, N] float32 weight computed straight from the source tensors, in the source's own layout
  (compressed-tensors' decompress formula; GPTQ's and AWQ's reference dequantization)."""
  if scheme.format == "compressed-tensors":
    n, k = (int(v) for v in st.get(f"{prefix}.weight_shape"))
    q = unpack_int4(st.get(f"{prefix}.weight_packed"), axis=1)[:, :k].astype(np.float32)  # [N, K]
    s = st.get(f"{prefix}.weight_scale").astype(np.float32)  # [N, K/G]
    g = k // s.shape[1]
    cols = np.arange(k) // g
    if f"{prefix}.weight_g_idx" in st:
      cols = st.get(f"{prefix}.weight_g_idx").astype(np.int64)
    if scheme.symmetric:
      z = np.float32(8)
    else:
      zp = st.get(f"{prefix}.weight_zero_point")
      z = (unpack_int4(zp, axis=0)[:n] if zp.dtype == np.int32 else zp.astype(np.int32) + 8).astype(np.float32)
      z = z[:, cols]
    return ((q - z) * s[:, cols]).T
  if scheme.format == "gptq":
    q = unpack_int4(st.get(f"{prefix}.qweight"), axis=0).astype(np.float32)  # [K, N]
    s = st.get(f"{prefix}.scales").astype(np.float32)
    z = unpack_int4(st.get(f"{prefix}.qzeros"), axis=1)
    z = ((z + 1) & 0xF if scheme.checkpoint_format != "gptq_v2" else z).astype(np.float32)
    k = q.shape[0]
    rows = st.get(f"{prefix}.g_idx").astype(np.int64) if f"{prefix}.g_idx" in st else np.arange(k) // (k // len(s))
    return (q - z[rows]) * s[rows]
  if scheme.format == "awq":
    q = unpack_int4(st.get(f"{prefix}.qweight"), axis=1, order=AWQ_ORDER).astype(np.float32)
    z = unpack_int4(st.get(f"{prefix}.qzeros"), axis=1, order=AWQ_ORDER).astype(np.float32)
    s = st.get(f"{prefix}.scales").astype(np.float32)
    rows = np.arange(q.shape[0]) // (q.shape[0] // len(s))
    return (q - z[rows]) * s[rows]
  raise CheckpointError(f"no source dequantization for format {scheme.format!r}")


def _find(params, prefix):
  node = params
  for part in prefix.split("."):
    node = node[part]
  return node


def check_sample(path, params, scheme: Scheme, count: int = 4) -> list[str]:
  """Compares `count` layers spread over the checkpoint; raises CheckpointError on any difference."""
  st = SafetensorsDir(path)
  prefixes = quantized_prefixes(st, scheme)
  if not prefixes:
    return []
  picks = [prefixes[i] for i in np.unique(np.linspace(0, len(prefixes) - 1, max(1, count)).astype(int))]
  for prefix in picks:
    w: QuantizedWeight = _find(params, prefix)
    # both sides round (q - z) * s once to the scales' dtype
    mine = np.asarray(dequantize(w.qweight, w.scales, w.qzeros, group_size=w.group_size, zp_bias=w.zp_bias),
                      np.float32)
    if w.perm is not None:  # rows sorted by group: put them back in checkpoint order
      mine = mine[np.argsort(np.asarray(w.perm))]
    src = source_dequant(st, prefix, scheme)
    src = src.astype(np.asarray(w.scales).dtype).astype(np.float32)
    if mine.shape != src.shape or not np.array_equal(mine, src):
      bad = np.argwhere(mine != src)[:3].tolist() if mine.shape == src.shape else "shape"
      raise CheckpointError(f"{path}: {prefix} does not match the source's dequantization (first differences "
                            f"at {bad})")
  return picks
