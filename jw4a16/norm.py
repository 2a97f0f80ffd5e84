"""RMSNorm, optionally after a residual add: the jnp reference (transformers' LlamaRMSNorm numerics, the CPU
path) and the Triton kernel `kernels/rms_norm.py` (one launch for what XLA runs as two kernels).

  out = rms_norm(x, weight, eps)                                # [..., N]
  out, residual = rms_norm(x, weight, eps, residual=residual)   # residual <- x + residual, then its norm

The Llama model carries the residual stream this way (vLLM's fused_add_rms_norm), so that each norm of a layer
is one kernel.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import ops

DISABLE_ENV = "JW4A16_RMS_NORM_KERNEL"  # "0": always the reference


def rms_norm_reference(x, weight, eps: float, residual=None):
  """transformers' LlamaRMSNorm of x (after residual = x + residual when given): the sum of squares and the
  scaling in fp32, the result cast to x's dtype and then multiplied by weight."""
  if residual is not None:
    x = x + residual
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  out = weight * h.astype(x.dtype)
  return out if residual is None else (out, x)


def check_norm_args(x, weight, residual):
  if x.ndim < 1:
    raise ValueError("x: expected [..., N], got a scalar")
  n = x.shape[-1]
  if weight.shape != (n,):
    raise ValueError(f"weight: expected [N={n}], got shape {weight.shape}")
  if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
    raise ValueError(f"residual: expected {x.dtype} {x.shape} as x, got {residual.dtype} {residual.shape}")


def kernel_unavailable_reason(x, weight) -> str | None:
  """None when the kernel takes these arguments on this backend, else why not."""
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return f"${DISABLE_ENV}=0"
  if x.dtype not in (jnp.bfloat16, jnp.float16) or weight.dtype != x.dtype:
    return f"dtypes x {x.dtype}, weight {weight.dtype} (the kernel takes one of bfloat16 or float16)"
  if x.shape[-1] > 32768:
    return f"{x.shape[-1]} values a row (the kernel holds a row in registers: up to 32768)"
  if x.size == 0:
    return "an empty input"
  if ops.resolve_backend() != "triton":
    return "the Triton path cannot run here (ops.resolve_backend)"
  return None


def rms_norm_kernel_call(x, weight, eps: float, residual=None):
  """The Triton kernel on x [..., N] (and residual of x's shape): out, or (out, x + residual)."""
  from jw4a16 import launch  # noqa: PLC0415
  from jw4a16.kernels.rms_norm import launch_params, rms_norm_kernel  # noqa: PLC0415

  n = x.shape[-1]
  rows = int(np.prod(x.shape[:-1]))
  has_res = residual is not None
  out, res_out = launch.triton_call_for(launch.resolve_launcher())(
      x, x if residual is None else residual, weight,
      kernel=rms_norm_kernel, grid=(rows,), name="jw4a16_rms_norm",
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct(x.shape if has_res else (1,), x.dtype)),
      num_stages=1, N=n, EPS=float(eps), HAS_RES=int(has_res), **launch_params(n))
  return (out, res_out) if has_res else out


def rms_norm(x, weight, eps: float, residual=None, *, allow_kernel: bool = True):
  """RMSNorm over the last axis, after `residual = x + residual` when a residual is given (then returns (out,
  residual)).  The Triton kernel where it can run and allow_kernel (False for arrays GSPMD shards, which the
  custom call would gather), the jnp reference otherwise."""
  check_norm_args(x, weight, residual)
  if allow_kernel and kernel_unavailable_reason(x, weight) is None:
    return rms_norm_kernel_call(x, weight, eps, residual)
  return rms_norm_reference(x, weight, eps, residual)


__all__ = ["check_norm_args", "kernel_unavailable_reason", "rms_norm", "rms_norm_kernel_call", "rms_norm_reference"]
