"""`QuantizedWeight`: one int4 weight in kernel layout, a pytree shared by the op, the layers and the loaders."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import checks, layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A [K, N] int4 weight in kernel layout.

  qweight [K, N // 8] int32: packed along N, column 8j+i of row k in bits 4i..4i+3 of word (k, j); or with
          packing="fragment", [ceil(N / 64), 8 K] packed along K in Hopper's wgmma operand order (`repack`).
  scales  [K // G, N] float16 | bfloat16.
  qzeros  [K // G, N // 8] int32 packed like qweight, or None (symmetric: zero = zp_bias).
  perm    [K] int32 or None: act-order checkpoints.  Rows of qweight are stored sorted by group, so row i uses
          group i // G; the op gathers x's columns by perm at run time (x[..., perm]).
  group_size is the resolved G (K for channelwise).  packing: "gptq" or "fragment" (see jw4a16.checks.PACKINGS).
  """

  qweight: jax.Array
  scales: jax.Array
  qzeros: jax.Array | None = None
  perm: jax.Array | None = None
  group_size: int = dataclasses.field(default=128, metadata=dict(static=True))
  zp_bias: int = dataclasses.field(default=8, metadata=dict(static=True))
  packing: str = dataclasses.field(default="gptq", metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int]:
    """The logical (K, N) of the weight."""
    if self.packing == "fragment":
      return (self.qweight.shape[-1] // 8, self.scales.shape[-1])
    return (self.qweight.shape[-2], self.scales.shape[-1])

  def repack(self, packing: str) -> QuantizedWeight:
    """This weight with qweight in `packing` ("gptq" or "fragment"); itself if already so.  Numpy arrays stay on
    the host (the loaders' case); a stacked [L, ...] qweight (scanned layers) is repacked per layer.  Raises a
    ValueError naming K and the group size where "fragment" cannot hold them (K a multiple of 64, G one too
    or 32)."""
    if packing == self.packing:
      return self
    k, n = self.shape
    checks.check_packing(packing, k, self.group_size)
    if packing == "fragment":
      convert = layout.to_fragment_packed
    else:
      convert = functools.partial(layout.from_fragment_packed, n=n)
    qweight = self.qweight
    if qweight.ndim == 3:
      xp = np if isinstance(qweight, np.ndarray) else jnp
      qweight = xp.stack([convert(q) for q in qweight])
    else:
      qweight = convert(qweight)
    return dataclasses.replace(self, qweight=qweight, packing=packing)

  @property
  def symmetric(self) -> bool:
    return self.qzeros is None

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in (self.qweight, self.scales, self.qzeros, self.perm) if a is not None)

  @classmethod
  def from_act_order(cls, qweight, scales, qzeros, g_idx, *, group_size: int, zp_bias: int = 8):
    """Kernel-layout arrays with rows in checkpoint order plus g_idx [K] -> rows sorted by group, once.

    This is where the act-order permutation is applied to the weights (on the host, at load time), so the
    kernel reads groups contiguously and never gathers scales per row.
    """
    host = isinstance(qweight, np.ndarray)  # loaders keep numpy on the host; others get jax arrays
    xp = np if host else jnp
    qweight = np.asarray(qweight)
    k = qweight.shape[0]
    g = checks.resolve_group_size(group_size, k)
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (k,):
      raise ValueError(f"g_idx must have shape [K]=[{k}], got {g_idx.shape}")
    sorted_g = np.sort(g_idx)
    qz = None if qzeros is None else xp.asarray(qzeros)
    if np.array_equal(sorted_g, g_idx) and np.array_equal(g_idx, np.arange(k) // g):
      return cls(xp.asarray(qweight), xp.asarray(scales), qz, None, g, zp_bias)  # trivial: no permutation
    perm = checks.act_order_permutation(g_idx, g, k // g)
    return cls(xp.asarray(qweight[perm]), xp.asarray(scales), qz, xp.asarray(perm), g, zp_bias)
