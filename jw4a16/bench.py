"""W4A16 GEMM benchmark: jw4a16 against XLA dense bf16 and the plain-JAX int4 path, in one run.

  python -m jw4a16.bench                        # the full table (GPU), writes benchmarks/results/<card>.*
  python -m jw4a16.bench --quick                # a few rows
  python -m jw4a16.bench --plot FILE.json       # redraw the PNG from a results file (no GPU needed)
  python -m jw4a16.bench --merge A.json B.json --name h100   # one table from runs split by M (no GPU needed)

Timing: one jitted function applies the op to R weight sets in turn, with R chosen so the sets exceed twice the
L2 cache, so every op reads its weights from HBM.  The figures are GPU time (`jw4a16.profiling`): the device
events (kernels, memsets, XLA's fusions) of the call in a jax.profiler trace, the median over 10 calls, divided
by R; every op the call adds counts, the host's dispatch does not.  Beside them the wall-clock figure of the
earlier tables, (t_R - t_1) / (R - 1) from medians of host time, which also carries per-launch host cost
(`wall_us` columns).  Where the profiler gives no device events (--timing auto checks once), the run is timed by
wall clock alone and says so (`timing` in the results).  Every timed configuration is checked against the
reference first.  jw4a16's weights are in the packing a loader picks on this card (`jw4a16.preferred_packing`:
"fragment" on H100 / H200), converted once before timing, as a model holds them; --packing gptq measures the GPTQ
layout.  The card's two ceilings (copy bandwidth counting read + write, and a large bf16 matmul) are measured
the same way in the same run; floor = max(bytes / bandwidth, flops / matmul peak).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import profiling
from jw4a16.layout import to_fragment_packed
from jw4a16.ops import current_target, resolve_backend, resolve_packing, w4a16_matmul
from jw4a16.reference import w4a16_matmul_reference

SHAPES = {  # (K, N)
    "llama3-8b qkv": (4096, 6144), "llama3-8b gate_up": (4096, 28672), "llama3-8b down": (14336, 4096),
    "llama3-70b qkv": (8192, 10240), "llama3-70b gate_up": (8192, 57344), "llama3-70b down": (28672, 8192),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
L2_BYTES = 50 * 2**20


def _median_time(f, *args, reps: int = 20) -> float:
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _many(op):
  return jax.jit(lambda x, ws: [op(x, w) for w in ws])


def per_op_us(op, x, weight_sets, steps: int = 10, many=None) -> float:
  """GPU time of one op(x, w) in microseconds: the device time of a jitted call over all weight sets (median of
  `steps` calls, jw4a16.profiling) / their number.  many: that call's _many(op), if already built."""
  return profiling.device_us(many or _many(op), (x, weight_sets), steps) / len(weight_sets)


def per_op_wall_us(op, x, weight_sets, reps: int = 20, many=None) -> float:
  """(t_R - t_1) / (R - 1) in microseconds, each t the median wall time of `reps` jitted calls over R or 1 weight
  sets: the earlier tables' figure, host launch cost included where the host is slower than the GPU."""
  many = many or _many(op)
  t_r = _median_time(many, x, weight_sets, reps=reps)
  t_1 = _median_time(many, x, weight_sets[:1], reps=reps)
  return max(t_r - t_1, 0.0) / (len(weight_sets) - 1) * 1e6


TIMINGS = ("auto", "gpu", "wall")


def resolve_timing(choice: str = "auto") -> tuple[str, str]:
  """("gpu" or "wall", why): "auto" takes GPU time where the profiler gives device events for a probe op (CUDA's
  CUPTI does; a backend whose traces lack them falls back to wall clock rather than failing the run)."""
  if choice not in TIMINGS:
    raise ValueError(f"timing={choice!r} must be one of {TIMINGS}")
  if choice != "auto":
    return choice, f"--timing {choice}"
  try:
    profiling.device_us(jax.jit(lambda a: a + 1), (jnp.ones((1024,), jnp.float32),), steps=2)
  except Exception as e:  # noqa: BLE001 - any profiler failure means: no GPU time on this machine
    return "wall", f"no GPU time from the profiler here ({type(e).__name__}: {e}); timing by wall clock"
  return "gpu", "GPU time from the profiler's device events"


def op_us(timing: str, op, x, weight_sets) -> float:
  """The per-op time of `timing` ("gpu": per_op_us, "wall": per_op_wall_us)."""
  return (per_op_us if timing == "gpu" else per_op_wall_us)(op, x, weight_sets)


def measure_ceilings(timing: str = "gpu") -> tuple[float, float]:
  """(copy TB/s counting read + write, bf16 matmul TFLOP/s) on the default device, timed like the ops."""
  arrays = [jnp.full((2**27,), i, jnp.bfloat16) for i in range(6)]  # 256 MiB each
  copy_us = op_us(timing, lambda _, a: a + jnp.bfloat16(1), None, arrays)
  copy_tbps = 2 * arrays[0].nbytes / (copy_us * 1e-6) / 1e12
  del arrays
  n = 8192
  key = jax.random.key(0)
  x = jax.random.normal(key, (n, n), jnp.bfloat16)
  ys = [jax.random.normal(jax.random.fold_in(key, i), (n, n), jnp.bfloat16) for i in range(4)]
  mm_us = op_us(timing, lambda x, y: x @ y, x, ys)
  return copy_tbps, 2 * n**3 / (mm_us * 1e-6) / 1e12


def make_quantized(key, k, n, group_size, dtype, symmetric):
  g = k if group_size == -1 else group_size
  k1, k2, k3 = jax.random.split(key, 3)
  qweight = jax.random.randint(k1, (k, n // 8), -2**31, 2**31 - 1, jnp.int32)
  scales = (jax.random.uniform(k2, (k // g, n), jnp.float32, 0.001, 0.01)).astype(dtype)
  qzeros = None if symmetric else jax.random.randint(k3, (k // g, n // 8), -2**31, 2**31 - 1, jnp.int32)
  return qweight, scales, qzeros


def xla_int4_weights(qweight, scales, qzeros, group_size):
  """What a user writes in plain JAX: the weight as jnp.int4 (q - 8), zero points as int4, group scales."""
  from jw4a16.layout import unpack_int4  # noqa: PLC0415

  q = (unpack_int4(qweight, axis=1) - 8).astype(jnp.int4)
  z = None if qzeros is None else (unpack_int4(qzeros, axis=1) - 8).astype(jnp.int4)
  return q, scales, z


def xla_int4_op(group_size):
  def op(x, w):
    q, s, z = w
    k, n = q.shape
    g = k if group_size == -1 else group_size
    wq = q.astype(x.dtype).reshape(k // g, g, n)
    if z is not None:
      wq = wq - z.astype(x.dtype)[:, None, :]
    return x @ (wq * s[:, None, :]).reshape(k, n)
  return op


def bench_row(k, n, m, dtype, group_size, symmetric, ceilings, key, packing="auto", timing="gpu"):
  copy_tbps, tflops = ceilings
  g = k if group_size == -1 else group_size
  int4_bytes = k * n // 2 + (k // g) * n * (2 + (0 if symmetric else 0.5))
  dense_bytes = k * n * 2
  r_int4 = max(8, min(48, math.ceil(2 * L2_BYTES / int4_bytes) + 1))
  r_dense = max(8, min(48, math.ceil(2 * L2_BYTES / dense_bytes) + 1))
  sets = [make_quantized(jax.random.fold_in(key, i), k, n, group_size, dtype, symmetric) for i in range(r_int4)]
  x = jax.random.normal(jax.random.fold_in(key, 999), (m, k), dtype)

  packing = resolve_packing(packing, k, g)
  ours_sets = sets if packing == "gptq" else [(to_fragment_packed(qw), s, qz) for qw, s, qz in sets]

  # correctness first: the op (on its packing) against the reference on the first weight set
  qw, s, qz = sets[0]
  got = jax.jit(lambda x: w4a16_matmul(x, ours_sets[0][0], s, qz, group_size=group_size, packing=packing))(x)
  ref = jax.jit(lambda x: w4a16_matmul_reference(x, qw, s, qz, group_size=group_size))(x)
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
  if not rel < 1e-2:
    raise AssertionError(f"K={k} N={n} M={m} {dtype.__name__}: relative error {rel:.2e} against the reference")

  moved = int4_bytes + 2 * m * (k + n)
  floor_us = max(moved / (copy_tbps * 1e12), 2 * m * n * k / (tflops * 1e12)) * 1e6
  op = lambda x, w: w4a16_matmul(x, *w, group_size=group_size, packing=packing)  # noqa: E731
  def both(op, sets):  # (the run's figure, wall clock): with GPU timing the wall-clock figure goes beside it
    many = _many(op)  # one jitted function (one compile) for both figures
    if timing != "gpu":
      return per_op_wall_us(op, x, sets, many=many), None
    return per_op_us(op, x, sets, many=many), per_op_wall_us(op, x, sets, many=many)

  ours, ours_wall = both(op, ours_sets)
  del ours_sets
  int4_sets = [xla_int4_weights(*w, group_size) for w in sets]
  del sets
  xla_int4, xla_int4_wall = both(xla_int4_op(group_size), int4_sets)
  del int4_sets
  dense_sets = [jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), dtype) for i in range(r_dense)]
  xla_bf16, xla_bf16_wall = both(lambda x, w: x @ w, dense_sets)
  del dense_sets
  row = dict(K=k, N=n, M=m, dtype=jnp.dtype(dtype).name, group_size=group_size, symmetric=symmetric, packing=packing,
             us=ours, xla_bf16_us=xla_bf16, xla_int4_us=xla_int4, floor_us=floor_us, rel_err=rel,
             weight_GBps=int4_bytes / (ours * 1e-6) / 1e9 if ours > 0 else float("nan"),
             below_floor=ours < floor_us, timing=timing)
  if timing == "gpu":
    row.update(wall_us=ours_wall, xla_bf16_wall_us=xla_bf16_wall, xla_int4_wall_us=xla_int4_wall)
  return row


def plan(quick: bool, part: str = "all"):
  rows = []
  shapes = list(SHAPES.values())
  ms = (1, 16, 256, 2048) if quick else MS
  if part in ("all", "main"):
    for k, n in (shapes[:2] if quick else shapes):
      for m in ms:
        rows.append((k, n, m, jnp.bfloat16, 128, True))
  if not quick and part in ("all", "extras"):
    for k, n in shapes[:3]:
      for m in (1, 16, 256, 2048):
        rows.append((k, n, m, jnp.float16, 128, True))
        rows.append((k, n, m, jnp.bfloat16, -1, True))
        rows.append((k, n, m, jnp.bfloat16, 32, True))
        rows.append((k, n, m, jnp.bfloat16, 128, False))
  return rows


def markdown(result) -> str:
  gpu = result.get("timing") == "gpu"
  how = ("GPU time in microseconds (device events of a profiler trace, median of 10 calls, L2-rotated); the wall "
         "columns are (t_R - t_1) / (R - 1) of host time" if gpu else
         "Times in microseconds (wall clock, (t_R - t_1) / (R - 1) of medians, L2-rotated)")
  lines = [f"# W4A16 GEMM on {result['card']} ({result['date']})", "",
           f"jax {result['versions']['jax']}, triton {result['versions']['triton']}, "
           f"jax-triton {result['versions']['jax_triton']}; copy {result['copy_TBps']:.2f} TB/s, "
           f"bf16 matmul {result['bf16_TFLOPs']:.0f} TFLOP/s. {how}.", ""]
  if result.get("runs"):
    runs = result["runs"]
    lines += [f"Merged from {len(runs)} runs ({', '.join(r['file'] for r in runs)}): copy "
              f"{min(r['copy_TBps'] for r in runs):.2f} - {max(r['copy_TBps'] for r in runs):.2f} TB/s, matmul "
              f"{min(r['bf16_TFLOPs'] for r in runs):.0f} - {max(r['bf16_TFLOPs'] for r in runs):.0f} TFLOP/s "
              "(medians above); each row's floor uses its own run's ceilings.", ""]
  lines += ["| K | N | M | dtype | G | sym | packing | jw4a16 | XLA bf16 | XLA int4 | floor | floor/jw4a16 | vs bf16 "
            "| vs int4 |" + (" jw4a16 wall | XLA bf16 wall |" if gpu else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]
  noisy = False
  for r in result["rows"]:
    if r.get("below_floor", r["us"] < r["floor_us"]):  # older results files lack the flag
      noisy = True
      ours, ratios = f"{r['us']:.1f} (below the floor{'' if gpu else ': noise'})", "- | - | -"
    else:
      ours = f"{r['us']:.1f}"
      ratios = (f"{r['floor_us'] / r['us']:.2f} | {r['xla_bf16_us'] / r['us']:.2f}x | "
                f"{r['xla_int4_us'] / r['us']:.2f}x")
    wall = f" {r['wall_us']:.1f} | {r['xla_bf16_wall_us']:.1f} |" if gpu else ""
    lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['dtype']} | {r['group_size']} | {r['symmetric']} | "
                 f"{r.get('packing', 'gptq')} | "
                 f"{ours} | {r['xla_bf16_us']:.1f} | {r['xla_int4_us']:.1f} | {r['floor_us']:.1f} | {ratios} |{wall}")
  if noisy:
    lines += ["", "Below the floor: no kernel can be that fast. " + (
        "The ceilings were measured low in this run." if gpu else
        "The harness's (t_R - t_1) / (R - 1) was decided by host-side noise (re-measured once with 100 "
        "repetitions first). Read the kernel's time from a profile (scripts/profile_step.py op) instead.")]
  return "\n".join(lines) + "\n"


def plot(result, path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(8, 5))
  for name, (k, n) in SHAPES.items():
    rows = [r for r in result["rows"] if (r["K"], r["N"]) == (k, n) and r["dtype"] == "bfloat16"
            and r["group_size"] == 128 and r["symmetric"]]
    if rows:
      ax.plot([r["M"] for r in rows], [r["xla_bf16_us"] / r["us"] for r in rows], marker="o",
              label=f"{name} ({k}x{n})")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("M (tokens)")
  ax.set_ylabel("speedup over XLA bf16 dense")
  ax.set_title(f"jw4a16 W4A16, group 128, bf16, {result['card']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def versions() -> dict:
  import triton  # noqa: PLC0415

  try:
    import jax_triton  # noqa: PLC0415
    jt = jax_triton.__version__
  except ImportError:
    jt = None
  return dict(jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
              triton=triton.__version__, jax_triton=jt, python=platform.python_version())


def main(argv=None):
  p = argparse.ArgumentParser(prog="jw4a16 bench", description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a few rows only")
  p.add_argument("--out", default="benchmarks/results", help="folder for <card>.json/.md/.png")
  p.add_argument("--plot", metavar="JSON", help="only redraw the plot of an existing results file")
  p.add_argument("--merge", nargs="+", metavar="JSON",
                 help="only merge results files of one card (runs split by shape or M) into --out/--name")
  p.add_argument("--shapes", default=None, help="comma list of KxN to restrict to")
  p.add_argument("--part", default="all", choices=("all", "main", "extras"),
                 help="main: bf16 group 128 on every shape and M; extras: fp16, group -1 and 32, asymmetric")
  p.add_argument("--name", default=None, help="results file stem (default: the card)")
  p.add_argument("--ms", default=None, help="comma list of M to restrict to")
  p.add_argument("--packing", default="auto", choices=("auto", "gptq", "fragment"),
                 help="jw4a16's weight layout (default: what the loaders pick on this card)")
  p.add_argument("--timing", default="auto", choices=TIMINGS,
                 help="gpu: profiler device time; wall: (t_R - t_1) / (R - 1) of host time; auto: gpu where the "
                      "profiler gives device events, else wall")
  a = p.parse_args(argv)
  if a.plot:
    result = json.loads(pathlib.Path(a.plot).read_text())
    plot(result, pathlib.Path(a.plot).with_suffix(".png"))
    return
  if a.merge:
    result = merge([json.loads(pathlib.Path(f).read_text()) for f in a.merge], [pathlib.Path(f).name for f in a.merge])
    write_results(result, pathlib.Path(a.out), a.name or result["card"])
    return
  if resolve_backend() != "triton":
    raise SystemExit("the benchmark needs a GPU with jax-triton (the Triton path); this machine takes the "
                     "reference path")
  dev = jax.devices()[0]
  card = current_target().name
  timing, why = resolve_timing(a.timing)
  print(f"timing: {timing} ({why})", flush=True)
  ceilings = measure_ceilings(timing)
  print(f"{dev.device_kind}: copy {ceilings[0]:.2f} TB/s, bf16 matmul {ceilings[1]:.0f} TFLOP/s", flush=True)
  rows = plan(a.quick, a.part)
  if a.shapes:
    keep = {tuple(map(int, s.split("x"))) for s in a.shapes.split(",")}
    rows = [r for r in rows if (r[0], r[1]) in keep]
  if a.ms:
    rows = [r for r in rows if r[2] in set(map(int, a.ms.split(",")))]
  key = jax.random.key(0)
  out_rows = []
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = a.name or card
  result = dict(card=card, device_kind=dev.device_kind, versions=versions(),
                date=datetime.date.today().isoformat(), copy_TBps=ceilings[0], bf16_TFLOPs=ceilings[1],
                timing=timing, rows=out_rows)
  for i, (k, n, m, dtype, g, sym) in enumerate(rows):
    r = bench_row(k, n, m, dtype, g, sym, ceilings, jax.random.fold_in(key, i), a.packing, timing)
    out_rows.append(r)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))  # after every row: a cut run keeps its rows
    print(f"K={k:6d} N={n:6d} M={m:5d} {r['dtype']:8s} G={g:4d} {'sym ' if sym else 'asym'} {r['packing']:8s} "
          f"jw4a16 {r['us']:8.1f} us | bf16 {r['xla_bf16_us']:8.1f} | int4 {r['xla_int4_us']:8.1f} | "
          f"floor {r['floor_us']:7.1f} | {r['floor_us'] / r['us']:4.2f} of floor"
          f"{' (below the floor)' if r['below_floor'] else ''} | "
          f"{r['xla_bf16_us'] / r['us']:5.2f}x bf16"
          + (f" | wall {r['wall_us']:.1f} / bf16 {r['xla_bf16_wall_us']:.1f}" if timing == "gpu" else ""), flush=True)
  write_results(result, out, stem)


def write_results(result, out: pathlib.Path, stem: str):
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
  (out / f"{stem}.md").write_text(markdown(result))
  try:
    plot(result, out / f"{stem}.png")
  except ImportError:
    print("matplotlib missing: run `python -m jw4a16.bench --plot` on the JSON to draw the PNG")
  print(markdown(result))


def merge(results: list[dict], names: list[str]) -> dict:
  """One results dict from runs of the same card, timing and versions: rows in the benchmark's order (shape, M,
  then the extras), each keeping the floor of its own run; the top-level ceilings are the runs' medians and
  `runs` lists each run's."""
  for key in ("card", "versions", "timing"):
    seen = {json.dumps(r.get(key), sort_keys=True) for r in results}
    if len(seen) > 1:
      raise ValueError(f"--merge: the files differ in {key!r}: {sorted(seen)}")
  order = {kn: i for i, kn in enumerate(SHAPES.values())}
  rows = [row for r in results for row in r["rows"]]
  rows.sort(key=lambda row: (row["dtype"] != "bfloat16" or row["group_size"] != 128 or not row["symmetric"],
                             order.get((row["K"], row["N"]), len(order)), row["K"], row["N"], row["M"], row["dtype"],
                             row["group_size"], not row["symmetric"]))
  first = results[0]
  return dict(card=first["card"], device_kind=first.get("device_kind"), versions=first["versions"],
              date=max(r["date"] for r in results), timing=first.get("timing"),
              copy_TBps=statistics.median(r["copy_TBps"] for r in results),
              bf16_TFLOPs=statistics.median(r["bf16_TFLOPs"] for r in results),
              runs=[dict(file=name, date=r["date"], copy_TBps=r["copy_TBps"], bf16_TFLOPs=r["bf16_TFLOPs"],
                         rows=len(r["rows"])) for name, r in zip(names, results)],
              rows=rows)


def tune_main(argv=None):
  """`jw4a16 tune --shapes KxN[,KxN] --ms 1,16,64`: times candidate tile configs through the JAX path on this GPU
  and records the fastest per (M bucket, K, N, group, dtype, symmetry) in the on-disk cache, which
  select_config reads before the shipped table (so a restarted process reuses it without tuning)."""
  import random  # noqa: PLC0415

  from jw4a16 import tuning  # noqa: PLC0415

  p = argparse.ArgumentParser(prog="jw4a16 tune")
  p.add_argument("--shapes", required=True)
  p.add_argument("--ms", default="1,2,4,8,16,32,64,128,256")
  p.add_argument("--group", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
  p.add_argument("--asym", action="store_true")
  p.add_argument("--max-configs", type=int, default=24)
  p.add_argument("--packing", default="auto", choices=("auto", "gptq", "fragment"),
                 help="the weight layout to tune for (default: what the loaders pick on this card)")
  a = p.parse_args(argv)
  if resolve_backend() != "triton":
    raise SystemExit("tuning needs a GPU with jax-triton")
  target = current_target()
  timing, why = resolve_timing("auto")
  print(f"timing: {timing} ({why})", flush=True)
  dtype = jnp.dtype(a.dtype)
  found = {}
  for shape in a.shapes.split(","):
    k, n = map(int, shape.split("x"))
    g = k if a.group == -1 else a.group
    packing = resolve_packing(a.packing, k, g)
    sets = [make_quantized(jax.random.key(i), k, n, a.group, dtype, not a.asym)
            for i in range(max(8, math.ceil(2 * L2_BYTES / (k * n / 2)) + 1))]
    if packing == "fragment":
      sets = [(to_fragment_packed(qw), s, qz) for qw, s, qz in sets]
    for m in map(int, a.ms.split(",")):
      x = jax.random.normal(jax.random.key(99), (m, k), dtype)
      cands = (tuning.frag_candidates if packing == "fragment" else tuning.candidate_configs)(m, k, n, g, target)
      cands = random.Random(m).sample(cands, min(a.max_configs, len(cands)))
      cands.insert(0, tuning.select_config(m, k, n, g, a.dtype, a.asym, target, packing))
      best = None
      for cfg in cands:
        try:
          us = op_us(timing, lambda x, w, cfg=cfg: w4a16_matmul(x, *w, group_size=a.group, config=cfg,
                                                                packing=packing), x, sets)
        except Exception as e:  # a config that fails to compile on this GPU is skipped
          print(f"  skip {cfg}: {type(e).__name__}")
          continue
        if best is None or us < best[0]:
          best = (us, cfg)
      key = tuning.table_key(m, k, n, g, a.dtype, a.asym, packing)
      found[key] = best[1]
      print(f"K={k} N={n} M={m}: {best[0]:.1f} us with {best[1]}", flush=True)
  print(f"recorded {len(found)} entries in {tuning.record_tuned(target.name, found)}")


if __name__ == "__main__":
  main()
