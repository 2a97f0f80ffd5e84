"""Argument validation shared by the op, its reference and the layers.

Every message names the argument, what came and what was expected.  Nothing here imports the rest of jw4a16.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
ACTIVATION_DTYPES = ("float16", "bfloat16")
# How qweight's nibbles are laid out (jw4a16.layout): "gptq" [K, N // 8] packed along N (the kernel layout every
# loader produces), "fragment" [ceil(N / 64), 8 K] packed along K in the order Hopper's wgmma register operand holds
# it, each block of 64 weight columns in one row of words, 64-K chunk by chunk (layout.to_fragment_packed; K a
# multiple of 64, G a multiple of 64 or 32).
PACKINGS = ("gptq", "fragment")
FRAGMENT_BLOCK = 64  # K values per packed block
FRAGMENT_ROWS = 64  # weight columns (N) per row of fragment-packed words
INT32_MAX = 2**31 - 1


def fragment_shape(k: int, n: int) -> tuple[int, int]:
  """The fragment-packed qweight's shape for a [K, N] weight: [ceil(N / 64), 8 K] int32."""
  return -(-n // FRAGMENT_ROWS), 8 * k


def qweight_axes(axes, packing: str) -> tuple:
  """qweight's per-axis labels (logical axes, PartitionSpec entries) given the [K, N] weight's: reversed for the
  fragment packing, whose first axis runs along N and second along K."""
  return tuple(reversed(tuple(axes))) if packing == "fragment" else tuple(axes)


def resolve_group_size(group_size, k: int) -> int:
  """-1 (or K itself) means one group of all K rows; otherwise one of SUPPORTED_GROUP_SIZES dividing K."""
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise TypeError(f"group_size must be an int, got {group_size!r} of type {type(group_size).__name__}")
  group_size = int(group_size)
  if group_size == -1 or group_size == k:
    return k
  if group_size not in SUPPORTED_GROUP_SIZES:
    raise ValueError(f"{group_size=} is not supported; expected one of {SUPPORTED_GROUP_SIZES} (or K={k})")
  if k % group_size:
    raise ValueError(f"K={k} (x.shape[-1], qweight.shape[0]) must be a multiple of {group_size=}")
  return group_size


def _dt(a) -> str:
  return np.dtype(a.dtype).name


def fragment_fits(k: int, group_size: int) -> bool:
  """K and the resolved group size G fit the fragment packing's 64-value blocks: G a multiple of them, or half of
  one (group 32: the frag kernel scales each half of a block with its own group)."""
  return k % FRAGMENT_BLOCK == 0 and (group_size % FRAGMENT_BLOCK == 0 or group_size == FRAGMENT_BLOCK // 2)


def check_packing(packing, k: int, group_size: int) -> None:
  """`packing` is one of PACKINGS and, for "fragment", K and the resolved group size G fit its 64-value blocks."""
  if packing not in PACKINGS:
    raise ValueError(f"packing={packing!r} must be one of {PACKINGS}")
  if packing == "fragment" and not fragment_fits(k, group_size):
    raise ValueError(f"packing='fragment' needs K to be a multiple of {FRAGMENT_BLOCK} and group_size a multiple of "
                     f"it or {FRAGMENT_BLOCK // 2}, got K={k}, group_size={group_size}; keep packing='gptq' for this "
                     "weight")


def check_matmul_args(x, qweight, scales, qzeros, group_size, zp_bias, g_idx=None, perm=None,
                      packing: str = "gptq") -> tuple[int, int, int]:
  """Validates shapes and dtypes of a W4A16 matmul; returns (K, N, G) with G resolved."""
  if packing not in PACKINGS:
    raise ValueError(f"packing={packing!r} must be one of {PACKINGS}")
  if x.ndim < 1:
    raise ValueError(f"x must have shape [..., K], got a scalar of shape {x.shape}")
  if _dt(x) not in ACTIVATION_DTYPES:
    raise TypeError(f"x must be float16 or bfloat16, got {_dt(x)} (shape {x.shape})")
  frag = packing == "fragment"
  form = "[ceil(N / 64), 8 K] (packing='fragment')" if frag else "[K, N // 8]"
  if qweight.ndim != 2:
    raise ValueError(f"qweight must be {form} int32, got shape {qweight.shape}")
  if _dt(qweight) != "int32":
    raise TypeError(f"qweight must be int32 (8 nibbles per word), got {_dt(qweight)} with shape {qweight.shape}")
  k = x.shape[-1]
  if (qweight.shape[1] / 8 if frag else qweight.shape[0]) != k:
    raise ValueError(f"K mismatch: x.shape[-1]={k} but qweight.shape={qweight.shape} (qweight is {form})")
  if scales.ndim != 2:
    raise ValueError(f"scales must be [K // group_size, N], got shape {scales.shape}")
  n = scales.shape[1]
  if n % 8 or n == 0:
    raise ValueError(f"N={n} (scales.shape[1]) must be a positive multiple of 8")
  if frag and tuple(qweight.shape) != fragment_shape(k, n):
    raise ValueError(f"qweight.shape={qweight.shape} holds {qweight.shape[0] * FRAGMENT_ROWS} columns in blocks of "
                     f"{FRAGMENT_ROWS} but scales has N={n}; expected qweight {list(fragment_shape(k, n))} "
                     f"(packing='fragment')")
  if not frag and qweight.shape[1] * 8 != n:
    raise ValueError(f"qweight.shape={qweight.shape} holds {qweight.shape[1] * 8} columns but scales has N={n}; "
                     f"expected qweight [K, {n // 8}]")
  if _dt(scales) != _dt(x):
    raise TypeError(f"scales must have x's dtype {_dt(x)}, got {_dt(scales)} (shape {scales.shape})")
  g = resolve_group_size(group_size, k)
  check_packing(packing, k, g)
  if frag and g_idx is not None:
    raise ValueError("g_idx (act-order rows in checkpoint order) needs packing='gptq'; sort the rows once with "
                     "QuantizedWeight.from_act_order, then repack, and pass perm")
  if scales.shape[0] != k // g:
    raise ValueError(f"scales.shape={scales.shape}, expected [{k // g}, {n}] for K={k} and group_size={group_size}")
  if qzeros is not None:
    if _dt(qzeros) != "int32":
      raise TypeError(f"qzeros must be int32 (packed like qweight), got {_dt(qzeros)} with shape {qzeros.shape}")
    if tuple(qzeros.shape) != (k // g, n // 8):
      raise ValueError(f"qzeros.shape={qzeros.shape}, expected [{k // g}, {n // 8}] (K // group_size, N // 8)")
  if not isinstance(zp_bias, (int, np.integer)) or not 0 <= zp_bias <= 15:
    raise ValueError(f"zp_bias must be an int in [0, 15], got {zp_bias!r}")
  for name, idx in (("g_idx", g_idx), ("perm", perm)):
    if idx is None:
      continue
    if tuple(idx.shape) != (k,):
      raise ValueError(f"{name} must have shape [K]=[{k}], got {idx.shape}")
    if not np.issubdtype(np.dtype(idx.dtype), np.integer):
      raise TypeError(f"{name} must be an integer array, got {_dt(idx)}")
  if g_idx is not None and perm is not None:
    raise ValueError("pass g_idx (rows in checkpoint order) or perm (rows already sorted by group), not both")
  if qweight.size > INT32_MAX or scales.size > INT32_MAX:
    raise ValueError(f"weights with {qweight.size} words / {scales.size} scales exceed 2**31 - 1 elements; "
                     "split the layer")
  return k, n, g


def check_partials(partials: bool, residual) -> None:
  """w4a16_matmul's (and the layers') partials=True takes no residual: the residual is added to the summed
  product, so a ValueError says how to get it."""
  if partials and residual is not None:
    raise ValueError("partials=True with a residual: the residual is added to the summed product; sum the partials "
                     "(reference.sum_partials) and add it, or take the output")


def concrete_or_none(a):
  """The numpy value of `a` if it is known at trace time, else None."""
  if a is None:
    return None
  try:
    return np.asarray(a)
  except Exception:  # a jax Tracer raises a TracerArrayConversionError (subclass differs across versions)
    return None


def act_order_permutation(g_idx: np.ndarray, group_size: int, num_groups: int) -> np.ndarray:
  """Stable argsort of g_idx, checked: every group must own exactly group_size rows.

  After the rows are permuted, row i belongs to group i // group_size, the kernel's plain layout.
  """
  g_idx = np.asarray(g_idx).astype(np.int64)
  if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= num_groups):
    raise ValueError(f"g_idx values must lie in [0, {num_groups}) (K // group_size), "
                     f"got min {g_idx.min()} and max {g_idx.max()}")
  counts = np.bincount(g_idx, minlength=num_groups)
  if (counts != group_size).any():
    bad = int(np.flatnonzero(counts != group_size)[0])
    raise ValueError(f"g_idx gives group {bad} {counts[bad]} rows; the kernel needs exactly {group_size=} rows "
                     "per group (as GPTQ act-order produces)")
  return np.argsort(g_idx, kind="stable").astype(np.int32)


def check_perm(perm: np.ndarray) -> None:
  k = perm.shape[0]
  if not np.array_equal(np.sort(perm), np.arange(k)):
    raise ValueError(f"perm must be a permutation of range(K={k})")
