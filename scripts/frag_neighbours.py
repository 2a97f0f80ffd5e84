"""The frag kernel's picks at one M against neighbours the table's sweeps did not try (session 15,
docs/performance.md): one stage fewer, 8 warps, 64-deep steps with 3 or 4 stages, half and double the split, the
other tile width.  Timed through the JAX path (GPU time, L2-rotated copies, jw4a16.bench.per_op_us), each checked
against the reference first.  Rows are written in scripts/sweep.py's format (make_table.py --frag reads them);
with --cache DIR, picks beaten by more than 3 % are recorded in that tuning cache ($JW4A16_CACHE_DIR), which the
dispatcher reads before the shipped table, e.g. to profile a model with them.  bf16, group 128, symmetric.

  python scripts/frag_neighbours.py --shapes 4096x6144,14336x4096 --m 1 --out sweep.json --cache /tmp/tuned
"""

import argparse
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import bench, layout, tuning
from jw4a16.ops import w4a16_matmul
from jw4a16.reference import w4a16_matmul_reference


def neighbours(p: tuning.KernelConfig, k: int, target: tuning.Target) -> list[tuning.KernelConfig]:
  rep = dataclasses.replace
  out = [p, rep(p, num_stages=2)]
  for split in sorted({max(1, p.split_k // 2), p.split_k, p.split_k * 2}):
    if p.block_n == 128:
      out += [rep(p, num_warps=8, num_stages=2, split_k=split),
              rep(p, num_warps=8, block_k=64, num_stages=3, split_k=split),
              rep(p, num_warps=8, block_k=64, num_stages=4, split_k=split)]
    out += [rep(p, block_k=64, num_stages=stages, split_k=split) for stages in (3, 4)]
    out += [rep(p, block_n=192 - p.block_n, split_k=split)]
  return [c for c in dict.fromkeys(out) if k // c.split_k >= 2 * c.block_k and tuning.fits(c, target)
          and tuning.frag_acc_fits(c, target)]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4096x6144,14336x4096,4096x28672,4096x4096")
  p.add_argument("--m", type=int, default=1)
  p.add_argument("--seconds", type=float, default=600, help="stop starting new configs after this long")
  p.add_argument("--out", default=None)
  p.add_argument("--cache", default=None, help="record picks beaten by > 3 %% in this tuning-cache folder")
  a = p.parse_args()
  deadline, target, m = time.time() + a.seconds, tuning.H100, a.m
  rows, found = [], {}
  for shape in a.shapes.split(","):
    k, n = map(int, shape.split("x"))
    pick = tuning.select_config(m, k, n, 128, "bfloat16", False, target, "fragment")
    gptq = [bench.make_quantized(jax.random.fold_in(jax.random.key(1), i), k, n, 128, jnp.bfloat16, True)
            for i in range(max(8, math.ceil(2 * bench.L2_BYTES / (k * n / 2)) + 1))]
    sets = [(layout.to_fragment_packed(qw), s, None) for qw, s, _ in gptq]
    x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
    ref = np.asarray(w4a16_matmul_reference(x, gptq[0][0], gptq[0][1], group_size=128), np.float64)
    del gptq[1:]
    timed = []
    for cfg in neighbours(pick, k, target):
      if time.time() > deadline:
        break
      op = lambda x, w, cfg=cfg: w4a16_matmul(x, *w, group_size=128, config=cfg, packing="fragment")  # noqa: E731
      try:
        got = np.asarray(jax.jit(op)(x, sets[0]), np.float64)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        if not err < 1e-2:
          print(f"BAD {k}x{n} {cfg}: relative error {err:.2e}")
          continue
        us = bench.per_op_us(op, x, sets)
      except Exception as e:  # noqa: BLE001 - a config this GPU cannot run is skipped
        print(f"FAIL {cfg}: {type(e).__name__} {str(e)[:120]}")
        continue
      timed.append((us, cfg))
      rows.append(dict(k=k, n=n, m=m, asym=False, us=us, err=err, config=cfg.to_json(), heuristic=cfg == pick))
      print(f"{k}x{n} M={m} {us:7.2f} us err {err:.1e} {'PICK ' if cfg == pick else ''}{cfg}", flush=True)
    pick_us = next((us for us, c in timed if c == pick), None)
    best = min(timed, key=lambda t: t[0], default=None)
    if best and pick_us and best[0] < 0.97 * pick_us:
      found[tuning.table_key(m, k, n, 128, "bfloat16", False, "fragment")] = best[1]
      print(f"==> {k}x{n} M={m}: {pick_us:.2f} -> {best[0]:.2f} us with {best[1]}", flush=True)
    del sets, gptq
  if a.out:
    json.dump(rows, open(a.out, "w"), indent=1)
  if a.cache and found:
    os.environ[tuning.CACHE_ENV] = a.cache
    print("recorded in", tuning.record_tuned(target.name, found))


if __name__ == "__main__":
  main()
