"""`W4A16Linear`: the flax.nnx twin of `jw4a16.W4A16Dense` (same parameters, names and semantics)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jw4a16.linen import DEFAULT_KERNEL_AXES, check_layer, qweight_shape
from jw4a16.qweight import QuantizedWeight
from jw4a16.sharding import layer_forward


class W4A16Linear(nnx.Module):
  """y = x @ W + b with W int4 in kernel layout; x [..., in_features] -> [..., out_features].

  Parameters (nnx.Param, with sharding metadata from kernel_axes, see jw4a16.linen): qweight, scales, qzeros
  (asymmetric), perm (act_order), bias.  packing: qweight's layout, as W4A16Dense's.
  """

  def __init__(self, in_features: int, out_features: int, *, group_size: int = 128, symmetric: bool = True,
               use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.bfloat16, act_order: bool = False,
               zp_bias: int = 8, kernel_axes=DEFAULT_KERNEL_AXES, backend: str | None = None,
               parallel: str | None = None, parallel_axis: str = "tp", packing: str = "gptq", rngs: nnx.Rngs):
    del rngs  # placeholders are deterministic; real values come from a checkpoint or from quantize()
    g = check_layer(in_features, out_features, group_size, packing)
    k, n = in_features, out_features
    self.in_features, self.out_features, self.group_size = k, n, g
    self.dtype, self.param_dtype, self.zp_bias, self.backend = dtype, param_dtype, zp_bias, backend
    self.parallel, self.parallel_axis = parallel, parallel_axis  # see jw4a16.linen.W4A16Dense
    self.packing = packing

    def param(value, axes):
      # sharding metadata for the user's mesh rules; placed lazily (nnx.get_partition_spec), never here
      return nnx.Param(value, out_sharding=axes, eager_sharding=False)

    shape, axes = qweight_shape(k, n, packing, kernel_axes)
    self.qweight = param(jnp.zeros(shape, jnp.int32), axes)
    self.scales = param(jnp.ones((k // g, n), param_dtype), kernel_axes)
    self.qzeros = None if symmetric else param(jnp.zeros((k // g, n // 8), jnp.int32), kernel_axes)
    self.perm = param(jnp.arange(k, dtype=jnp.int32), (None,)) if act_order else None
    self.bias = param(jnp.zeros((n,), param_dtype), (kernel_axes[1],)) if use_bias else None

  def load(self, w: QuantizedWeight, bias=None) -> W4A16Linear:
    """Sets the parameters from a QuantizedWeight (shapes must match this layer's), repacked to the layer's packing."""
    w = w.repack(self.packing)
    if w.shape != (self.in_features, self.out_features) or w.group_size != self.group_size:
      raise ValueError(f"weight of shape {w.shape}, group {w.group_size} does not fit a layer of "
                       f"({self.in_features}, {self.out_features}), group {self.group_size}")
    if (w.qzeros is None) != (self.qzeros is None) or (w.perm is None) != (self.perm is None):
      raise ValueError("weight and layer disagree on symmetric / act_order")
    self.qweight.set_value(w.qweight)
    self.scales.set_value(w.scales.astype(self.param_dtype))
    if w.qzeros is not None:
      self.qzeros.set_value(w.qzeros)
    if w.perm is not None:
      self.perm.set_value(w.perm)
    if bias is not None:
      self.bias.set_value(jnp.asarray(bias, self.param_dtype))
    return self

  def __call__(self, x, *, norm_weight=None, norm_eps: float = 1e-5, norm_ssq=None, residual=None,
               residual_norm_weight=None, partials: bool = False):
    """As W4A16Dense's: x [..., K] -> [..., N], or with a residual (h, ssq[, hg]), or with partials float32
    split-K slots [S, ..., N]."""
    dtype = jnp.dtype(self.dtype or self.param_dtype)
    w = QuantizedWeight(self.qweight.get_value(), self.scales.get_value().astype(dtype),
                        None if self.qzeros is None else self.qzeros.get_value(),
                        None if self.perm is None else self.perm.get_value(), self.group_size, self.zp_bias,
                        self.packing)
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    bias = None if self.bias is None else self.bias.get_value()
    return layer_forward(x.astype(dtype), w, cast(bias), self.parallel, self.parallel_axis, backend=self.backend,
                         norm_weight=cast(norm_weight), norm_eps=norm_eps, norm_ssq=norm_ssq, residual=cast(residual),
                         residual_norm_weight=cast(residual_norm_weight), partials=partials)

