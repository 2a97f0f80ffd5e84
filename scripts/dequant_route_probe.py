"""The dequantize-then-GEMM route's pieces on a GPU (session 15, docs/performance.md): per shape the dequantization
alone (the XLA fusion writing W^T [N, K], the Triton kernel writing W [K, N]), the whole route both ways
($JW4A16_DEQUANT=xla / triton, see jw4a16.ops.dequant_gemm) and XLA's bf16 `x @ w`, in GPU time over L2-rotated
weight copies (jw4a16.bench.per_op_us).  bf16, group 128, symmetric, fragment packing.

  python scripts/dequant_route_probe.py --ms 1024,4096 --out route.json
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import bench, layout, ops
from jw4a16.reference import dequantize_fragment_nk


def route(how):
  def op(x, w):
    os.environ[ops.DEQUANT_ENV] = how  # read when the op is traced (inside per_op_us's first call)
    return ops.dequant_gemm(x, w[0], w[1], None, group_size=128, zp_bias=8, packing="fragment")
  return op


DEQUANT = {"xla_nk": lambda x, w: dequantize_fragment_nk(w[0], w[1], None, group_size=128),
           "triton_kn": lambda x, w: ops.dequantize_fragment_call(w[0], w[1], None, group_size=128, zp_bias=8,
                                                                  dtype=w[1].dtype)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4096x28672,14336x4096,8192x10240,4096x6144,28672x8192,8192x57344")
  p.add_argument("--ms", default="1024,4096")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  key, rows = jax.random.key(0), []
  for shape in a.shapes.split(","):
    k, n = map(int, shape.split("x"))
    sets = []
    for i in range(4):
      qw, s, _ = bench.make_quantized(jax.random.fold_in(key, i), k, n, 128, jnp.bfloat16, True)
      sets.append((layout.to_fragment_packed(qw), s))
    w_kn, wt = jax.jit(DEQUANT["triton_kn"])(None, sets[0]), jax.jit(DEQUANT["xla_nk"])(None, sets[0])
    same = bool(np.array_equal(np.asarray(w_kn).view(np.uint16), np.asarray(wt).T.view(np.uint16)))
    del w_kn, wt
    deq = {name: bench.per_op_us(f, None, sets) for name, f in DEQUANT.items()}
    dense = [jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), jnp.bfloat16)
             for i in range(2 if k * n > 2e8 else 3)]
    for m in map(int, a.ms.split(",")):
      x = jax.random.normal(jax.random.fold_in(key, 999), (m, k), jnp.bfloat16)
      row = dict(K=k, N=n, M=m, bit_identical=same, dequant_xla_nk_us=deq["xla_nk"],
                 dequant_triton_kn_us=deq["triton_kn"])
      for how in ("xla", "triton"):
        row[f"route_{how}_us"] = bench.per_op_us(route(how), x, sets)
      row["xla_bf16_us"] = bench.per_op_us(lambda x, w: x @ w, x, dense)
      for how in ("xla", "triton"):
        row[f"ratio_{how}"] = row[f"route_{how}_us"] / row["xla_bf16_us"]
      print(json.dumps({f: (round(v, 2) if isinstance(v, float) else v) for f, v in row.items()}), flush=True)
      rows.append(row)
    del sets, dense
  if a.out:
    json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
  main()
