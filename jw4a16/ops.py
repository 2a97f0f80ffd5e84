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
from jw4a16.reference import (SSQ_BLOCK, dequantize, dequantize_fragment_nk, residual_sum, rms_norm_from_ssq,
                               sum_squares, w4a16_matmul_reference)

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


NO_EXTRAS = (None, None, None, None)  # (norm weight, norm ssq, residual, residual norm weight)


def _norm_in(x2d, extras, eps):
  """x2d itself, or its RMSNorm (the jnp form of the frag kernel's NORM): with a norm weight, of x2d; with only
  the squares, x2d is h times the weight already and only its rows are scaled."""
  gamma, ssq = extras[:2]
  return x2d if gamma is None and ssq is None else rms_norm_from_ssq(x2d, gamma, eps, ssq)


def _res_out(y, extras, partials: bool = False):
  """y, or with a residual, residual_sum's (the jnp form of the kernel's RES, RES_GAMMA); with partials, y as the
  one float32 slot [1, M, N] (w4a16_matmul's partials)."""
  if partials:
    return y.astype(jnp.float32)[None]
  return y if extras[2] is None else residual_sum(y, *extras[2:])


def _launch(x2d, qweight, scales, qzeros, extras=NO_EXTRAS, *, group_size, zp_bias, config,
            packing="gptq", launcher="legacy", eps=0.0, partials=False):
  """One triton_call on [M, K] activations (M > 0); returns [M, N] in x's dtype (with a residual in extras,
  also its sums of squares [M, N // 64]; with partials, float32 slots [S, M, N] that sum to the product:
  w4a16_matmul's partials).

  Without a forced config, large M on targets where it measured faster takes the dequantize-then-GEMM route
  instead (dequant_gemm): the weight is dequantized in one pass and cuBLAS/hipBLASLt multiplies.
  extras = (norm weight, norm ssq, residual, residual norm weight), any of them None (w4a16_matmul's
  norm_weight, norm_ssq, residual, residual_norm_weight): folded into the frag kernel (w4a16_frag_norm_kernel);
  around the other kernels and the dense route, jnp.
  """
  m, k = x2d.shape
  n = scales.shape[1]
  target = current_target()
  if config is None and tuning.use_dequant_gemm(m, target, checks.resolve_group_size(group_size, k), packing):
    y = dequant_gemm(_norm_in(x2d, extras, eps), qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias,
                     packing=packing, launcher=launcher)
    return _res_out(y, extras, partials)

  from jw4a16.kernels import KERNELS, w4a16_frag_norm_kernel  # noqa: PLC0415

  dtype = np.dtype(x2d.dtype).name
  if config is not None:
    tuning.check_config(config, k, group_size)
  cfg = config or tuning.select_config(m, k, n, group_size, dtype, qzeros is not None, target, packing)
  fused = partials or any(e is not None for e in extras)
  if fused and cfg.kernel != "frag":
    y = _launch(_norm_in(x2d, extras, eps), qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias,
                config=cfg, packing=packing, launcher=launcher)
    return _res_out(y, extras, partials)
  extra = {"PTX": int(target.warp_size == 32)} if cfg.kernel == "frag" else {}  # NVIDIA: inline-PTX unpacking
  slots, locks = cfg.scratch_shapes(m, n)
  if partials:  # every split's product is an output; no ticket, no sum, no [M, N] result in the kernel
    slots, locks = (cfg.split_k, m, n), (1,)
  args = (x2d, qweight, scales, scales if qzeros is None else qzeros, m, split_counters(locks[0], launcher))
  out_shape = (jax.ShapeDtypeStruct((1,) if partials else (m, n), x2d.dtype),
               jax.ShapeDtypeStruct(slots, jnp.float32))
  kernel = KERNELS[cfg.kernel]
  if fused:  # the frag kernel with the norm and/or the residual folded in
    gamma, ssq, res, res_gamma = extras
    if gamma is not None and ssq is None:
      ssq = sum_squares(x2d)
    args += tuple(x2d if a is None else a for a in (gamma, ssq, res, res_gamma))
    out_shape += (jax.ShapeDtypeStruct((m, n // SSQ_BLOCK) if res is not None else (1,), jnp.float32),
                  jax.ShapeDtypeStruct((m, n) if res_gamma is not None else (1,), x2d.dtype))
    kernel = w4a16_frag_norm_kernel
    extra.update(NORM=1 if gamma is not None else (2 if ssq is not None else 0), RES=int(res is not None),
                 RES_GAMMA=int(res_gamma is not None), EPS=float(eps), PARTIALS=int(partials))
  # jax-triton's custom call, or ("ffi") the same kernel as jaxlib's FFI Triton call (launch.py)
  out, slots, *rest = launch.triton_call_for(launcher)(
      *args, kernel=kernel, grid=cfg.grid(m, n), name=f"jw4a16_w4a16_{cfg.kernel}" + ("_norm" if fused else ""),
      out_shape=out_shape, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
      N=n, K=k, GROUP_SIZE=group_size, HAS_ZP=qzeros is not None, ZP_BIAS=zp_bias, **cfg.meta(), **extra)
  if partials:
    return slots
  if extras[2] is None:
    return out
  return (out, rest[0]) if extras[3] is None else (out, rest[0], rest[1])


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
                         launcher: str = "legacy", eps: float = 0.0, partials: bool = False):
  """custom_vmap'ed [M, K] x [K, N] kernel call: a vmap over x (and the x-shaped extras: norm ssq, residual)
  folds the batch into M (one launch); a vmap over the weights (stacked layers) or the norm weight runs one launch
  per batch member with lax.map.  The launcher is part of the key: jax caches the traced call per function and
  shapes, so one function per launcher.  partials: the output is float32 slots [S, M, N] (w4a16_matmul's)."""

  def call(x2d, qweight, scales, qzeros, extras):
    return _launch(x2d, qweight, scales, qzeros, extras, group_size=group_size, zp_bias=zp_bias, config=config,
                   packing=packing, launcher=launcher, eps=eps, partials=partials)

  @jax.custom_batching.custom_vmap
  def f(x2d, qweight, scales, qzeros, extras):
    if x2d.shape[0] == 0:
      return _res_out(jnp.zeros((0, scales.shape[1]), x2d.dtype), extras, partials)
    return call(x2d, qweight, scales, qzeros, extras)

  @f.def_vmap
  def _rule(axis_size, in_batched, x2d, qweight, scales, qzeros, extras):
    xb, qwb, sb, qzb, eb = in_batched
    gb, ssqb, rb, rgb = (any(jax.tree_util.tree_leaves(b)) for b in eb)
    qzb = any(jax.tree_util.tree_leaves(qzb))

    def bcast(a, batched):
      return a if a is None or batched else jnp.broadcast_to(a, (axis_size,) + a.shape)

    outs = 1 if extras[2] is None else (2 if extras[3] is None else 3)
    out_batched = True if outs == 1 else (True,) * outs
    if not (qwb or sb or gb or rgb or qzb):  # only x-shaped arguments are batched: fold the batch into M
      x2d, ssq, res = bcast(x2d, xb), bcast(extras[1], ssqb), bcast(extras[2], rb)
      b, m, k = x2d.shape
      fold = lambda a: None if a is None else a.reshape(b * m, a.shape[-1])  # noqa: E731
      out = f(fold(x2d), qweight, scales, qzeros, (extras[0], fold(ssq), fold(res), extras[3]))
      if partials:  # [S, b m, N] -> [b, S, m, N]
        return jnp.moveaxis(out.reshape(out.shape[0], b, m, out.shape[-1]), 1, 0), out_batched
      unfold = lambda a: a.reshape(b, m, a.shape[-1])  # noqa: E731
      return jax.tree_util.tree_map(unfold, out), out_batched

    args = (bcast(x2d, xb), bcast(qweight, qwb), bcast(scales, sb), bcast(qzeros, qzb),
            tuple(bcast(e, b) for e, b in zip(extras, (gb, ssqb, rb, rgb))))
    return jax.lax.map(lambda a: f(*a), args), out_batched

  return _inference_only(f)


@functools.lru_cache(maxsize=None)
def _reference_call(group_size: int, zp_bias: int, packing: str):
  def f(x, qweight, scales, qzeros, g_idx, perm):
    return w4a16_matmul_reference(x, qweight, scales, qzeros, group_size=group_size, zp_bias=zp_bias, g_idx=g_idx,
                                  perm=perm, packing=packing)

  return _inference_only(f)


def w4a16_matmul(x, qweight, scales, qzeros=None, *, group_size: int, zp_bias: int = 8, g_idx=None, perm=None,
                 packing: str = "gptq", backend: str | None = None, config: tuning.KernelConfig | None = None,
                 norm_weight=None, norm_eps: float = 1e-5, norm_ssq=None, residual=None,
                 residual_norm_weight=None, partials: bool = False):
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
    norm_weight: [K] in x's dtype: x is a hidden state h and the product is taken of its RMSNorm,
      norm_weight * (h * rsqrt(mean(h^2) + norm_eps)).to(dtype) (transformers' LlamaRMSNorm), formed inside the
      kernel where the fragment packing runs (no norm kernel, no normalized copy of x), in jnp elsewhere.
    norm_ssq: [..., K // 64] float32, the sums of h^2 over each 64 columns (the second output of the residual
      matmul that wrote h); None: computed here from x.  Given without norm_weight, x is h times the norm weight
      already (a residual matmul's third output, below): only the norm's row scale rsqrt(mean(h^2) + norm_eps)
      is applied, to the fp32 product (x @ W) before it is rounded.
    residual: [..., N] in x's dtype (N % 64 == 0): returns (h, ssq) = (out + residual, its norm_ssq
      [..., N // 64]) instead of out: a Llama layer's o_proj and down_proj hand the next norm its input and its
      squares this way.
    residual_norm_weight: [N] in x's dtype, with residual: returns (h, ssq, h * residual_norm_weight), the last
      being the next matmul's x with norm_ssq=ssq and no norm_weight: the norm then costs that matmul's K loop
      nothing (the kernel's NORM = 2).
    partials: returns float32 [S, ..., N] instead of the product: slots that, added in slot order and rounded
      to x's dtype (`jw4a16.reference.sum_partials`), give the output.  The frag kernel then writes each split-K
      program's fp32 product to its slot and skips its epilogue's wait for the other splits (a consumer that
      reads the output once, as the decode attention kernel reads q/k/v, sums them itself; on H100 that took
      1.2 - 1.9 us off an M = 1 launch, docs/performance.md, session 17).  Elsewhere S = 1: the output as
      float32.  Not with residual.

  Inference only: jax.grad through it raises.  Works under jax.jit and jax.vmap (a vmap over x folds into M).
  """
  k, n, g = checks.check_matmul_args(x, qweight, scales, qzeros, group_size, zp_bias, g_idx, perm, packing)
  if config is not None and (config.kernel == "frag") != (packing == "fragment"):
    raise ValueError(f"config.kernel={config.kernel!r} does not read packing={packing!r} weights: kernel 'frag' "
                     "reads packing='fragment', the others packing='gptq'")
  _check_fused_args(x, k, n, norm_weight, norm_ssq, residual, residual_norm_weight)
  checks.check_partials(partials, residual)
  extras = (norm_weight, norm_ssq, residual, residual_norm_weight)
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
    xn = _norm_in(x, extras, norm_eps)
    out = _res_out(_reference_call(g, zp_bias, packing)(xn, qweight, scales, qzeros, g_idx, perm), extras,
                   partials)
  else:
    if g_idx is not None:  # act-order rows in checkpoint order: sort them by group for this call
      qweight, perm = jnp.take(qweight, sort, axis=0), sort
    if perm is not None:  # x's columns (and the norm weight's) in qweight's row order; the squares' sum is the same
      x = jnp.take(x, jnp.asarray(perm, jnp.int32), axis=-1)
      if norm_weight is not None:
        extras = (jnp.take(norm_weight, jnp.asarray(perm, jnp.int32)),) + extras[1:]
    lead = x.shape[:-1]
    flat = lambda a: None if a is None else a.reshape(math.prod(lead), a.shape[-1])  # noqa: E731
    out = _batched_kernel_call(g, zp_bias, config, packing, launch.resolve_launcher(), float(norm_eps),
                               bool(partials))(
        flat(x), qweight, scales, qzeros, (extras[0], flat(extras[1]), flat(extras[2]), extras[3]))
    if partials:
      out = out.reshape(out.shape[0], *lead, n)
    else:
      out = jax.tree_util.tree_map(lambda a: a.reshape(*lead, a.shape[-1]), out)
  if valid is not None:
    nan = lambda a: jnp.where(valid, a, jnp.nan).astype(a.dtype)  # noqa: E731
    out = (nan(out[0]),) + tuple(out[1:]) if residual is not None else nan(out)
  return out


def _check_fused_args(x, k: int, n: int, norm_weight, norm_ssq, residual, residual_norm_weight) -> None:
  """w4a16_matmul's norm_weight, norm_ssq, residual and residual_norm_weight: shapes and dtypes, or a ValueError
  naming the argument."""
  lead = tuple(x.shape[:-1])
  if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
    raise ValueError(f"norm_weight: expected {x.dtype} [K={k}], got {norm_weight.dtype} {list(norm_weight.shape)}")
  if norm_ssq is not None:
    if k % SSQ_BLOCK:
      raise ValueError(f"norm_ssq needs K % {SSQ_BLOCK} == 0 (sums over 64 columns), got K={k}")
    if tuple(norm_ssq.shape) != lead + (k // SSQ_BLOCK,) or norm_ssq.dtype != jnp.float32:
      raise ValueError(f"norm_ssq: expected float32 {list(lead + (k // SSQ_BLOCK,))} (x's leading dims, K // 64), "
                       f"got {norm_ssq.dtype} {list(norm_ssq.shape)}")
  if residual is not None:
    if n % SSQ_BLOCK:
      raise ValueError(f"residual needs N % {SSQ_BLOCK} == 0 (its sums of squares are over 64 columns), got N={n}")
    if tuple(residual.shape) != lead + (n,) or residual.dtype != x.dtype:
      raise ValueError(f"residual: expected {x.dtype} {list(lead + (n,))} (x's leading dims, N), got "
                       f"{residual.dtype} {list(residual.shape)}")
  if residual_norm_weight is not None:
    if residual is None:
      raise ValueError("residual_norm_weight was given without residual: it scales the residual sum")
    if residual_norm_weight.shape != (n,) or residual_norm_weight.dtype != x.dtype:
      raise ValueError(f"residual_norm_weight: expected {x.dtype} [N={n}], got {residual_norm_weight.dtype} "
                       f"{list(residual_norm_weight.shape)}")


def quantized_matmul(x, w: QuantizedWeight, *, backend: str | None = None, config=None, **fused):
  """`w4a16_matmul` on a QuantizedWeight (fused: its norm_weight, norm_eps, norm_ssq, residual,
  residual_norm_weight)."""
  return w4a16_matmul(x, w.qweight, w.scales, w.qzeros, group_size=w.group_size, zp_bias=w.zp_bias, perm=w.perm,
                      packing=w.packing, backend=backend, config=config, **fused)
