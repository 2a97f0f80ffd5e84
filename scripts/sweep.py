"""Tile-config sweep of w4a16_gemm_kernel launched from torch (same compiled kernel as the JAX path).

Developer tool for building jw4a16/configs/<gpu>.json; needs a CUDA/ROCm torch.  Times CUDA-graph
replays (triton.testing.do_bench_cudagraph: Triton's Python launcher costs ~20 us a launch, more than the kernel
at small M), each replay running the op over R weight copies that together exceed twice the 50 MB L2, so the
weights come from HBM as in a model; the time per op is the replay time / R), with one zeroed buffer of split-K
counters for all launches (the kernels leave them zero, and jw4a16.ops runs no memset either), and checks every
config against a dequantize-then-matmul reference first.

  python scripts/sweep.py --shapes 4096x6144,4096x28672 --ms 1,16,64 --out sweep.json
  python scripts/sweep.py --packing fragment --ms 1,16 --out sweep-frag.json   # the frag kernel
  python scripts/sweep.py --packing fragment --seed-from old.json --top 3 ...  # re-time old bests, plus others
  python scripts/sweep.py --packing fragment --around-pick ...  # the table's picks and their scale / stage variants
"""

import argparse
import random
import dataclasses
import itertools
import json
import math
import time

import torch
import triton
import triton.testing

from jw4a16.kernels import KERNELS
from jw4a16.layout import to_fragment_packed
from jw4a16.tuning import KernelConfig, candidate_configs, frag_candidates, gemv_candidates, select_config


def make(k, n, g, dtype, has_zp, dev="cuda"):
  qw = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=dev)
  s = (torch.rand(k // g, n, device=dev) * 0.01 + 0.001).to(dtype)
  qz = torch.randint(-2**31, 2**31 - 1, (k // g, n // 8), dtype=torch.int32, device=dev) if has_zp else None
  return qw, s, qz


def dequant(qw, s, qz, g):
  shifts = torch.arange(8, device=qw.device, dtype=torch.int32) * 4
  q = ((qw[:, :, None] >> shifts) & 0xF).reshape(qw.shape[0], -1).float()
  z = 8.0 if qz is None else ((qz[:, :, None] >> shifts) & 0xF).reshape(qz.shape[0], -1).float()
  z = z if qz is None else z.repeat_interleave(g, 0)
  return ((q - z) * s.float().repeat_interleave(g, 0)).to(s.dtype)


def fragment_sets(sets):
  """Weight sets (qweight, scales, qzeros) with set 0's qweight fragment-packed (layout.to_fragment_packed, on the
  CPU) and copies of it on the device in the others, which keep their own scales and zero points: the copies
  rotate the L2 cache as well as distinct weights, and the CPU packs only one (frag_ab packs 8 copies of 235 MB
  for 8192x57344; in session 12 it got through two of six shapes in 170 s, how much of that was packing was not
  measured).  Only set 0 is checked against a reference."""
  packed = torch.from_numpy(to_fragment_packed(sets[0][0].cpu().numpy())).to(sets[0][0].device)
  return [(packed if i == 0 else packed.clone(), s, qz) for i, (_, s, qz) in enumerate(sets)]


_COUNTERS = {}


def _counters(n, device):
  """n split-K counters, zero: one buffer per device, which every launch leaves zero (kernels/splitk.py)."""
  buf = _COUNTERS.get(device)
  if buf is None or buf.numel() < n:
    buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
  return buf[:n]


def launch(cfg, x, qw, s, qz, g, kernel=None):
  """One launch of cfg's kernel (or `kernel`, another version of it: scripts/frag_ab.py) on fresh outputs."""
  m, k = x.shape
  n = s.shape[1]
  out = torch.empty((m, n), dtype=x.dtype, device=x.device)
  partials, locks = cfg.scratch_shapes(m, n)
  partials = torch.empty(partials, dtype=torch.float32, device=x.device)
  locks = _counters(locks[0], x.device)
  extra = {"PTX": int(torch.version.hip is None)} if cfg.kernel == "frag" else {}  # as ops._launch passes it
  (kernel or KERNELS[cfg.kernel])[cfg.grid(m, n)](x, qw, s, s if qz is None else qz, m, locks, out, partials, N=n,
                                                  K=k, GROUP_SIZE=g, HAS_ZP=qz is not None, ZP_BIAS=8,
                                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
                                                  **extra)
  return out


def around_pick(h: KernelConfig, m: int) -> list[KernelConfig]:
  """The frag pick's neighbours: each scale placement (0 only up to M = 32, as frag_candidates) at its own number
  of stages and one fewer."""
  if h.kernel != "frag":
    return []
  return [dataclasses.replace(h, scale_w=sw, num_stages=st) for sw in ((0, 1, 2) if m <= 32 else (1, 2))
          for st in (h.num_stages, h.num_stages - 1) if st >= 2]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4096x6144,4096x28672,14336x4096")
  p.add_argument("--ms", default="1,16,64,256,2048")
  p.add_argument("--group", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--asym", action="store_true")
  p.add_argument("--max-configs", type=int, default=24)
  p.add_argument("--kinds", default="all", choices=("all", "gemv"), help="gemv: only gemv kernel candidates")
  p.add_argument("--packing", default="gptq", choices=("gptq", "fragment"),
                 help="fragment: the frag kernel's candidates on fragment-packed weights (layout.to_fragment_packed)")
  p.add_argument("--seed-from", nargs="*", default=[],
                 help="earlier sweeps: their --top fastest configs at each (K, N, M) are timed too (after a kernel "
                 "change)")
  p.add_argument("--top", type=int, default=3)
  p.add_argument("--around-pick", action="store_true",
                 help="time only today's pick and its neighbours in scale_w and num_stages (after a kernel change)")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  seeds = {}
  for path in a.seed_from:
    for r in json.load(open(path)):
      seeds.setdefault((r["k"], r["n"], r["m"]), []).append((r["us"], KernelConfig(**r["config"])))
  dtype = getattr(torch, a.dtype)
  bw = 3.0e12
  results = []
  for shape in a.shapes.split(","):
    k, n = map(int, shape.split("x"))
    r = max(1, math.ceil(100e6 / (k * n / 2)))
    sets = [make(k, n, a.group, dtype, a.asym) for _ in range(r)]
    qw, s, qz = sets[0]
    w = dequant(qw, s, qz, a.group)
    if a.packing == "fragment":  # the reference stays the GPTQ-layout dequantization above
      sets = fragment_sets(sets)
      qw = sets[0][0]
    dense = [torch.randn(k, n, device="cuda", dtype=dtype) for _ in range(max(1, math.ceil(100e6 / (2 * k * n))))]
    for m in map(int, a.ms.split(",")):
      x = torch.randn(m, k, device="cuda", dtype=dtype)
      ref = (x.float() @ w.float())
      floor_us = max((k * n / 2 + s.numel() * 2 + m * (k + n) * 2) / bw, 2 * m * n * k / 780e12) * 1e6
      dense_us = triton.testing.do_bench_cudagraph(lambda: [x @ d for d in dense],
                                                   return_mode="median") * 1e3 / len(dense)
      h = select_config(m, k, n, a.group, a.dtype, a.asym, packing=a.packing)  # today's pick: the baseline
      if a.around_pick:
        cands = list(dict.fromkeys([h] + around_pick(h, m)))
      else:  # the current pick, the seeds' fastest, then an even spread over the rest
        if a.packing == "fragment":
          cands = frag_candidates(m, k, n, a.group)
        else:
          cands = (gemv_candidates if a.kinds == "gemv" else candidate_configs)(m, k, n, a.group)
        first = list(dict.fromkeys([h] + [c for _, c in sorted(seeds.get((k, n, m), []), key=lambda t: t[0])[:a.top]]))
        rest = [c for c in cands if c not in first]
        cands = first + random.Random(m * 7919 + k).sample(rest, min(a.max_configs, len(rest)))
      rows = []
      for cfg in cands:
        t0 = time.time()
        try:
          out = launch(cfg, x, qw, s, qz, a.group)
          err = ((out.float() - ref).norm() / ref.norm()).item()
          if not err < 1e-2:
            print("BAD", m, k, n, cfg, err)
            continue
          us = triton.testing.do_bench_cudagraph(lambda: [launch(cfg, x, *ws, a.group) for ws in sets],
                                                 return_mode="median") * 1e3 / r
        except Exception as e:  # out of resources etc.
          print("FAIL", cfg, str(e)[:200])
          continue
        rows.append((us, cfg))
        results.append(dict(k=k, n=n, m=m, asym=a.asym, us=us, dense_us=dense_us, floor_us=floor_us, err=err,
                            config=cfg.to_json(), heuristic=cfg == h, compile_s=time.time() - t0))
      rows.sort(key=lambda r: r[0])
      hus = [r[0] for r in rows if r[1] == h]
      print(f"K={k} N={n} M={m}: floor {floor_us:.1f} us, torch dense {dense_us:.1f} us, "
            f"current pick {hus[0] if hus else float('nan'):.1f} us")
      for us, cfg in rows[:4]:
        print(f"   {us:8.1f} us  {floor_us / us:5.2f} of floor  {cfg}", flush=True)
      if a.out:  # after every (shape, M): a run cut short keeps what it measured
        json.dump(results, open(a.out, "w"), indent=1)


if __name__ == "__main__":
  main()
