"""Packing primitives for 4-bit weights: pure functions, numpy or jax.numpy.

Kernel layout ("GPTQ sequential", packed along N):
  qweight [K, N // 8] int32: word (k, j) holds columns 8j .. 8j+7 of row k, column 8j+i in bits 4i .. 4i+3.
  qzeros  [K // G, N // 8] int32, packed the same way.

A second layout the kernels read ("fragment", `to_fragment_packed`): qweight [ceil(N / 64), 8 K] packed along K in
the order Hopper's wgmma register operand holds a tile of W^T, in blocks of 64 columns; converted from the kernel
layout at load time.

Other layouts met in checkpoints and converted here:
  packed along K (compressed-tensors weight_packed [N, K//8], AutoGPTQ qweight [K//8, N]): the same nibble order,
  along the other axis.  AWQ GEMM packs along N with nibble order [0, 2, 4, 6, 1, 3, 5, 7].

Every function takes and returns arrays of the module it is given (`xp=np` or `xp=jnp`), so the same code serves
the loaders (numpy, on the host) and the reference path (jnp, traced).
"""

from __future__ import annotations

import numpy as np

from jw4a16.checks import FRAGMENT_BLOCK, FRAGMENT_ROWS

PACK = 8  # 4-bit values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ stores logical nibble AWQ_ORDER[i] in bits 4i..4i+3


def _xp(a):
  if isinstance(a, np.ndarray):
    return np
  import jax.numpy as jnp  # noqa: PLC0415 - layout stays importable without jax

  return jnp


def unpack_int4(packed, axis: int = -1, order=None):
  """Unpacks int32 words into 4-bit values (int32 in [0, 15]) along `axis`, which grows 8x.

  `order[i]` names the logical position of the nibble stored in bits 4i..4i+3 (default: identity).
  """
  xp = _xp(packed)
  axis = axis % packed.ndim
  words = packed.astype(xp.uint32) if xp is np else packed.view(xp.uint32)
  shifts = xp.arange(PACK, dtype=xp.uint32) * 4
  nib = (xp.expand_dims(words, -1) >> shifts) & 0xF  # [..., W, 8]: stored order
  if order is not None:
    inverse = np.argsort(np.asarray(order))  # logical position p lives in slot inverse[p]
    nib = nib[..., inverse]
  nib = xp.moveaxis(nib, -1, axis + 1) if axis != packed.ndim - 1 else nib
  shape = list(packed.shape)
  shape[axis] *= PACK
  return nib.reshape(shape).astype(xp.int32)


def pack_int4(values, axis: int = -1, order=None):
  """Packs 4-bit values (any int dtype, each in [0, 15]) into int32 words along `axis` (length divisible by 8)."""
  xp = _xp(values)
  axis = axis % values.ndim
  n = values.shape[axis]
  if n % PACK:
    raise ValueError(f"pack_int4: axis {axis} has length {n}, expected a multiple of {PACK}")
  v = xp.moveaxis(values, axis, -1).astype(xp.uint32)
  v = v.reshape(v.shape[:-1] + (n // PACK, PACK))
  if order is not None:
    v = v[..., np.asarray(order)]
  shifts = xp.arange(PACK, dtype=xp.uint32) * 4
  words = ((v & 0xF) << shifts).sum(axis=-1, dtype=xp.uint32)
  words = words.astype(np.int32) if xp is np else words.view(xp.int32)
  return xp.moveaxis(words, -1, axis)


def repack_k_to_n(packed_k, k: int | None = None):
  """[K//8, N] packed along K (AutoGPTQ qweight) -> [K, N//8] packed along N (kernel layout).

  Not a transpose: the 8 values of a word are consecutive in K and must be redistributed along N.
  `k` trims padding when the source rounded K up to a multiple of 8.
  """
  vals = unpack_int4(packed_k, axis=0)
  if k is not None:
    vals = vals[:k]
  return pack_int4(vals, axis=1)


def awq_to_kernel(packed_awq):
  """AWQ GEMM words [R, N//8] in nibble order [0,2,4,6,1,3,5,7] -> kernel order, same shape."""
  return pack_int4(unpack_int4(packed_awq, axis=-1, order=AWQ_ORDER), axis=-1)



def to_fragment_packed(qweight):
  """Kernel layout qweight [K, N//8] -> "fragment-packed" [ceil(N / 64), 8 K] int32 (K a multiple of 64), the
  weights in the order a Hopper wgmma's register operand holds a [64 x 16k] tile of W^T (kernels/w4a16_frag.py),
  each block of 64 weight columns stored chunk after chunk of 64 K values.

  Row n of W^T, block b of 64 K values: k = 64 b + 16 q + 8 h + 2 c + p (q, c < 4; h, p < 2) sits in word 2 c + h
  at nibble q + 4 p of an 8-word chunk: thread column c of the wgmma fragment gets whole words, and the two values
  of each bf16x2 register pair (p = 0, 1) sit 16 bits apart, so one shift and one LOP3 make the pair.  The chunk of
  (n, b) is words [512 b + 8 (n % 64), + 8) of row n // 64: a kernel tile of 64 columns reads 2 KB in one piece per
  64 K values (row-major [N, K // 8] words put each column's 32 bytes K / 2 bytes apart, 10 - 35 % slower on the
  widest weights on H100).  Columns past N (the last block, when N % 64 != 0) are zeros.  A split of the second
  axis into equal parts is a split of K in whole 64-value blocks, so row-parallel sharding splits it like K.
  """
  xp = _xp(qweight)
  k = qweight.shape[0]
  if k % FRAGMENT_BLOCK:
    raise ValueError(f"to_fragment_packed: qweight has K = {k} rows, expected a multiple of {FRAGMENT_BLOCK}")
  v = unpack_int4(qweight, axis=1).T  # [N, K]
  n = v.shape[0]
  v = v.reshape(n, k // 64, 4, 2, 4, 2)  # [n, b, q, h, c, p]
  v = xp.transpose(v, (0, 1, 4, 3, 5, 2))  # [n, b, c, h, p, q]: word (b, c, h), nibble 4 p + q
  words = pack_int4(v.reshape(n, k), axis=1)  # [N, K // 8], each column's words in a row
  nb = -(-n // FRAGMENT_ROWS)
  words = xp.pad(words, ((0, nb * FRAGMENT_ROWS - n), (0, 0)))
  words = xp.transpose(words.reshape(nb, FRAGMENT_ROWS, k // 64, 8), (0, 2, 1, 3))  # [block, b, n % 64, word]
  return words.reshape(nb, 8 * k)


def unpack_fragment(words, n: int | None = None):
  """[ceil(N / 64), 8 K] fragment-packed words -> the 4-bit values [N, K] (int32) of W^T, K in natural order.
  n: N, when the last block of 64 columns is partial (default: all of them)."""
  xp = _xp(words)
  if words.ndim != 2 or words.shape[1] % (8 * FRAGMENT_BLOCK):
    raise ValueError(f"fragment-packed words must be [ceil(N / {FRAGMENT_ROWS}), 8 K] with K a multiple of "
                     f"{FRAGMENT_BLOCK}, got shape {words.shape}")
  nb, k = words.shape[0], words.shape[1] // 8
  n = nb * FRAGMENT_ROWS if n is None else n
  if not (nb - 1) * FRAGMENT_ROWS < n <= nb * FRAGMENT_ROWS:
    raise ValueError(f"fragment-packed words of shape {words.shape} hold {nb} blocks of {FRAGMENT_ROWS} columns, "
                     f"not N = {n}")
  rows = xp.transpose(words.reshape(nb, k // 64, FRAGMENT_ROWS, 8), (0, 2, 1, 3)).reshape(nb * FRAGMENT_ROWS, k // 8)
  v = unpack_int4(rows[:n], axis=1).reshape(n, k // 64, 4, 2, 2, 4)  # [n, b, c, h, p, q]
  return xp.transpose(v, (0, 1, 5, 3, 2, 4)).reshape(n, k)  # [n, b, q, h, c, p] = natural k


def from_fragment_packed(words, n: int | None = None):
  """The inverse of `to_fragment_packed`: [ceil(N / 64), 8 K] fragment-packed words -> kernel layout [K, N//8].
  n: N, when the last block of 64 columns is partial (default: all of them)."""
  return pack_int4(unpack_fragment(words, n).T, axis=1)
