"""Same-run A/B of two versions of the frag kernel on the shipped table's picks (torch, CUDA graphs), e.g. a branch
against main:

  git show main:jw4a16/kernels/w4a16_frag.py > frag_main.py     # on the branch, in the repo root (untracked)
  python scripts/frag_ab.py --old frag_main.py --shapes 8192x57344,4096x28672 --ms 1,16,64 --out ab.json
  python scripts/frag_ab.py --old frag_main.py --asym ...    # weights with zero points, the asymmetric picks

"old" is the kernel source file given, "new" the working tree's jw4a16/kernels/w4a16_frag.py.  Each point times the
table's pick (and, at M <= 16, the same tile with one more pipeline stage) over R weight copies that exceed twice
the L2 cache, launched as scripts/sweep.py launches, checks both outputs against a dequantize-then-matmul
reference, and prints the ratio.  Session 10's
A/Bs (benchmarks/results/frag-scale-prefetch-ab-*.json) were made this way.  Needs a CUDA torch.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import torch
import triton.testing

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sweep import dequant, fragment_sets, launch, make  # noqa: E402

from jw4a16.kernels import w4a16_frag  # noqa: E402
from jw4a16.tuning import select_config  # noqa: E402


def load_kernel(path: str):
  """w4a16_frag_kernel from a kernel source file (Triton reads the function's source from that file)."""
  spec = importlib.util.spec_from_file_location(f"frag_ab_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.w4a16_frag_kernel


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--old", required=True, help="the kernel source file to compare against the working tree's")
  p.add_argument("--shapes", default="8192x57344,4096x28672,28672x8192,8192x10240,14336x4096,4096x6144")
  p.add_argument("--ms", default="1,16,64,256")
  p.add_argument("--out", default=None)
  p.add_argument("--asym", action="store_true", help="weights with zero points (the table's asymmetric picks)")
  a = p.parse_args(argv)
  kernels = {"old": load_kernel(a.old), "new": w4a16_frag.w4a16_frag_kernel}
  rows = []
  for shape in a.shapes.split(","):
    k, n = map(int, shape.split("x"))
    r = max(8, math.ceil(2 * 50 * 2**20 / (k * n / 2)) + 1)
    raw = [make(k, n, 128, torch.bfloat16, a.asym) for _ in range(r)]
    w = dequant(*raw[0], 128).float()
    sets = fragment_sets(raw)
    del raw
    for m in map(int, a.ms.split(",")):
      x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
      ref = x.float() @ w
      pick = select_config(m, k, n, 128, "bfloat16", a.asym, packing="fragment")
      for cfg in [pick] + ([dataclasses.replace(pick, num_stages=pick.num_stages + 1)] if m <= 16 else []):
        res = {}
        for name, kernel in kernels.items():
          out = launch(cfg, x, *sets[0], 128, kernel)
          err = ((out.float() - ref).norm() / ref.norm()).item()
          us = triton.testing.do_bench_cudagraph(
              lambda cfg=cfg, kernel=kernel: [launch(cfg, x, *ws, 128, kernel) for ws in sets],
              return_mode="median") * 1e3 / r
          res[name] = (us, err)
        rows.append(dict(k=k, n=n, m=m, asym=a.asym, config=cfg.to_json(), old_us=res["old"][0], new_us=res["new"][0],
                         old_err=res["old"][1], new_err=res["new"][1]))
        print(f"{k}x{n} M={m:4d} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} "
              f"st{cfg.num_stages} sw{cfg.scale_w}: old {res['old'][0]:7.1f} new {res['new'][0]:7.1f} us "
              f"({res['old'][0] / res['new'][0]:.2f}x), errors {res['old'][1]:.1e} / {res['new'][1]:.1e}",
              flush=True)
        if a.out:  # after every point: a run cut short keeps what it measured
          pathlib.Path(a.out).write_text(json.dumps(rows, indent=1))
    del sets
    torch.cuda.empty_cache()


if __name__ == "__main__":
  main()
