"""Typed kernel configurations, the shipped per-GPU tables, heuristics, and the on-disk tuning cache.

A `KernelConfig` is frozen and hashable, so it is static under jit.  `select_config` answers, in order: the user's
on-disk tuning cache (written by `jw4a16 tune`), the shipped table for this GPU (configs/<gpu>.json, measured on
that card by `python -m jw4a16.bench --sweep`), then a heuristic.  M is bucketed to powers of two so keys stay
bounded.  Nothing is benchmarked at call time: the first call of a shape costs one compile.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import tempfile

KERNEL_NAMES = ("tile", "gemv", "frag")  # the keys of jw4a16.kernels.KERNELS (imported lazily: it needs triton)
GEMV_BLOCK_K = 8  # rows per lane and step of the gemv kernel: its register pipeline carries exactly 8
CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
CACHE_ENV = "JW4A16_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Which kernel, its tile shape and launch parameters.

  kernel "tile" is w4a16_gemm_kernel (tl.dot on tensor cores for block_m >= 16; block_m == 1 is its older GEMV
  body); kernel "gemv" is w4a16_gemv_kernel (block_m = 1 or 2 rows of x per program, fp32 FMAs over word
  planes, the program's K range cut into k_lanes interleaved lanes of block_k rows); kernel "frag" is
  w4a16_frag_kernel, the only one for weights with packing="fragment" (out^T = W^T x^T with block_n weight
  columns as the MMA's M; block_k a multiple of 64; scale_w=1 or 2 scales the weight tile before the dot).
  split_k > 1 splits K over that many programs per tile, whose fp32 partials the last one to finish sums
  (kernels/splitk.py).  num_warps counts 32-wide warps on NVIDIA and 64-wide wavefronts on AMD.
  """

  block_m: int
  block_n: int
  block_k: int
  split_k: int = 1
  group_m: int = 8
  num_warps: int = 4
  num_stages: int = 3
  unpack: int = 1  # see kernels/w4a16_gemm.py _unpack_rows
  # AMD backend knobs (ignored on NVIDIA): occupancy hint, MFMA instruction size (16 or 32), LDS k-packing.
  # The AOT compiles (CI, doctor) use them.  jax-triton 0.3.1's triton_call cannot pass them (no
  # backend_options; 0.4.x has it but is not installable on our machines), so the run-time launch does not yet.
  waves_per_eu: int = 0
  matrix_instr_nonkdim: int = 0
  kpack: int = 1
  kernel: str = "tile"  # "tile" | "gemv" | "frag", see above
  k_lanes: int = 1  # gemv only
  swap_ab: int = 0  # tile only (block_m >= 8): compute out^T = W^T x^T, see kernels/w4a16_gemm.py
  scale_w: int = 0  # frag only: see kernels/w4a16_frag.py

  def __post_init__(self):
    if self.kernel not in KERNEL_NAMES:
      raise ValueError(f"KernelConfig.kernel={self.kernel!r} must be one of {KERNEL_NAMES}")
    for f in ("block_m", "block_n", "block_k"):
      v = getattr(self, f)
      if v < 1 or v & (v - 1):
        raise ValueError(f"KernelConfig.{f}={v} must be a power of two")
    if self.kernel == "gemv" and self.block_m not in (1, 2):
      raise ValueError(f"KernelConfig.block_m={self.block_m}: the gemv kernel takes 1 or 2 rows of x per program")
    if self.kernel == "gemv" and self.block_k != GEMV_BLOCK_K:
      raise ValueError(f"KernelConfig.block_k={self.block_k}: the gemv kernel's register pipeline carries "
                       f"{GEMV_BLOCK_K} rows per lane and step (block_k={GEMV_BLOCK_K})")
    if self.k_lanes < 1 or self.k_lanes & (self.k_lanes - 1) or (self.k_lanes > 1 and self.kernel != "gemv"):
      raise ValueError(f"KernelConfig.k_lanes={self.k_lanes} must be a power of two, > 1 only for kernel 'gemv'")
    if self.kernel == "tile" and self.block_m != 1 and self.block_m < (8 if self.swap_ab else 16):
      raise ValueError(f"KernelConfig.block_m={self.block_m}: tl.dot needs >= 16 (>= 8 as the instruction's N "
                       f"with swap_ab=1; or 1 for the GEMV body)")
    if self.block_n < 16 or (self.kernel == "tile" and self.block_k < 16):  # gemv's block_k is checked above
      raise ValueError(f"KernelConfig block_n={self.block_n}, block_k={self.block_k} must be >= 16 "
                       f"(block_k: for kernel 'tile')")
    if self.swap_ab not in (0, 1) or (self.swap_ab and (self.kernel != "tile" or self.block_m < 8)):
      raise ValueError(f"KernelConfig.swap_ab={self.swap_ab} must be 0 or 1, and 1 only for kernel 'tile' with "
                       f"block_m >= 8 (block_m={self.block_m}, kernel={self.kernel!r})")
    if self.split_k < 1:
      raise ValueError(f"KernelConfig.split_k={self.split_k} must be >= 1")
    if self.scale_w not in (0, 1, 2) or (self.scale_w and self.kernel != "frag"):
      raise ValueError(f"KernelConfig.scale_w={self.scale_w} must be 0, 1 or 2, and not 0 only for kernel 'frag'")
    if self.kernel == "frag" and (self.block_k % 64 or self.block_m < 8 or self.block_n % 64 or not self.block_n):
      raise ValueError(f"KernelConfig for kernel 'frag': block_k={self.block_k} and block_n={self.block_n} must be "
                       f"multiples of 64 (the packing's blocks), block_m={self.block_m} >= 8")

  def meta(self) -> dict:
    """The kernel's constexpr tile parameters."""
    if self.kernel == "gemv":
      return dict(BLOCK_N=self.block_n, BLOCK_K=self.block_k, SPLIT_K=self.split_k, K_LANES=self.k_lanes,
                  ROWS=self.block_m)
    if self.kernel == "frag":
      return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, SPLIT_K=self.split_k,
                  SCALE_W=self.scale_w)
    return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, SPLIT_K=self.split_k,
                GROUP_M=self.group_m, UNPACK=self.unpack, SWAP_AB=self.swap_ab)

  def amd_options(self) -> dict:
    return dict(waves_per_eu=self.waves_per_eu, matrix_instr_nonkdim=self.matrix_instr_nonkdim, kpack=self.kpack)

  def grid(self, m: int, n: int) -> tuple[int, int]:
    return (math.ceil(m / self.block_m) * math.ceil(n / self.block_n), self.split_k)

  def scratch_shapes(self, m: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the kernel's two scratch outputs: the fp32 partials [split_k, M, N] and the int32 arrival
    counters (one per program along grid axis 0, zero at each launch, which leaves them zero); one element each
    without split-K."""
    if self.split_k == 1:
      return (1,), (1,)
    return (self.split_k, m, n), (self.grid(m, n)[0],)

  def shared_memory_bytes(self, act_bytes: int = 2) -> int:
    """Upper estimate of the pipelined tiles: x [BM, BK] and words [BK, BN // 8] per stage, plus the
    dequantized [BK, BN] operand Triton stages for the dot.  gemv: the scratch of its final lane reduction."""
    if self.kernel == "gemv":
      return self.k_lanes * self.block_n * 4
    per_stage = self.block_m * self.block_k * act_bytes + self.block_k * self.block_n // 2
    if self.kernel == "frag":  # its dequantized tile stays in registers
      return per_stage * max(self.num_stages - 1, 1)
    return per_stage * max(self.num_stages - 1, 1) + self.block_k * self.block_n * act_bytes

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
  """What the heuristics need to know of a GPU."""

  name: str  # "h100", "mi300x", ...
  num_sms: int  # SMs (NVIDIA) or CUs (AMD)
  warp_size: int = 32
  shared_memory: int = 227 * 1024  # per-block limit
  atomics_fast: bool = True


H100 = Target("h100", 132)
H200 = Target("h200", 132)
MI300X = Target("mi300x", 304, warp_size=64, shared_memory=64 * 1024, atomics_fast=False)
MI350 = Target("mi350", 256, warp_size=64, shared_memory=160 * 1024, atomics_fast=False)
KNOWN_TARGETS = {t.name: t for t in (H100, H200, MI300X, MI350)}


def target_from_device(device) -> Target:
  """Maps a jax Device to a Target by its device_kind (e.g. 'NVIDIA H100 80GB HBM3', 'AMD Instinct MI300X')."""
  kind = getattr(device, "device_kind", "").lower()
  sms = getattr(device, "core_count", None)
  for key, t in (("h100", H100), ("h200", H200), ("mi300", MI300X), ("mi325", MI300X), ("mi35", MI350)):
    if key in kind:
      return dataclasses.replace(t, num_sms=sms or t.num_sms)
  amd = "amd" in kind or getattr(device, "platform", "") == "rocm"
  name = "".join(c if c.isalnum() else "_" for c in kind).strip("_") or "gpu"
  return Target(name, sms or (304 if amd else 108), warp_size=64 if amd else 32,
                shared_memory=64 * 1024 if amd else 99 * 1024, atomics_fast=not amd)


def m_bucket(m: int) -> int:
  """Next power of two, capped at 4096: the M key of tuned tables."""
  return 1 if m <= 1 else min(1 << (m - 1).bit_length(), 4096)


def table_key(m: int, k: int, n: int, group_size: int, dtype: str, has_zp: bool, packing: str = "gptq") -> str:
  key = f"m{m_bucket(m)}_k{k}_n{n}_g{group_size}_{dtype}_{'asym' if has_zp else 'sym'}"
  return key + "_frag" if packing == "fragment" else key


def _split_k(target: Target, tiles: int, k: int, min_rows: int, waves: float, max_split: int = 1 << 30) -> int:
  """Smallest power-of-two split that gives about `waves` programs per SM, keeping >= `min_rows` rows of K
  per split and at most `max_split` splits."""
  split = 1
  while tiles * split < waves * target.num_sms and split < max_split and k // (split * 2) >= min_rows:
    split *= 2
  return split


# Up to this M the gemv kernel is used where no table entry says otherwise.  On H100 it beat the unswapped tile
# kernel at M = 1 and 2 on all six benchmark shapes (benchmarks/results/sweep-gemv-h100-2026-11-25.json); at M = 2
# its two-row form lost to the swapped tile on 5 of 7 shapes (by 4 - 9 %, won 2 by 5 %:
# sweep-swap-ab-h100-2026-11-26-s6-m2.json) and compiles about 5x slower, so from M = 2 the heuristic swaps.
GEMV_MAX_M = {"h100": 1, "h200": 1}
# Up to this M (past GEMV_MAX_M) the tile kernel computes out^T = W^T x^T with 16- or 32-row tiles of x: on H100
# 1.39 - 2.72x faster than the earlier picks (tuned or heuristic unswapped tiles) at M = 4 - 32 on all six
# benchmark shapes (benchmarks/results/sweep-swap-ab-h100-2026-11-26-s6.json); slower at M = 64; not measured on
# AMD.
SWAP_AB_MAX_M = {"h100": 32, "h200": 32}


# Targets where `ops.preferred_packing` picks packing="fragment": on H100 its kernel beat the dispatcher's picks on
# the GPTQ packing at every M measured from 2 to 256 (1.25 - 2.23x, six shapes) and the gemv kernel at M = 1 on 4
# of 6 shapes (0.91 - 1.20x; session 7, docs/performance.md); from M = 512 both packings dequantize-then-GEMM.
# H200 is the same chip with more memory (not measured separately).
FRAGMENT_TARGETS = frozenset({"h100", "h200"})


def gemv_heuristic(m: int, k: int, n: int, group_size: int, target: Target = H100) -> KernelConfig:
  """256-column tiles of 16 lanes x 8 rows per step (4 warps on NVIDIA, 2 wavefronts on AMD), split along K
  until about 4 programs per SM, at most 32 ways: the last program of a tile reads every split's partial, so
  deep splits cost a longer tail (the session-3 sweep's best configs on the Llama-3-8B shapes, M = 1)."""
  del group_size  # select_config legalizes block_k against it
  bn, lanes, rows = 256, 16, min(m, 2)
  tiles = math.ceil(m / rows) * math.ceil(n / bn)
  split = _split_k(target, tiles, k, GEMV_BLOCK_K * lanes, 4.0, max_split=32)  # >= one step of all lanes
  return gemv_config(bn, GEMV_BLOCK_K, lanes, split, target, rows=rows)


def heuristic_config(m: int, k: int, n: int, group_size: int, target: Target = H100,
                     gemv: bool = True) -> KernelConfig:
  """Defaults for shapes the tables lack, read off the H100 sweeps (docs/performance.md): the gemv kernel up to
  GEMV_MAX_M (the tile kernel's GEMV body at M = 1 when gemv=False); swapped 16- and 32-row x 64-column tiles up
  to SWAP_AB_MAX_M, split along K until about 3.5 programs per SM (the session-6 sweep's best configs); 16- and
  64-row tiles split until about two programs per SM; 64x64x128 tiles from M = 128.  On AMD (64-wide
  wavefronts, 64 KiB LDS, no swapped tiles) warps count wavefronts and the software pipeline is two deep, as
  AMD's Triton tutorials tune it; these are reasoned, not measured (we have no MI300)."""
  amd = target.warp_size == 64
  stages = 2 if amd else 4
  if amd and m > 1:  # MFMA tiles: 16x16 instructions, two waves per SIMD (AMD's Triton GEMM tuning defaults)
    return dataclasses.replace(heuristic_config(m, k, n, group_size, dataclasses.replace(target, warp_size=32)),
                               num_stages=stages, waves_per_eu=2, matrix_instr_nonkdim=16,
                               **({"block_n": 64, "block_k": 64} if m > 256 else {}))
  if gemv and m <= GEMV_MAX_M.get(target.name, 1):
    return gemv_heuristic(m, k, n, group_size, target)
  if m == 1:  # the tile kernel's GEMV body
    tiles = math.ceil(n / 128)
    return KernelConfig(1, 128, 64, split_k=_split_k(target, tiles, k, 2 * 64, 4.0), num_warps=4, num_stages=stages - 1,
                        unpack=0)
  if m <= SWAP_AB_MAX_M.get(target.name, 0):  # 64 weight columns as wgmma's M, the rows of x as its N
    bm = 16 if m <= 16 else 32
    tiles = math.ceil(m / bm) * math.ceil(n / 64)
    return KernelConfig(bm, 64, 128, split_k=_split_k(target, tiles, k, 2 * 128, 3.5), num_warps=4,
                        num_stages=3, swap_ab=1)
  if m <= 64:
    bm = 16 if m <= 16 else 64
    tiles = math.ceil(m / bm) * math.ceil(n / 128)
    return KernelConfig(bm, 128, 64, split_k=_split_k(target, tiles, k, 2 * 64, 2.0), num_warps=4,
                       num_stages=stages)
  if m <= 256:
    return KernelConfig(64, 64, 128, num_warps=4, num_stages=stages)
  return KernelConfig(128, 128, 64, num_warps=8, num_stages=3)


def frag_heuristic(m: int, k: int, n: int, group_size: int, target: Target = H100) -> KernelConfig:
  """Defaults of the fragment-packed kernel, read off the session-7 H100 sweep
  (benchmarks/results/sweep-frag-h100-2026-11-26-s7.json; within 7 % of each shape's best on average over its 66
  (shape, M) points, 50 % at worst): 8- to 32-row tiles of x against 64 weight columns, scaled weights
  (SCALE_W = 1), split along K until about 4 programs per SM, up to M = 32; 64 x 128 tiles at
  M = 64; 128 x 128 to M = 256 and 128 x 256 beyond.  Other targets (not measured; the packing is tailored to
  Hopper's wgmma) get the same shapes but 64 columns at M = 64.  From M = 32 to 256 (what was measured) on
  H100 / H200 the scales are read as int32 pairs (SCALE_W = 2): session 11's re-pick sweep found them fastest at
  every M = 32, 64 and 128 point of its seven shapes and at 6 of 7 at M = 256, but 2 - 23 % slower than
  SCALE_W = 1 on the 8-row, 64-column tiles at M = 2 - 8
  (benchmarks/results/sweep-frag-repick-h100-2026-11-26-s11.json)."""
  # select_config legalizes block_k against the group
  if m <= 32:
    bm, bn, bk, warps, stages, programs = (8 if m <= 8 else 16 if m <= 16 else 32), 64, 128, 4, 3, 512
  elif m <= 64:  # elsewhere 64 columns: a 128 x 64 fp32 tile on 4 warps spills without wgmma (sm_80, gfx942)
    bm, bn, bk, warps, stages, programs = 64, 128 if target.name in FRAGMENT_TARGETS else 64, 128, 4, 3, 200
  elif m <= 256:
    bm, bn, bk, warps, stages, programs = 128, 128, 64, 8, 3, target.num_sms
  else:
    bm, bn, bk, warps, stages, programs = 128, 256, 64, 8, 4, 1
  tiles = math.ceil(m / bm) * math.ceil(n / bn)
  split = _split_k(target, tiles, k, 2 * bk, programs / target.num_sms, max_split=32)
  # groups of 32 (two per step) read their scales as pairs at every M: not measured, but SCALE_W = 1 would leave
  # four 16-bit loads a step outside the pipeline (sm_90 compiles)
  pairs = 16 < m <= 256 or group_size == 32
  scale_w = 2 if pairs and target.name in FRAGMENT_TARGETS else 1
  return KernelConfig(bm, bn, bk, split_k=split, num_warps=warps, num_stages=stages, kernel="frag", scale_w=scale_w)


@functools.lru_cache(maxsize=None)
def shipped_table(target_name: str) -> dict[str, KernelConfig]:
  path = CONFIG_DIR / f"{target_name}.json"
  if not path.exists():
    return {}
  return {key: KernelConfig(**cfg) for key, cfg in json.loads(path.read_text())["configs"].items()}


def cache_path(target_name: str) -> pathlib.Path:
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jw4a16")
  return pathlib.Path(root) / f"tuning-{target_name}.json"


@functools.lru_cache(maxsize=None)
def _user_table(path: str, mtime: float) -> dict[str, KernelConfig]:
  del mtime  # part of the key: a rewritten file is read again
  table = {}
  for key, cfg in json.loads(pathlib.Path(path).read_text()).items():
    try:
      table[key] = KernelConfig(**cfg)
    except (ValueError, TypeError):  # written by an older jw4a16 (a config it no longer has): tune it again
      continue
  return table


def user_table(target_name: str) -> dict[str, KernelConfig]:
  path = cache_path(target_name)
  try:
    return _user_table(str(path), path.stat().st_mtime)
  except (FileNotFoundError, ValueError, TypeError):
    return {}


def record_tuned(target_name: str, entries: dict[str, KernelConfig]) -> pathlib.Path:
  """Merges tuned winners into the on-disk cache, atomically (write a temp file, then rename)."""
  path = cache_path(target_name)
  path.parent.mkdir(parents=True, exist_ok=True)
  table = {key: cfg.to_json() for key, cfg in user_table(target_name).items()}
  table.update({key: cfg.to_json() for key, cfg in entries.items()})
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return path


# Measured on H100 (docs/performance.md): from this M on, XLA's one-pass dequantization to a bf16 weight plus
# cuBLAS beats the fused kernel, whose in-loop dequantization competes with the tensor cores for issue slots.
DENSE_FROM_M = {"h100": 512, "h200": 512}
# Groups of fewer than 64 rows (group 32) on the GPTQ packing: its tile kernel's K step clamps to the group, and at
# M = 256 it took 1.36 - 2.66x this route's time on the three shapes measured (session 11, docs/performance.md).
# The frag kernel runs groups of 32 two per 64-deep step and beat this route at M = 256 (54.4 / 130.4 / 91.3 us
# against 77.3 / 237.2 / 114.3, H100, session 12), so the fragment packing keeps DENSE_FROM_M.
DENSE_FROM_M_SMALL_GROUP = {"h100": 256, "h200": 256}
SMALL_GROUP = 64


def use_dequant_gemm(m: int, target: Target, group_size: int | None = None, packing: str = "gptq") -> bool:
  """Whether M is large enough that dequantize-then-GEMM beats the fused kernel on this target, for both packings
  (on the fragment packing session 7 found the routes within 6 % of each other at M = 512 - 2048), earlier for
  groups under SMALL_GROUP rows on the GPTQ packing (group_size resolved: -1 already replaced by K);
  $JW4A16_DENSE_FROM_M overrides it, for measuring the two routes against each other."""
  if os.environ.get("JW4A16_DENSE_FROM_M"):
    return m >= int(os.environ["JW4A16_DENSE_FROM_M"])
  small = packing == "gptq" and group_size is not None and group_size < SMALL_GROUP
  table = DENSE_FROM_M_SMALL_GROUP if small else DENSE_FROM_M
  return m >= table.get(target.name, 1 << 62)


def legalize(cfg: KernelConfig, k: int, group_size: int) -> KernelConfig:
  """The kernels need BLOCK_K to divide the group (each K step inside one group); clamp block_k to G.  The frag
  kernel also needs it to divide K (K is a multiple of 64 there), and takes groups of 32 as two halves of a
  64-deep step with the weights scaled before the dot (block_k 64, scale_w 1 or 2)."""
  if cfg.kernel == "frag" and group_size == 32 < k:
    return dataclasses.replace(cfg, block_k=64, scale_w=cfg.scale_w or 1)
  if group_size < k and cfg.block_k > group_size:
    return dataclasses.replace(cfg, block_k=group_size)
  if cfg.kernel == "frag" and k % cfg.block_k:
    return dataclasses.replace(cfg, block_k=64)
  return cfg


def check_config(cfg: KernelConfig, k: int, group_size: int) -> None:
  if cfg.kernel == "frag" and group_size == 32 < k:
    if cfg.block_k != 64 or not cfg.scale_w:
      raise ValueError(f"config block_k={cfg.block_k}, scale_w={cfg.scale_w}: the frag kernel takes group_size=32 "
                       "with block_k=64 and scale_w 1 or 2")
  elif group_size < k and group_size % cfg.block_k:
    raise ValueError(f"config block_k={cfg.block_k} must divide group_size={group_size}")


def fits(cfg: KernelConfig, target: Target, act_bytes: int = 2) -> bool:
  return cfg.shared_memory_bytes(act_bytes) <= target.shared_memory


def frag_acc_fits(cfg: KernelConfig, target: Target = H100) -> bool:
  """At most 128 fp32 accumulator registers a thread for the frag kernel's tile.  On sm_90 (Triton 3.6) every
  tile with 256 spilled hundreds of bytes (128 x 256 on 4 warps: 768; 256 x 256 on 8: 1556); with 128 it depends
  on the pipeline (128 x 128 on 4 warps: none with 64-deep steps and 3 stages, 8 bytes with 4 stages, 44 with
  128-deep steps), which scripts/make_table.py checks by compiling what it tables."""
  return cfg.block_m * cfg.block_n <= 128 * target.warp_size * cfg.num_warps


DISABLE_ENV = "JW4A16_DISABLE_KERNELS"


def disabled_kernels() -> frozenset[str]:
  """Kernels named in $JW4A16_DISABLE_KERNELS (comma list, e.g. "gemv"): the dispatcher does not pick them."""
  names = frozenset(v.strip() for v in os.environ.get(DISABLE_ENV, "").split(",") if v.strip())
  if names - {"gemv"}:
    raise ValueError(f"${DISABLE_ENV}={os.environ[DISABLE_ENV]!r}: only 'gemv' can be disabled")
  return names


def select_config(m: int, k: int, n: int, group_size: int, dtype: str, has_zp: bool,
                  target: Target = H100, packing: str = "gptq") -> KernelConfig:
  key = table_key(m, k, n, group_size, dtype, has_zp, packing)
  if packing == "fragment":  # one kernel reads this packing
    for table in (user_table(target.name), shipped_table(target.name)):
      if key in table and table[key].kernel == "frag":
        return legalize(table[key], k, group_size)
    return legalize(frag_heuristic(m, k, n, group_size, target), k, group_size)
  off = disabled_kernels()
  for table in (user_table(target.name), shipped_table(target.name)):
    if key in table and table[key].kernel not in off:
      return legalize(table[key], k, group_size)
  return legalize(heuristic_config(m, k, n, group_size, target, gemv="gemv" not in off), k, group_size)


def gemv_config(block_n: int, block_k: int, k_lanes: int, split_k: int, target: Target = H100,
                num_stages: int = 1, rows: int = 1) -> KernelConfig:
  """A gemv config whose warps exactly cover its [k_lanes, block_n // 8] word tile at 4 words (16 bytes) a
  thread: num_warps = k_lanes * block_n / (32 * warp_size); `rows` (1 or 2) rows of x per program."""
  warps = k_lanes * block_n // (32 * target.warp_size)
  if warps < 1:
    raise ValueError(f"gemv tile k_lanes={k_lanes} x block_n={block_n} is smaller than one warp of "
                     f"{target.warp_size} threads at 4 words each")
  return KernelConfig(rows, block_n, block_k, split_k=split_k, num_warps=warps, num_stages=num_stages,
                      kernel="gemv", k_lanes=k_lanes)


def gemv_candidates(m: int, k: int, n: int, group_size: int, target: Target = H100) -> list[KernelConfig]:
  """gemv tiles of 1-8 warps, 1 or 2 rows of x per program (2 from M = 2), split along K to about 1-8
  programs per SM."""
  out = []
  for rows, bn, lanes in itertools.product((1, 2) if m >= 2 else (1,), (256, 512, 1024, 2048), (1, 2, 4, 8, 16)):
    warps = lanes * bn // (32 * target.warp_size)
    if not 1 <= warps <= 8:
      continue
    tiles = math.ceil(m / rows) * math.ceil(n / bn)
    for split in (1, 2, 4, 8, 16, 32, 64):
      if k // split < GEMV_BLOCK_K * lanes or not target.num_sms <= tiles * split <= 8 * target.num_sms:
        continue
      out.append(gemv_config(bn, GEMV_BLOCK_K, lanes, split, target, rows=rows))
  return [legalize(c, k, group_size) for c in out]


# (block_k, num_warps, num_stages) searched up to M = 32: 128-deep steps on 4 warps, 3 stages (session 7's grid)
# and 64-deep steps with 3 or 4 stages, which the sweeps had left out and which took 6 - 15 % off three of the four
# Llama-3-8B decode projections at M = 1 on H100 (session 15).
SMALL_M_STEPS = frozenset({(128, 4, 3), (64, 4, 3), (64, 4, 4)})


def frag_candidates(m: int, k: int, n: int, group_size: int, target: Target = H100) -> list[KernelConfig]:
  """The fragment-packed kernel's search space at one M bucket (the session-7 sweep's grid, and 64-deep steps up to
  M = 32 since session 15): tiles of x sized to M, 64 or 128 weight columns (256 from M = 512), both scale
  placements up to M = 32, splits along K giving about 1 - 8 programs per SM, pruned by shared memory."""
  out = []
  mb = m_bucket(m)
  bms = {min(max(8, mb), 256 if mb >= 512 else 128)} | ({8, 16} if mb <= 8 else set()) | ({64} if mb >= 128 else set())
  for bm, bn, bk, warps, stages, scale_w in itertools.product(
      sorted(bms), (64, 128, 256), (64, 128), (4, 8), (3, 4), (0, 1, 2) if mb <= 32 else (1, 2)):
    if ((bn == 256) != (mb >= 512) or (bn == 64 and warps == 8)
        or (mb <= 32 and (bk, warps, stages) not in SMALL_M_STEPS)):
      continue
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    for split in (1, 2, 4, 8, 16, 32):
      if k // split < 2 * bk or (split > 1 and not tiles * split <= 8 * target.num_sms):
        continue
      out.append(KernelConfig(bm, bn, bk, split_k=split, num_warps=warps, num_stages=stages, kernel="frag",
                              scale_w=scale_w))
  out = dict.fromkeys(legalize(c, k, group_size) for c in out)
  return [c for c in out if fits(c, target) and k // c.split_k >= c.block_k and frag_acc_fits(c, target)]


def candidate_configs(m: int, k: int, n: int, group_size: int, target: Target = H100) -> list[KernelConfig]:
  """The search space for tuning at one M bucket, pruned by shared memory."""
  out = gemv_candidates(m, k, n, group_size, target) if m <= 8 else []
  if m == 1:
    for bn in (64, 128, 256):
      for bk in (32, 64, 128):
        for split in (1, 2, 4, 8, 16):
          for unpack in (0, 1):
            out.append(KernelConfig(1, bn, bk, split_k=split, num_warps=4, num_stages=3, unpack=unpack))
  bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, m_bucket(m))]
  for bm in bms:
    for bn in (64, 128, 256):
      for bk in (32, 64, 128, 256):
        for split in ((1, 2, 4, 8) if m <= 64 else (1,)):
          for warps in (4, 8):
            for stages in (3, 4, 5):
              out.append(KernelConfig(bm, bn, bk, split_k=split, num_warps=warps, num_stages=stages))
  if m <= 64:  # out^T = W^T x^T: 64 or 128 weight columns as the MMA's M
    for bm, bn, bk, split, stages in itertools.product([b for b in bms if b <= 32], (64, 128), (64, 128),
                                                       (1, 2, 4, 8, 16), (3, 4)):
      out.append(KernelConfig(bm, bn, bk, split_k=split, num_warps=4, num_stages=stages, swap_ab=1))
  out = dict.fromkeys(legalize(c, k, group_size) for c in out)  # dedupe, keep order
  return [c for c in out if fits(c, target) and k // c.split_k >= c.block_k]
