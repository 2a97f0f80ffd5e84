"""Where the time of a jitted step goes on the GPU: a jax.profiler trace, summarized.

  python scripts/profile_step.py op --shape 4096x6144 --m 1          # one w4a16_matmul, R weight copies
  python scripts/profile_step.py decode --layers 32 --batch 1         # Llama-3-8B-shaped decode step

Prints, per step: host wall time, GPU busy time (union of kernel intervals), the sum of kernel times, the
number of kernels, and the kernels grouped by name with their total time.  A step whose wall time is much
larger than its GPU busy time is bound by the host (launches), not by the kernels.  Writes the perfetto trace
(--trace-dir) for a closer look.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16.profiling import summarize


def report(name: str, wall_us: float, s: dict):
  print(f"\n== {name}: wall {wall_us:.1f} us/step, GPU busy {s['gpu_busy_us_per_step']:.1f} us/step, "
        f"kernel sum {s['kernel_sum_us_per_step']:.1f} us, {s['kernels_per_step']:.1f} device events/step")
  print(f"   device lines: {s['gpu_processes']}")
  print("   device events per step (count, us):")
  for n, c, t in s["top_kernels"]:
    print(f"     {c:7.1f} {t:9.1f}  {n}")
  print("   host events per step (count, us):")
  for n, c, t in s["top_host"]:
    print(f"     {c:7.1f} {t:9.1f}  {n}")


def trace_steps(fn, args_fn, steps: int, trace_dir: str, top: int = 12):
  """Runs fn(*args_fn(i)) `steps` times untraced (timed) and then traced; returns (median wall us, summary)."""
  for i in range(3):
    jax.block_until_ready(fn(*args_fn(i)))
  ts = []
  for i in range(steps):
    a = args_fn(i)
    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    ts.append(time.perf_counter() - t)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(steps):
      jax.block_until_ready(fn(*args_fn(i)))
  return statistics.median(ts) * 1e6, summarize(trace_dir, steps, top)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("what", choices=("op", "decode"))
  p.add_argument("--shape", default="4096x6144")
  p.add_argument("--m", type=int, default=1)
  p.add_argument("--copies", type=int, default=16)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--variant", default="w4a16", choices=("w4a16", "bf16"))
  p.add_argument("--packing", default="auto", choices=("auto", "gptq", "fragment"),
                 help="the int4 weights' layout (op and decode; default: the fastest for this device)")
  p.add_argument("--no-fuse", action="store_true")
  p.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                 help="passed to jax.jit(compiler_options=...) of the decode step, "
                      "e.g. xla_gpu_graph_min_graph_size=1000")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--top", type=int, default=12, help="how many event names to list (device and host)")
  p.add_argument("--trace-dir", default="/tmp/jw4a16-trace")
  p.add_argument("--json", default=None, help="append the summary as one JSON line to this file")
  a = p.parse_args(argv)
  print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""), "| device:", jax.devices()[0].device_kind, flush=True)

  if a.what == "op":
    from jw4a16 import bench, w4a16_matmul  # noqa: PLC0415
    from jw4a16.layout import to_fragment_packed  # noqa: PLC0415
    from jw4a16.ops import resolve_packing  # noqa: PLC0415

    k, n = map(int, a.shape.split("x"))
    packing = resolve_packing(a.packing, k, 128)
    sets = [bench.make_quantized(jax.random.key(i), k, n, 128, jnp.bfloat16, True) for i in range(a.copies)]
    if packing == "fragment":
      sets = [(to_fragment_packed(qw), s, qz) for qw, s, qz in sets]
    x = jax.random.normal(jax.random.key(99), (a.m, k), jnp.bfloat16)
    many = jax.jit(lambda x, ws: [w4a16_matmul(x, *w, group_size=128, packing=packing) for w in ws])
    wall, s = trace_steps(many, lambda i: (x, sets), a.steps, a.trace_dir, a.top)
    name = f"op {k}x{n} M={a.m} packing={packing}, {a.copies} calls per step"
    report(name, wall, s)
    print(f"   per op: wall {wall / a.copies:.1f} us, GPU busy {s['gpu_busy_us_per_step'] / a.copies:.1f} us")
  else:
    from jw4a16.models import llama_bench  # noqa: PLC0415
    from jw4a16.models.llama import init_cache  # noqa: PLC0415

    model, params = llama_bench.build(dataclasses.replace(llama_bench.LLAMA3_8B, num_layers=a.layers),
                                      a.variant == "w4a16", jax.random.key(0), fuse=not a.no_fuse,
                                      packing=a.packing)
    cfg = model.cfg
    opts = dict(o.split("=", 1) for o in a.compiler_option)
    step = jax.jit(lambda p, ids, cache, i: model.apply({"params": p}, ids, cache, i), donate_argnums=(2,),
                   compiler_options=opts or None)
    ids = jnp.ones((a.batch, 1), jnp.int32)
    state = {"cache": init_cache(cfg, a.batch, 256)}

    def run(p, ids, i):
      logits, state["cache"] = step(p, ids, state["cache"], i)
      return logits

    t = time.perf_counter()
    jax.block_until_ready(run(params, ids, np.int32(0)))
    print(f"compile + first step: {time.perf_counter() - t:.1f} s", flush=True)
    wall, s = trace_steps(run, lambda i: (params, ids, np.int32(1 + i % 200)), a.steps, a.trace_dir, a.top)
    name = (f"decode {a.variant} layers={a.layers} batch={a.batch} fused={not a.no_fuse} packing={a.packing} "
            f"options={opts}")
    report(name, wall, s)
    print(f"   tokens/s: {a.batch / (wall * 1e-6):.0f}")
  if a.json:
    with open(a.json, "a") as f:
      f.write(json.dumps({"name": name, "xla_flags": os.environ.get("XLA_FLAGS", ""), "wall_us": wall, **s}) + "\n")


if __name__ == "__main__":
  main()
