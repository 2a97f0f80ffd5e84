"""Launching the Triton kernel in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py).

Triton 3.9's interpreter stores bf16 as raw uint16: its tl.dot and its float add / sub / mul work on the raw bits
and its float32 -> bf16 cast truncates without carrying into the exponent.  `patch_interpreter` upcasts bf16 dot
operands, computes bf16 add / sub / mul in float32 rounded once to bf16 (as the GPU's bf16x2 instructions do),
and rounds float32 -> bf16 to nearest even through ml_dtypes, as the GPU does.  The kernel source itself is unchanged.
"""

import functools

import ml_dtypes
import numpy as np
import torch
import triton.language as tl

from jw4a16 import checks, layout, tuning
from jw4a16.kernels import KERNELS


@functools.cache
def patch_interpreter():
  from triton.runtime import interpreter as interp  # noqa: PLC0415

  orig_dot = interp.InterpreterBuilder.create_dot

  def up(h):
    if h.dtype.scalar == tl.bfloat16:
      data = h.data.view(np.uint16).astype(np.uint32) << 16
      return interp.TensorHandle(data.view(np.float32), tl.float32)
    return h

  def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return orig_dot(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

  orig_convert = interp._convert_float

  def convert_float(data, input_dtype, output_dtype, rounding_mode):
    if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
      return np.asarray(data).view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return orig_convert(data, input_dtype, output_dtype, rounding_mode)

  def bf16_op(orig, op):
    def create(self, lhs, rhs):
      if lhs.dtype.scalar != tl.bfloat16:
        return orig(self, lhs, rhs)
      out = op(up(lhs).data, up(rhs).data).astype(ml_dtypes.bfloat16).view(np.uint16)
      return interp.TensorHandle(out, lhs.dtype.scalar)
    return create

  for name, op in (("create_fadd", np.add), ("create_fsub", np.subtract), ("create_fmul", np.multiply)):
    setattr(interp.InterpreterBuilder, name, bf16_op(getattr(interp.InterpreterBuilder, name), op))
  interp.InterpreterBuilder.create_dot = create_dot
  interp._convert_float = convert_float


def _numpy(t):
  """A CPU torch tensor as numpy of its dtype (bf16 through ml_dtypes): the inverse of _torch."""
  return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _torch(a):
  a = np.asarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def run_kernel(x, qweight, scales, qzeros, *, group_size, cfg: tuning.KernelConfig, zp_bias=8, g_idx=None):
  """Mirrors ops._launch (act-order sort, split-K scratch) with CPU torch tensors; returns float32 numpy.
  qweight in GPTQ packing; the frag kernel gets it repacked (layout.to_fragment_packed), without inline PTX."""
  patch_interpreter()
  x = np.asarray(x)
  qweight = np.asarray(qweight)
  k = x.shape[-1]
  g = checks.resolve_group_size(group_size, k)
  if g_idx is not None:
    perm = checks.act_order_permutation(np.asarray(g_idx), g, k // g)
    qweight, x = qweight[perm], x[..., perm]
  x2 = x.reshape(-1, k)
  m, n = x2.shape[0], np.asarray(scales).shape[1]
  cfg = tuning.legalize(cfg, k, g)
  dtype = torch.bfloat16 if x.dtype == ml_dtypes.bfloat16 else torch.float16
  out = torch.full((m, n), float("nan"), dtype=dtype)  # an element the kernel leaves unwritten fails the test
  partials, locks = cfg.scratch_shapes(m, n)
  partials = torch.full(partials, float("nan"))  # garbage, as on the GPU: every slot read must be written first
  locks = torch.zeros(locks, dtype=torch.int32)
  s = _torch(scales)
  extra = {}
  if cfg.kernel == "frag":
    qweight, extra = layout.to_fragment_packed(qweight), {"PTX": 0}
  KERNELS[cfg.kernel][cfg.grid(m, n)](
      _torch(x2), _torch(qweight), s, s if qzeros is None else _torch(qzeros), m, locks, out, partials,
      N=n, K=k, GROUP_SIZE=g, HAS_ZP=qzeros is not None, ZP_BIAS=zp_bias, num_warps=cfg.num_warps, **cfg.meta(),
      **extra)
  if cfg.split_k > 1:  # every tile's last program set its counter back to zero, for the next launch
    assert (locks == 0).all(), locks
  return out.float().numpy().reshape(*x.shape[:-1], n)


def run_attention_kernel(q, k_cache, v_cache, lengths, *, split: int, block_s: int = 64):
  """Mirrors jw4a16.attention.decode_attention with CPU torch tensors: q [B, H, D], caches [B, S, KVH, D] (bf16
  or fp16 numpy), lengths [B] -> float32 numpy [B, H, D].  Checks that the counters are left at zero."""
  from jw4a16.kernels.decode_attention import block_rows, decode_attention_kernel, step_rows  # noqa: PLC0415

  patch_interpreter()
  q, k_cache, v_cache = (np.asarray(a) for a in (q, k_cache, v_cache))
  b, h, d = q.shape
  s, kvh = k_cache.shape[1], k_cache.shape[2]
  r = h // kvh
  block_r = block_rows(r)
  dtype = torch.bfloat16 if q.dtype == ml_dtypes.bfloat16 else torch.float16
  out = torch.full((b, h, d), float("nan"), dtype=dtype)  # an element left unwritten fails the test
  slots = b * kvh * split if split > 1 else 1
  part_acc = torch.full((slots, block_r, d), float("nan"))  # garbage, as on the GPU
  part_ml = torch.full((slots, 2, block_r), float("nan"))
  locks = torch.zeros(b * kvh + 1, dtype=torch.int32)
  decode_attention_kernel[(b * kvh, split)](
      _torch(q), _torch(k_cache), _torch(v_cache), torch.from_numpy(np.asarray(lengths, np.int32)), locks, out,
      part_acc, part_ml, S=s, KVH=kvh, R=r, D=d, SCALE=float(d**-0.5), BLOCK_R=block_r, BLOCK_S=block_s,
      SPLIT=split, ROWS=step_rows(r), num_warps=4, num_stages=3)
  assert (locks == 0).all(), locks
  return out.float().numpy()


def run_attention_step_kernel(qkv, cos, sin, k_cache, v_cache, lengths, *, split: int, block_s: int = 64):
  """Mirrors jw4a16.attention.decode_attention_step: qkv [B, (H + 2 KVH) * D] (or float32 split-K slots [P, B,
  ...] of it), cos and sin [D], caches [B, S, KVH, D] (bf16 or fp16 numpy), lengths [B] -> (float32 numpy out [B,
  H, D], k_cache, v_cache as numpy of the cache dtype).  The caches are passed as both input and output, as the
  aliased GPU call does.  Checks that the counters are left at zero."""
  from jw4a16.kernels.decode_attention import block_rows, decode_attention_step_kernel, step_rows  # noqa: PLC0415

  patch_interpreter()
  qkv, cos, sin, k_cache, v_cache = (np.asarray(a) for a in (qkv, cos, sin, k_cache, v_cache))
  b, s, kvh, d = k_cache.shape
  parts = qkv.shape[0] if qkv.ndim == 3 else 0
  h = qkv.shape[-1] // d - 2 * kvh
  r = h // kvh
  block_r = block_rows(r)
  dtype = torch.bfloat16 if k_cache.dtype == ml_dtypes.bfloat16 else torch.float16
  out = torch.full((b, h, d), float("nan"), dtype=dtype)
  slots = b * kvh * split if split > 1 else 1
  part_acc = torch.full((slots, block_r, d), float("nan"))
  part_ml = torch.full((slots, 2, block_r), float("nan"))
  locks = torch.zeros(b * kvh + 1, dtype=torch.int32)
  kc, vc = _torch(k_cache), _torch(v_cache)
  decode_attention_step_kernel[(b * kvh, split)](
      _torch(qkv), _torch(cos), _torch(sin), kc, vc, torch.from_numpy(np.asarray(lengths, np.int32)), locks, out,
      kc, vc, part_acc, part_ml, S=s, KVH=kvh, R=r, D=d, SCALE=float(d**-0.5), BLOCK_R=block_r, BLOCK_S=block_s,
      SPLIT=split, PARTS=parts, SLOT=b * (h + 2 * kvh) * d if parts else 0, ROWS=step_rows(r), num_warps=4,
      num_stages=3)
  assert (locks == 0).all(), locks

  return out.float().numpy(), _numpy(kc), _numpy(vc)


def run_rms_norm_kernel(x, weight, eps: float, residual=None):
  """Mirrors jw4a16.norm.rms_norm_kernel_call: x [rows, N] (bf16 or fp16 numpy), weight [N], residual like x ->
  out, or (out, x + residual), as numpy of x's dtype."""
  from jw4a16.kernels.rms_norm import launch_params, rms_norm_kernel  # noqa: PLC0415

  patch_interpreter()
  x = np.asarray(x)
  dtype = torch.bfloat16 if x.dtype == ml_dtypes.bfloat16 else torch.float16
  out = torch.full(x.shape, float("nan"), dtype=dtype)
  res_out = torch.full(x.shape if residual is not None else (1,), float("nan"), dtype=dtype)
  params = launch_params(x.shape[-1])
  rms_norm_kernel[(x.shape[0],)](
      _torch(x), _torch(x if residual is None else residual), _torch(weight), out, res_out, N=x.shape[-1],
      EPS=float(eps), BLOCK_N=params["BLOCK_N"], HAS_RES=int(residual is not None), num_warps=params["num_warps"])

  return _numpy(out) if residual is None else (_numpy(out), _numpy(res_out))


def run_dequant_kernel(words, scales, qzeros, *, group_size, zp_bias=8, block_k=256):
  """Mirrors jw4a16.ops.dequantize_fragment_call: fragment-packed words [ceil(N / 64), 8 K], scales [K // G, N]
  (bf16 or fp16 numpy), qzeros [K // G, N // 8] or None -> W [K, N] as numpy of the scales' dtype."""
  from jw4a16.kernels.dequant import dequant_fragment_kernel  # noqa: PLC0415

  patch_interpreter()
  scales = np.asarray(scales)
  k, n = np.asarray(words).shape[1] // 8, scales.shape[1]
  dtype = torch.bfloat16 if scales.dtype == ml_dtypes.bfloat16 else torch.float16
  out = torch.full((k, n), float("nan"), dtype=dtype)  # an element left unwritten fails the test
  s = _torch(scales)
  dequant_fragment_kernel[(np.asarray(words).shape[0], k // block_k)](
      _torch(words), s, s if qzeros is None else _torch(qzeros), out, N=n, K=k,
      GROUP_SIZE=checks.resolve_group_size(group_size, k), HAS_ZP=qzeros is not None, ZP_BIAS=zp_bias,
      BLOCK_K=block_k, num_warps=4)
  return _numpy(out)


__all__ = ["patch_interpreter", "run_dequant_kernel", "run_attention_kernel", "run_attention_step_kernel", "run_kernel",
           "run_rms_norm_kernel"]
