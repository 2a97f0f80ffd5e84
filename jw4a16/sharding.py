"""Tensor-parallel W4A16 matmuls under jit with JAX's own machinery (Mesh, NamedSharding, shard_map).

A Triton custom call is opaque to XLA's partitioner, which would gather every operand onto each device; so the
op runs inside `jax.shard_map`, where each device multiplies its own shard and nothing is gathered:

  column-parallel (split N over mesh axis `axis`): x replicated; qweight, scales, qzeros split along their last
    dim; the output is split along N.  Needs (N // 8) % shards == 0 (whole int32 words per shard).
  row-parallel (split K): x split along K; qweight, scales, qzeros split along their first dim; partial outputs
    are summed with psum.  Needs K % shards == 0 and (K / shards) % G == 0 (whole groups per shard; channelwise
    weights cannot be split along K).  Act-order (perm): x's columns are gathered by perm on the global x first
    (activations are small), then split; the weight rows were sorted by group at load time, so each shard holds
    whole groups.

The mesh is an argument, or the ambient one (`jax.set_mesh(mesh)`).  Parameters come from
`jw4a16.checkpoint.restore(dir, shardings=...)` already in place (see `param_shardings`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jw4a16 import checks
from jw4a16.ops import w4a16_matmul
from jw4a16.qweight import QuantizedWeight
from jw4a16.reference import residual_sum, rms_norm_from_ssq

MODES = ("column", "row")


def _mesh(mesh):
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or not mesh.axis_names:
    raise ValueError("no mesh: pass mesh= or call inside `with jax.set_mesh(mesh):`")
  return mesh


def check_split(mode: str, k: int, n: int, group_size: int, shards: int, axis: str,
                packing: str = "gptq") -> None:
  """Raises a clear ValueError when the weight cannot be split `shards` ways in `mode`."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}")
  g = checks.resolve_group_size(group_size, k)
  if mode == "column":
    if (n // 8) % shards:
      raise ValueError(f"column-parallel over {axis!r} ({shards} shards): N={n} gives {n // 8} int32 words, not "
                       f"divisible by {shards}; N per shard must be a multiple of 8")
    if packing == "fragment" and n % (checks.FRAGMENT_ROWS * shards):
      raise ValueError(f"column-parallel over {axis!r} ({shards} shards) with packing='fragment': N={n} must give "
                       f"each shard whole blocks of {checks.FRAGMENT_ROWS} columns (N per shard {n / shards:g}); "
                       "keep packing='gptq' for this weight")
  else:
    if k % shards or (k // shards) % g:
      raise ValueError(f"row-parallel over {axis!r} ({shards} shards): K={k} must split into whole groups of "
                       f"group_size={g} (K per shard {k / shards:g})" +
                       ("; channelwise weights cannot be split along K" if g == k else ""))


def parallel_matmul(x, w: QuantizedWeight, mode: str, axis: str, *, mesh=None, backend=None, config=None):
  """x [..., K] @ w -> [..., N] with w split over mesh axis `axis` ('column' or 'row'; module docstring)."""
  mesh = _mesh(mesh)
  k, n = w.shape
  shards = mesh.shape[axis]
  check_split(mode, k, n, w.group_size, shards, axis, w.packing)
  lead = (None,) * (x.ndim - 1)
  has_zp = w.qzeros is not None

  def local(x, qweight, scales, qzeros):
    y = w4a16_matmul(x, qweight, scales, qzeros if has_zp else None, group_size=w.group_size, zp_bias=w.zp_bias,
                     packing=w.packing, backend=backend, config=config)
    return jax.lax.psum(y, axis) if mode == "row" else y

  if w.perm is not None:  # rows of qweight are sorted by group: permute x's columns once, globally
    x = jnp.take(x, w.perm, axis=-1)
  wspec = P(None, axis) if mode == "column" else P(axis, None)
  qspec = P(*checks.qweight_axes(wspec, w.packing))
  xspec = P(*lead, None) if mode == "column" else P(*lead, axis)
  ospec = P(*lead, axis) if mode == "column" else P(*lead, None)
  qzeros = w.qzeros if has_zp else jnp.zeros((1, 1), jnp.int32)
  zspec = wspec if has_zp else P()
  args = (x, w.qweight, w.scales, qzeros)
  specs = (xspec, qspec, wspec, zspec)
  if jax.sharding.AxisType.Explicit in tuple(getattr(mesh, "axis_types", ())):
    # explicit-sharding meshes type-check shard_map inputs: move each to its spec (a no-op when already there)
    args = tuple(jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs))
  f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=ospec)
  return f(*args)


def layer_matmul(x, w: QuantizedWeight, parallel: str | None, axis: str, *, backend=None, **fused):
  """What W4A16Dense and W4A16Linear run: the plain op (fused: its norm_weight, norm_eps, norm_ssq, residual), or
  parallel_matmul when `parallel` is set (no fused arguments)."""
  if parallel is not None:
    if fused:
      raise ValueError(f"parallel={parallel!r}: the norm and residual are applied around the sharded op, not in it")
    return parallel_matmul(x, w, parallel, axis, backend=backend)
  return w4a16_matmul(x, w.qweight, w.scales, w.qzeros, group_size=w.group_size, zp_bias=w.zp_bias, perm=w.perm,
                      packing=w.packing, backend=backend, **fused)


def layer_forward(x, w: QuantizedWeight, bias, parallel: str | None, axis: str, *, backend=None, norm_weight=None,
                  norm_eps: float = 1e-5, norm_ssq=None, residual=None, residual_norm_weight=None,
                  partials: bool = False):
  """W4A16Dense's and W4A16Linear's forward: x @ W (+ bias), with w4a16_matmul's norm and residual arguments
  folded into the op where it can take them (no tensor parallelism; no bias with a residual: the residual comes
  after the bias) and applied in jnp around it otherwise (the norm before the sharded op, the residual after its
  psum).  x, bias and the fused arrays are in the computation dtype (w.scales').  partials: the op's float32
  split-K slots [S, ..., N] (w4a16_matmul's), or under tensor parallelism or with a bias the output as one slot."""
  n = w.shape[1]
  if residual is not None and n % 64:
    raise ValueError(f"residual: needs features % 64 == 0 (its sums of squares are over 64 columns), got {n}")
  checks.check_partials(partials, residual)  # before the bias / tensor-parallel route below, which drops it
  if partials and (parallel is not None or bias is not None):
    y = layer_forward(x, w, bias, parallel, axis, backend=backend, norm_weight=norm_weight, norm_eps=norm_eps,
                      norm_ssq=norm_ssq)
    return y.astype(jnp.float32)[None]
  fused = {"partials": True} if partials else {}
  if norm_weight is not None or norm_ssq is not None:
    fused.update(norm_weight=norm_weight, norm_eps=norm_eps, norm_ssq=norm_ssq)
  if residual is not None:
    fused.update(residual=residual, residual_norm_weight=residual_norm_weight)
  if fused and (parallel is not None or (bias is not None and residual is not None)):
    if "norm_eps" in fused:
      x = rms_norm_from_ssq(x, norm_weight, norm_eps, norm_ssq)
    fused = {}
  y = layer_matmul(x, w, parallel, axis, backend=backend, **fused)
  if "residual" in fused:
    return y
  if bias is not None:
    y = y + bias
  return y if residual is None else residual_sum(y, residual, residual_norm_weight)


def param_shardings(w: QuantizedWeight, mode: str, axis: str, mesh) -> QuantizedWeight:
  """NamedShardings for one weight, shaped like it: pass a tree of these to checkpoint.restore(shardings=)."""
  check_split(mode, *w.shape, w.group_size, mesh.shape[axis], axis, w.packing)
  spec = P(None, axis) if mode == "column" else P(axis, None)
  named = NamedSharding(mesh, spec)
  qnamed = NamedSharding(mesh, P(*checks.qweight_axes(spec, w.packing)))
  return QuantizedWeight(qnamed, named, None if w.qzeros is None else named,
                         None if w.perm is None else NamedSharding(mesh, P()), w.group_size, w.zp_bias, w.packing)
