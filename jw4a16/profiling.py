"""GPU time of jitted calls from a jax.profiler trace: what the device spent in the call's kernels, memsets and
copies, free of the host's dispatch (the benchmark's primary figure, `jw4a16.bench`; `scripts/profile_step.py`).

Why not wall time alone: a jitted call that launches R Triton kernels through jax-triton's custom call spends
~15 us of host time per launch and ~100 - 300 us before the first kernel starts (profile of 8192x57344, M = 1,
session 10), and the wall-clock difference (t_R - t_1) / (R - 1) then moved with R by more than the kernel's own
variation (116 - 190 us for a kernel the trace shows at 97 - 99 us back to back).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import statistics
import tempfile

import jax

STEP_PREFIX = "jw4a16_step_"


@dataclasses.dataclass
class Trace:
  device: list[dict]  # complete ("X") events on the GPU lines: kernels, memsets, copies
  host: list[dict]  # complete events on every other line
  device_lines: list[str]


def load_trace(trace_dir: str) -> Trace:
  """The newest perfetto trace under `trace_dir` (jax.profiler.trace(..., create_perfetto_trace=True))."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir!r}")
  with gzip.open(paths[-1]) as f:
    d = json.load(f)
  events = d["traceEvents"] if isinstance(d, dict) else d
  names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {p for p, n in names.items() if "GPU" in n or ("device" in n.lower() and "CPU" not in n)}
  complete = [e for e in events if e.get("ph") == "X"]
  return Trace(device=[e for e in complete if e["pid"] in gpu], host=[e for e in complete if e["pid"] not in gpu],
               device_lines=sorted(names[p] for p in gpu))


def intervals_union(iv) -> float:
  """Total length covered by the (start, end) intervals."""
  total, end = 0.0, -1e30
  for s, e in sorted(iv):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def device_us_per_step(fn, args, steps: int = 10, warmup: int = 2) -> list[float]:
  """Runs fn(*args) `steps` times under the profiler, each call finished before the next, and returns per call
  the GPU time in microseconds: the union of the device events that started inside its host annotation and
  before the next call began."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for i in range(steps):
        with jax.profiler.TraceAnnotation(f"{STEP_PREFIX}{i}"):
          jax.block_until_ready(fn(*args))
    return steps_device_us(load_trace(d), steps)


def steps_device_us(trace: Trace, steps: int) -> list[float]:
  """Per annotated step of `trace` (device_us_per_step), the union of the device events it started."""
  starts = sorted(e["ts"] for e in trace.host if e["name"].startswith(STEP_PREFIX))
  if len(starts) != steps:
    raise RuntimeError(f"the trace holds {len(starts)} of the {steps} step annotations")
  bounds = starts[1:] + [float("inf")]
  per_step = [intervals_union([(e["ts"], e["ts"] + e["dur"]) for e in trace.device if s <= e["ts"] < b])
              for s, b in zip(starts, bounds)]
  if not any(per_step):
    raise RuntimeError(f"the trace holds no device events (lines: {trace.device_lines}); is this a GPU?")
  return per_step


def device_us(fn, args, steps: int = 10) -> float:
  """Median over `steps` calls of the GPU time of fn(*args), in microseconds."""
  return statistics.median(device_us_per_step(fn, args, steps))


def _tally(events, steps: int, top: int) -> list[tuple[str, float, float]]:
  """(name, count per step, us per step) of the `top` names with the most time."""
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    by_name[e["name"]][0] += 1
    by_name[e["name"]][1] += e["dur"]
  return [(n[:90], c / steps, s / steps) for n, (c, s) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]


def summarize(trace_dir: str, steps: int, top: int = 12) -> dict:
  """Per-step totals of a traced run and its busiest device and host events by name."""
  t = load_trace(trace_dir)
  busy = intervals_union([(e["ts"], e["ts"] + e["dur"]) for e in t.device]) / steps
  return {"gpu_processes": t.device_lines,
          "gpu_busy_us_per_step": busy, "kernel_sum_us_per_step": sum(e["dur"] for e in t.device) / steps,
          "kernels_per_step": len(t.device) / steps,
          "top_kernels": _tally(t.device, steps, top), "top_host": _tally(t.host, steps, top)}
