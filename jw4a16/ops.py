"""`w4a16_matmul`: validation, dispatch between the Triton kernel and the jnp reference, batching.

Path selection (trace time): `backend=` if given, else the JW4A16_BACKEND environment variable, else "auto":
Triton when JAX's default backend is a GPU (cuda or rocm) and jax-triton imports; the reference otherwise.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import checks, launch, tuning
from jw4a16.qweight import QuantizedWeight
from jw4a16.reference import dequantize, dequantize_fragment_nk, w4a16_matmul_reference

BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV = "JW4A16_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason(platform: str) -> str | None:
  """None when the Triton path can run on `platform`, else why not."""
  if platform not in ("gpu", "cuda", "rocm"):
    return f"JAX's backend is {platform!r}, not a GPU"
  try:
    import jax_triton  # noqa: F401, PLC0415 - raises ImportError on CPU-only JAX
  except ImportError as e:
    return f"jax_triton does not import ({e}); pip install 'jw4a16[gpu]'"
  return None


def resolve_backend(backend: str | None = None) -> str:
  """'triton' or 'reference' for this trace."""
  choice = backend or os.environ.get(BACKEND_ENV, "auto")
  if choice not in BACKENDS:
    raise ValueError(f"backend={choice!r} (argument or ${BACKEND_ENV}) must be one of {BACKENDS}")
  if choice == "reference":
    return "reference"
  reason = triton_unavailable_reason(jax.default_backend())
  if choice == "triton" and reason:
    raise RuntimeError(f"backend='triton' was requested but the Triton path cannot run: {reason}")
  return "reference" if reason else "triton"


def current_target() -> tuning.Target:
  return tuning.target_from_device(jax.devices()[0])


def preferred_packing(k: int, group_size: int, backend: str | None = None) -> str:
  """The weight packing to load [K, N] int4 weights into for this process's device: "fragment" where its kernel
  was measured fastest (H100, and the same chip's H200: tuning.FRAGMENT_TARGETS) and K and the group fit its
  64-value blocks; "gptq" otherwise (other GPUs, the reference path)."""
  if resolve_backend(backend) != "triton" or current_target().name not in tuning.FRAGMENT_TARGETS:
    return "gptq"
  return "fragment" if checks.fragment_fits(k, checks.resolve_group_size(group_size, k)) else "gptq"


def resolve_packing(packing: str, k: int, group_size: int) -> str:
  """`packing` itself, or for "auto" the `preferred_packing` of a [K, N] weight with this group size."""
  return preferred_packing(k, group_size) if packing == "auto" else packing


def split_counters(n: int, launcher: str) -> jax.Array:
  """The split-K kernels' n arrival counters, zero at the launch.

  The kernels draw tickets from them and the last program of each tile sets its counter back to zero
  (kernels/splitk.py), so one zeroed buffer serves every launch after it.  With jax-triton's launch (the
  default) they are a constant of the compiled program: the buffer lives as long as the executable and no memset
  runs per call (session 12, docs/performance.md).  XLA runs those launches one after another on its stream, so
  launches that share the buffer (equal constants may be merged) never overlap.  The FFI launch may be captured
  into XLA's command buffers, where launches without a data dependence can run at once: it gets a fresh zeroed
  buffer per call instead (XLA writes the zeros).  The constant's last element, one past the counters, is 1 and
  never read: a constant of all zeros may be rewritten as a broadcast, which writes them on every call."""
  if launcher == "ffi":
    return jnp.zeros((n,), jnp.int32)
  return jnp.asarray(np.concatenate([np.zeros(n, np.int32), np.ones(1, np.int32)]))


DEQUANT_ENV = "JW4A16_DEQUANT"  # how the fragment packing's dequantize-then-GEMM route runs: "triton" or "xla"


def _dequant_block_k(k: int) -> int:
  return next(b for b in (256, 128, 64) if k % b == 0)  # the fragment packing holds K % 64 == 0


def dequantize_fragment_call(qweight, scales, qzeros, *, group_size, zp_bias, dtype, launcher="legacy"):
  """Fragment-packed words [ceil(N / 64), 8 K] -> W [K, N] in `dtype` on the GPU (kernels/dequant.py),
  bit-identical to `reference.dequantize_fragment_nk(...).T`."""
  from jw4a16.kernels.dequant import dequant_fragment_kernel  # noqa: PLC0415

  n, k = scales.shape[1], qweight.shape[1] // 8
  block_k = _dequant_block_k(k)
  (w,) = launch.triton_call_for(launcher)(
      qweight, scales, scales if qzeros is None else qzeros,
      kernel=dequant_fragment_kernel, grid=(qweight.shape[0], k // block_k), name="jw4a16_dequant_fragment",
      out_shape=(jax.ShapeDtypeStruct((k, n), dtype),), num_warps=4, num_stages=1, N=n, K=k,
      GROUP_SIZE=checks.resolve_group_size(group_size, k), HAS_ZP=qzeros is not None, ZP_BIAS=zp_bias,
      BLOCK_K=block_k, PTX=int(current_target().warp_size == 32))
  return w


def dequant_gemm(x2d, qweight, scales, qzeros, *, group_size, zp_bias, packing="gptq", launcher="legacy"):
  """The dequantize-then-GEMM route: W written once in x's dtype, then one dense GEMM in x's dtype (cuBLAS /
  hipBLASLt accumulate 16-bit GEMMs in fp32 and round the output once).  Asking XLA for an fp32 product instead
  (preferred_element_type) made cuBLAS write fp32 and a second kernel convert it: 1.2 - 1.3x the GEMM's time at
  M = 1024 - 4096 on H100 (session 15).  The fragment packing: the Triton kernel writes W [K, N] (default), or with
  $JW4A16_DEQUANT=xla XLA writes W^T [N, K] and the GEMM contracts K of both operands (sessions 7 - 14; x @ W
  measured 0.79 - 0.95x its time on H100, session 15)."""
  how = os.environ.get(DEQUANT_ENV, "triton")
  if how not in ("triton", "xla"):
    raise ValueError(f"${DEQUANT_ENV}={how!r} must be one of 'triton', 'xla'")
  kw = dict(group_size=group_size, zp_bias=zp_bias)
  if packing == "fragment" and how == "xla":
    wt = dequantize_fragment_nk(qweight, scales, qzeros, **kw, dtype=x2d.dtype)
    return jax.lax.dot_general(x2d, wt, (((1,), (1,)), ((), ())))
  w = (dequantize_fragment_call(qweight, scales, qzeros, **kw, dtype=x2d.dtype, launcher=launcher)
       if packing == "fragment" else dequantize(qweight, scales, qzeros, **kw, dtype=x2d.dtype))
  return jnp.matmul(x2d, w)


def _launch(x2d, qweight, scales, qzeros, *, group_size, zp_bias, config, packing="gptq", launcher="legacy"):
  """One triton_call on [M, K] activations (M > 0); returns [M, N] in x's dtype.

  Without a forced config, large M on targets where it measured faster takes the dequantize-then-GEMM route
  instead (dequant_gemm): the weight is dequantized in one pass and cuBLAS/hipBLASLt multiplies.
  """
  m, k = x2d.shape
  n = scales.shape[1]
  target = current_target()
  if config is None and tuning.use_dequant_gemm(m, target, checks.resolve_group_size(group_size, k), packing):
    return dequant_gemm(x2d, qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias, packing=packing,
                        launcher=launcher)

  from jw4a16.kernels import KERNELS  # noqa: PLC0415

  dtype = np.dtype(x2d.dtype).name
  if config is not None:
    tuning.check_config(config, k, group_size)
  cfg = config or tuning.select_config(m, k, n, group_size, dtype, qzeros is not None, target, packing)
  extra = {"PTX": int(target.warp_size == 32)} if cfg.kernel == "frag" else {}  # NVIDIA: inline-PTX unpacking
  partials, locks = cfg.scratch_shapes(m, n)
  # jax-triton's custom call, or ("ffi") the same kernel as jaxlib's FFI Triton call (launch.py)
  out, _ = launch.triton_call_for(launcher)(
      x2d, qweight, scales, scales if qzeros is None else qzeros, m, split_counters(locks[0], launcher),
      kernel=KERNELS[cfg.kernel], grid=cfg.grid(m, n), name=f"jw4a16_w4a16_{cfg.kernel}",
      out_shape=(jax.ShapeDtypeStruct((m, n), x2d.dtype), jax.ShapeDtypeStruct(partials, jnp.float32)),
      num_warps=cfg.num_warps, num_stages=cfg.num_stages,
      N=n, K=k, GROUP_SIZE=group_size, HAS_ZP=qzeros is not None, ZP_BIAS=zp_bias, **cfg.meta(), **extra)
  return out


def _inference_only(fn):
  """Wraps fn(x, *weights) so that differentiating it raises a clear error instead of a deep one."""
  wrapped = jax.custom_jvp(fn)

  @wrapped.defjvp
  def _jvp(primals, tangents):
    del primals, tangents
    raise NotImplementedError(
        "jw4a16.w4a16_matmul is an inference-only op: it has no gradient (int4 weights are frozen). "
        "Differentiate a float copy of the weights instead (jw4a16.dequantize).")

  return wrapped


@functools.lru_cache(maxsize=None)
def _batched_kernel_call(group_size: int, zp_bias: int, config: tuning.KernelConfig | None, packing: str,
                         launcher: str = "legacy"):
  """custom_vmap'ed [M, K] x [K, N] kernel call: a vmap over x folds the batch into M (one launch); a vmap
  over the weights (stacked layers) runs one launch per batch member with lax.map.  The launcher is part of the
  key: jax caches the traced call per function and shapes, so one function per launcher."""

  def call(x2d, qweight, scales, qzeros):
    return _launch(x2d, qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias, config=config,
                   packing=packing, launcher=launcher)

  @jax.custom_batching.custom_vmap
  def f(x2d, qweight, scales, qzeros):
    if x2d.shape[0] == 0:
      return jnp.zeros((0, scales.shape[1]), x2d.dtype)
    return call(x2d, qweight, scales, qzeros)

  @f.def_vmap
  def _rule(axis_size, in_batched, x2d, qweight, scales, qzeros):
    xb, qwb, sb, qzb = in_batched
    if not (qwb or sb or any(jax.tree_util.tree_leaves(qzb))):
      b, m, k = x2d.shape
      return f(x2d.reshape(b * m, k), qweight, scales, qzeros).reshape(b, m, -1), True

    def bcast(a, batched):
      return a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)

    args = (bcast(x2d, xb), bcast(qweight, qwb), bcast(scales, sb),
            None if qzeros is None else bcast(qzeros, qzb))
    return jax.lax.map(lambda a: f(*a), args), True

  return _inference_only(f)


@functools.lru_cache(maxsize=None)
def _reference_call(group_size: int, zp_bias: int, packing: str):
  def f(x, qweight, scales, qzeros, g_idx, perm):
    return w4a16_matmul_reference(x, qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias, g_idx=g_idx,
                                  perm=perm, packing=packing)

  return _inference_only(f)


def w4a16_matmul(x, qweight, scales, qzeros=None, *, group_size: int, zp_bias: int = 8, g_idx=None, perm=None,
                 packing: str = "gptq", backend: str | None = None, config: tuning.KernelConfig | None = None):
  """x [..., K] @ W [K, N] -> [..., N] in x's dtype, W = (q - z) * s dequantized on the fly.

  Args:
    x: [..., K] float16 or bfloat16, any number of leading dims (their product M may be 0).
    qweight: [K, N // 8] int32, GPTQ sequential packing along N: word (k, j) holds columns 8j..8j+7 of row k,
      column 8j+i in bits 4i..4i+3.
    scales: [K // G, N] in x's dtype.
    qzeros: [K // G, N // 8] int32 packed like qweight (stored zero points, used as stored), or None for
      symmetric uint4b8 weights whose zero is `zp_bias`.
    group_size: G in {32, 64, 128, 256}, or -1 for one group of K rows (channelwise).
    zp_bias: the zero point when qzeros is None (8 for uint4b8).
    g_idx: [K] int, act-order: row k uses group g_idx[k].  The rows are sorted by group and x's columns
      permuted to match on each call; the sort of qweight then costs a pass over the weights per call, so for
      repeated use store the sorted weights once (`QuantizedWeight.from_act_order`) and pass perm instead.
      Concrete g_idx is checked here (every group must own exactly G rows); traced g_idx is checked on
      the device, and a failed check turns the output into NaN rather than a silently wrong result.
    perm: [K] int, qweight's rows are already sorted by group; x's columns are gathered by perm.
    packing: "gptq" (qweight as above) or "fragment": qweight [ceil(N / 64), 8 K] from `layout.to_fragment_packed`
      (or `QuantizedWeight.repack`), done once at load time; K a multiple of 64, G one too or 32, no g_idx (use
      perm).  The fastest layout on H100 (`jw4a16.preferred_packing` says which to use on this device).
    backend: "auto" (default; or $JW4A16_BACKEND), "triton" or "reference".
    config: a `jw4a16.tuning.KernelConfig` to force a tile shape (Triton path only).

  Inference only: jax.grad through it raises.  Works under jax.jit and jax.vmap (a vmap over x folds into M).
  """
  k, n, g = checks.check_matmul_args(x, qweight, scales, qzeros, group_size, zp_bias, g_idx, perm, packing)
  if config is not None and (config.kernel == "frag") != (packing == "fragment"):
    raise ValueError(f"config.kernel={config.kernel!r} does not read packing={packing!r} weights: kernel 'frag' "
                     "reads packing='fragment', the others packing='gptq'")
  path = resolve_backend(backend)
  valid = None  # traced g_idx: its check runs on the device
  if g_idx is not None:
    known = checks.concrete_or_none(g_idx)
    if known is not None:
      sort = jnp.asarray(checks.act_order_permutation(known, g, k // g))
    else:
      sort = jnp.argsort(g_idx, stable=True).astype(jnp.int32)
      valid = jnp.all(jnp.take(g_idx, sort) == jnp.arange(k, dtype=g_idx.dtype) // g)
  elif perm is not None and (known := checks.concrete_or_none(perm)) is not None:
    checks.check_perm(known)

  if path == "reference":
    out = _reference_call(g, zp_bias, packing)(x, qweight, scales, qzeros, g_idx, perm)
  else:
    if g_idx is not None:  # act-order rows in checkpoint order: sort them by group for this call
      qweight, perm = jnp.take(qweight, sort, axis=0), sort
    if perm is not None:
      x = jnp.take(x, jnp.asarray(perm, jnp.int32), axis=-1)
    lead = x.shape[:-1]
    out = _batched_kernel_call(g, zp_bias, config, packing, launch.resolve_launcher())(
        x.reshape(math.prod(lead), k), qweight, scales, qzeros)
    out = out.reshape(*lead, n)
  if valid is not None:
    out = jnp.where(valid, out, jnp.nan).astype(x.dtype)
  return out


def quantized_matmul(x, w: QuantizedWeight, *, backend: str | None = None, config=None):
  """`w4a16_matmul` on a QuantizedWeight."""
  return w4a16_matmul(x, w.qweight, w.scales, w.qzeros, group_size=w.group_size, zp_bias=w.zp_bias, perm=w.perm,
                      packing=w.packing, backend=backend, config=config)
