"""Matrix instruction, registers, shared memory, programs an SM and waves of the H100 table's fragment-packing picks,
compiled for sm_90 on this machine (no GPU needed):

  python scripts/occupancy.py [--ms 1,16,64,256] [--shapes 4096x28672,...] [--json out.jsonl]

A pick whose registers cross an allocation step can fit fewer programs an SM, and its launch may then take more
waves.  Session 21 suspected that for the 4096x28672 M = 256 pick (133 registers a thread against 127 before
session 20's unpacking, 3 programs an SM instead of 4); session 22 found the 4-stage tile with the same registers
and programs 1.4x faster than the 2-stage pick, so the slowdown was the pipeline depth, and no table pick takes
more waves with the new unpacking (docs/performance.md).  Registers and the matrix instruction depend on the
Triton version (3.6.0 emits `mma.sync` for an 8-row tile of x where 3.9 emits a wgmma): compile with the one the
GPU runs (a second Triton can be put first on PYTHONPATH).  M >= 512 is not listed: there the H100 dispatcher
dequantizes and calls the GEMM.
"""

import argparse
import json

from jw4a16 import bench, tuning
from jw4a16.kernels import compile as aot

TARGET = "sm90"


def rows(ms: list[int], shapes: list[tuple[int, int]], group_size: int = 128, dtype: str = "bfloat16") -> list[dict]:
  picks = [(m, k, n, tuning.select_config(m, k, n, group_size, dtype, False, tuning.H100, "fragment"))
           for m in ms for k, n in shapes]
  jobs = [dict(meta=cfg.meta(), n=n, k=k, group_size=group_size, dtype=dtype, kernel=cfg.kernel,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages, m_is_one=m == 1) for m, k, n, cfg in picks]
  out = []
  for (m, k, n, cfg), rep in zip(picks, aot.compile_in_subprocess(TARGET, jobs)):
    if "error" in rep:
      raise RuntimeError(f"M={m} {k}x{n} {cfg}: {rep['error']}")
    tiles, split = cfg.grid(m, n)
    programs = tiles * split
    per_sm = aot.programs_per_sm(TARGET, rep["registers"], cfg.num_warps, rep["shared"])
    out.append(dict(M=m, K=k, N=n, block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                    split_k=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    matrix_unit=rep["matrix_unit"], registers=rep["registers"], shared=rep["shared"],
                    spills=rep["spills"], programs_per_sm=per_sm,
                    programs=programs, waves=programs / (per_sm * tuning.H100.num_sms)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--ms", default="1,2,4,8,16,32,64,128,256", help="comma list of M")
  p.add_argument("--shapes", default=None, help="comma list of KxN (default: the benchmark's six)")
  p.add_argument("--json", default=None, help="append one JSON line per pick to this file")
  a = p.parse_args(argv)
  shapes = ([tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes
            else list(bench.SHAPES.values()))
  print("| M | K x N | BM x BN x BK, split, warps, stages | MMA | registers | shared | programs / SM | programs "
        "| waves |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows([int(m) for m in a.ms.split(",")], shapes):
    print(f"| {r['M']} | {r['K']}x{r['N']} | {r['block_m']} x {r['block_n']} x {r['block_k']}, {r['split_k']}, "
          f"{r['num_warps']}, {r['num_stages']} | {r['matrix_unit']} | {r['registers']} | {r['shared']} | "
          f"{r['programs_per_sm']} | {r['programs']} | {r['waves']:.2f} |", flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
