"""`W4A16Dense`: flax.linen Dense with an int4 kernel, run through `w4a16_matmul`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jw4a16 import checks
from jw4a16.qweight import QuantizedWeight
from jw4a16.sharding import layer_forward

# Logical axis names of the parameters (map them to mesh axes with flax.linen.logical_axis_rules):
#   qweight [K, N // 8], scales [K // G, N], qzeros [K // G, N // 8] -> kernel_axes = (in_axis, out_axis);
#   with packing="fragment" qweight is [ceil(N / 64), 8 K] -> (out_axis, in_axis)
#   bias [N] -> (out_axis,);  perm [K] -> replicated.
# Column-parallel (split N): kernel_axes=("embed", "mlp") with "mlp" on a mesh axis.
# Row-parallel (split K): kernel_axes=("mlp", "embed") with "mlp" on a mesh axis (then psum the output).
DEFAULT_KERNEL_AXES = ("embed", "mlp")


def check_layer(in_features: int, features: int, group_size: int, packing: str = "gptq") -> int:
  """Layer-construction checks (init time, before any kernel): returns the resolved group size."""
  if features % 8 or features <= 0:
    raise ValueError(f"features={features} must be a positive multiple of 8 (8 int4 values per int32 word)")
  g = checks.resolve_group_size(group_size, in_features)
  checks.check_packing(packing, in_features, g)
  return g


def qweight_shape(k: int, n: int, packing: str, kernel_axes) -> tuple[tuple[int, int], tuple]:
  """qweight's shape and logical axes in `packing`."""
  shape = checks.fragment_shape(k, n) if packing == "fragment" else (k, n // 8)
  return shape, checks.qweight_axes(kernel_axes, packing)


class W4A16Dense(nn.Module):
  """y = x @ W + b with W int4 in kernel layout.  x [..., K] -> [..., features].

  Parameters: qweight [K, features // 8] int32 ([ceil(features / 64), 8 K] with packing="fragment"), scales
  [K // G, features] param_dtype, qzeros [K // G, features // 8] int32 (asymmetric only), bias [features]
  param_dtype, perm [K] int32 (act_order only: qweight rows sorted by group, x gathered by perm).  Values from
  init are placeholders of the right shape and type; real values come from a checkpoint (jw4a16.checkpoint) or
  from jw4a16.quantize_dense_params.

  dtype: the computation dtype (float16 or bfloat16); default param_dtype.  x and scales are cast to it; the
  output has it.
  packing: qweight's layout, "gptq" or "fragment" (`jw4a16.preferred_packing`; `QuantizedWeight.repack` converts
  loaded weights).
  """

  features: int
  group_size: int = 128
  symmetric: bool = True
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.bfloat16
  act_order: bool = False
  zp_bias: int = 8
  kernel_axes: tuple[str | None, str | None] = DEFAULT_KERNEL_AXES
  backend: str | None = None
  # Tensor parallelism: "column" or "row" runs the op under shard_map over mesh axis `parallel_axis` of the
  # ambient mesh (jax.set_mesh), see jw4a16.sharding.  None: the op sees whole arrays.
  parallel: str | None = None
  parallel_axis: str = "tp"
  packing: str = "gptq"

  @nn.compact
  def __call__(self, x, *, norm_weight=None, norm_eps: float = 1e-5, norm_ssq=None, residual=None,
               residual_norm_weight=None, partials: bool = False):
    """x [..., K] -> [..., features]; with norm_weight (or norm_ssq), x is a hidden state whose RMSNorm is
    multiplied, and with a residual, returns (y + residual, its sums of squares per 64 columns[, times
    residual_norm_weight]), as `jw4a16.w4a16_matmul`: folded into the kernel where it can be (no tensor
    parallelism, no bias with a residual), in jnp around it otherwise.  partials: float32 split-K slots [S, ...,
    features] instead (w4a16_matmul's; S = 1 under tensor parallelism or with a bias)."""
    k = x.shape[-1]
    g = check_layer(k, self.features, self.group_size, self.packing)
    n = self.features
    part = nn.with_logical_partitioning
    shape, axes = qweight_shape(k, n, self.packing, self.kernel_axes)
    qweight = self.param("qweight", part(nn.initializers.zeros_init(), axes), shape, jnp.int32)
    scales = self.param("scales", part(nn.initializers.ones_init(), self.kernel_axes), (k // g, n),
                        self.param_dtype)
    qzeros = None
    if not self.symmetric:
      qzeros = self.param("qzeros", part(nn.initializers.zeros_init(), self.kernel_axes), (k // g, n // 8),
                          jnp.int32)
    perm = None
    if self.act_order:
      perm = self.param("perm", part(lambda key, shape, dtype: jnp.arange(shape[0], dtype=dtype), (None,)), (k,),
                        jnp.int32)
    dtype = jnp.dtype(self.dtype or self.param_dtype)
    w = QuantizedWeight(qweight, scales.astype(dtype), qzeros, perm, g, self.zp_bias, self.packing)
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    bias = None
    if self.use_bias:
      bias = self.param("bias", part(nn.initializers.zeros_init(), (self.kernel_axes[1],)), (n,), self.param_dtype)
    return layer_forward(x.astype(dtype), w, cast(bias), self.parallel, self.parallel_axis, backend=self.backend,
                         norm_weight=cast(norm_weight), norm_eps=norm_eps, norm_ssq=norm_ssq, residual=cast(residual),
                         residual_norm_weight=cast(residual_norm_weight), partials=partials)
