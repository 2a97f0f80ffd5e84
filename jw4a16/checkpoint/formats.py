"""Int4 checkpoint formats -> kernel layout (`QuantizedWeight`), one function per format and Linear.

Notation: K = in_features, N = out_features, G = group size.  Each function takes the SafetensorsDir, the
Linear's prefix (e.g. 'model.layers.0.self_attn.q_proj') and the parsed scheme, and returns a QuantizedWeight with
numpy arrays.  Formats (see shared/NOTES.md and the libraries' source):

compressed-tensors pack-quantized: weight_packed [N, ceil(K/8)] int32 packed along K (stored nibble q + 8);
  weight_scale [N, K/G] (or [N, 1]); weight_shape [N, K]; weight_zero_point [ceil(N/8), K/G] int32 packed along N
  (stored zp + 8), or int8 [N, K/G] unpacked before compressed-tensors 0.9.4; weight_g_idx [K] (actorder group).
  Kernel layout: unpack along K, transpose, repack along N; scales = weight_scale.T; qzeros = weight_zero_point.T.
AutoGPTQ / GPTQModel: qweight [K/8, N] packed along K; qzeros [K/G, N/8] packed along N, storing zero - 1 (v1,
  "gptq") or zero ("gptq_v2"); scales [K/G, N]; g_idx [K].
AWQ GEMM: qweight [K, N/8] and qzeros [K/G, N/8] packed along N in nibble order [0,2,4,6,1,3,5,7]; scales [K/G, N].
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jw4a16 import checks
from jw4a16.checkpoint.safetensors_dir import CheckpointError, SafetensorsDir
from jw4a16.layout import AWQ_ORDER, pack_int4, repack_k_to_n, unpack_int4
from jw4a16.qweight import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Scheme:
  """What the config says about the quantized Linears."""

  format: str  # "compressed-tensors", "gptq", "awq"
  group_size: int  # -1 for channelwise
  symmetric: bool
  actorder: str | None = None
  checkpoint_format: str = ""  # gptq: "gptq" (v1) or "gptq_v2"
  ignore: tuple[str, ...] = ()


def _expect(name, arr, shape=None, dtypes=None):
  if shape is not None and tuple(arr.shape) != tuple(shape):
    raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
  if dtypes is not None and arr.dtype.name not in dtypes:
    raise CheckpointError(f"tensor {name!r} has dtype {arr.dtype.name}, expected {' or '.join(dtypes)}")
  return arr


def _finish(prefix, qweight, scales, qzeros, g_idx, k, g) -> QuantizedWeight:
  n = scales.shape[1]
  if n % 8:
    raise CheckpointError(f"{prefix}: N={n} output features is not a multiple of 8; the kernel cannot take it")
  try:
    if g_idx is not None:
      return QuantizedWeight.from_act_order(qweight, scales, qzeros, g_idx, group_size=g)
    return QuantizedWeight(qweight, scales, qzeros, None, checks.resolve_group_size(g, k), 8)
  except ValueError as e:
    raise CheckpointError(f"{prefix}: {e}") from e


def compressed_tensors_linear(st: SafetensorsDir, prefix: str, scheme: Scheme) -> QuantizedWeight:
  packed = _expect(f"{prefix}.weight_packed", st.get(f"{prefix}.weight_packed"), dtypes=("int32",))
  n, k = (int(v) for v in st.get(f"{prefix}.weight_shape")) if f"{prefix}.weight_shape" in st else (
      packed.shape[0], packed.shape[1] * 8)
  _expect(f"{prefix}.weight_packed", packed, (n, (k + 7) // 8))
  scale = _expect(f"{prefix}.weight_scale", st.get(f"{prefix}.weight_scale"),
                  dtypes=("bfloat16", "float16", "float32"))
  g = k if scheme.group_size in (-1, None) else scheme.group_size
  if k % g:
    raise CheckpointError(f"{prefix}: in_features K={k} is not a multiple of group_size={g}")
  _expect(f"{prefix}.weight_scale", scale, (n, k // g))
  q = unpack_int4(packed, axis=1)[:, :k]  # [N, K] stored nibbles (q + 8)
  qweight = pack_int4(np.ascontiguousarray(q.T), axis=1)  # [K, N // 8]: packed along N
  qzeros = None
  if not scheme.symmetric:
    zp = st.get(f"{prefix}.weight_zero_point")
    if zp.dtype == np.int32:  # packed along N (compressed-tensors >= 0.9.4): stored zp + 8
      _expect(f"{prefix}.weight_zero_point", zp, ((n + 7) // 8, k // g))
      qzeros = np.ascontiguousarray(zp.T)
    elif zp.dtype == np.int8:  # unpacked, signed zp (older compressed-tensors)
      _expect(f"{prefix}.weight_zero_point", zp, (n, k // g))
      qzeros = pack_int4((zp.astype(np.int32) + 8).T, axis=1)
    else:
      raise CheckpointError(f"tensor '{prefix}.weight_zero_point' has dtype {zp.dtype}, expected int32 or int8")
  g_idx = None
  if f"{prefix}.weight_g_idx" in st:
    g_idx = _expect(f"{prefix}.weight_g_idx", st.get(f"{prefix}.weight_g_idx"), (k,), ("int32", "int64"))
  return _finish(prefix, qweight, np.ascontiguousarray(scale.T), qzeros, g_idx, k, g)


def gptq_linear(st: SafetensorsDir, prefix: str, scheme: Scheme) -> QuantizedWeight:
  qw = _expect(f"{prefix}.qweight", st.get(f"{prefix}.qweight"), dtypes=("int32",))
  scales = st.get(f"{prefix}.scales")
  k, n = qw.shape[0] * 8, qw.shape[1]
  g = k if scheme.group_size in (-1, None) else scheme.group_size
  _expect(f"{prefix}.scales", scales, (k // g, n), ("float16", "bfloat16", "float32"))
  qweight = repack_k_to_n(qw)
  qz = _expect(f"{prefix}.qzeros", st.get(f"{prefix}.qzeros"), (k // g, n // 8), ("int32",))
  z = unpack_int4(qz, axis=1)
  if scheme.checkpoint_format != "gptq_v2":
    z = (z + 1) & 0xF  # v1 stores zero - 1 (a stored 0 for zero 1; zero 0 wraps to 15 upstream, a known bug)
  qzeros = None if scheme.symmetric and np.all(z == 8) else pack_int4(z, axis=1)
  g_idx = st.get(f"{prefix}.g_idx") if f"{prefix}.g_idx" in st else None
  return _finish(prefix, qweight, scales, qzeros, g_idx, k, g)


def awq_linear(st: SafetensorsDir, prefix: str, scheme: Scheme) -> QuantizedWeight:
  qw = _expect(f"{prefix}.qweight", st.get(f"{prefix}.qweight"), dtypes=("int32",))
  k, n = qw.shape[0], qw.shape[1] * 8
  g = k if scheme.group_size in (-1, None) else scheme.group_size
  scales = _expect(f"{prefix}.scales", st.get(f"{prefix}.scales"), (k // g, n), ("float16", "bfloat16", "float32"))
  qz = _expect(f"{prefix}.qzeros", st.get(f"{prefix}.qzeros"), (k // g, n // 8), ("int32",))
  qweight = pack_int4(unpack_int4(qw, axis=1, order=AWQ_ORDER), axis=1)
  qzeros = pack_int4(unpack_int4(qz, axis=1, order=AWQ_ORDER), axis=1)
  return _finish(prefix, qweight, scales, qzeros, None, k, g)


LINEAR_READERS = {"compressed-tensors": compressed_tensors_linear, "gptq": gptq_linear, "awq": awq_linear}
# The tensor whose presence marks a quantized Linear, per format.
MARKER = {"compressed-tensors": ".weight_packed", "gptq": ".qweight", "awq": ".qweight"}
