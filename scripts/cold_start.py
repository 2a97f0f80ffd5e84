"""Cold start of a W4A16 layer shape: the first jitted call in a fresh process (importing jax-triton and Triton,
XLA compile, Triton compile, config lookup; nothing is tuned at call time), then, in the same process, the first
call of a new shape (N + 128: a new kernel to compile) and the second call of that one.

  python scripts/cold_start.py --cases 4096x6144:1,14336x4096:1,4096x6144:256 [--packing fragment] \
      [--json out.jsonl]

Each case runs in its own Python process, so no compiled kernel is reused (jax-triton turns Triton's disk
cache off; XLA's persistent cache is off by default).  JAX's start-up and the weights' creation happen before
the clock starts.
"""

import argparse
import json
import subprocess
import sys

_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
from jw4a16 import bench, layout, w4a16_matmul
k, n, m, packing = {k}, {n}, {m}, {packing!r}
pack = layout.to_fragment_packed if packing == "fragment" else (lambda q: q)
qw, s, qz = bench.make_quantized(jax.random.key(0), k, n, 128, jnp.bfloat16, True)
qw = pack(qw)
x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
jax.block_until_ready((qw, s, x))
f = jax.jit(lambda x, qw, s: w4a16_matmul(x, qw, s, group_size=128, packing=packing))
t = time.perf_counter(); jax.block_until_ready(f(x, qw, s)); first = time.perf_counter() - t
qw, s, qz = bench.make_quantized(jax.random.key(2), k, n + 128, 128, jnp.bfloat16, True)
qw = pack(qw)
jax.block_until_ready((qw, s))
t = time.perf_counter(); jax.block_until_ready(f(x, qw, s)); new_shape = time.perf_counter() - t
t = time.perf_counter(); jax.block_until_ready(f(x, qw, s)); second = time.perf_counter() - t
print(json.dumps(dict(k=k, n=n, m=m, packing=packing, first_call_s=first, new_shape_first_call_s=new_shape,
                      second_call_s=second,
                      torch_imported="torch" in sys.modules,
                      device=jax.devices()[0].device_kind)))
"""


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--cases", default="4096x6144:1,14336x4096:1,4096x28672:16,4096x6144:256",
                 help="comma list of KxN:M")
  p.add_argument("--packing", default="gptq", choices=("gptq", "fragment"),
                 help="the weights' packing (fragment: what jw4a16.preferred_packing picks on H100)")
  p.add_argument("--json", default=None, help="append one JSON line per case to this file")
  a = p.parse_args(argv)
  for case in a.cases.split(","):
    shape, m = case.split(":")
    k, n = map(int, shape.split("x"))
    child = _CHILD.format(k=k, n=n, m=int(m), packing=a.packing)
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{k}x{n} M={row['m']} {a.packing}: first call in the process {row['first_call_s']:.2f} s; "
          f"then N + 128: first call {row['new_shape_first_call_s']:.2f} s, "
          f"second {row['second_call_s'] * 1e3:.2f} ms", flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
