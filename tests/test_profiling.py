"""jw4a16.profiling: GPU time per call from a profiler trace (the benchmark's figure)."""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from jw4a16 import profiling


def _ev(name, ts, dur, pid):
  return dict(name=name, ts=ts, dur=dur, pid=pid, ph="X")


def test_steps_device_us_assigns_events_to_the_step_that_started_them():
  host = [_ev(f"{profiling.STEP_PREFIX}{i}", 1000.0 * i, 400.0, 1) for i in range(3)]
  device = [_ev("k", 100.0, 50.0, 2), _ev("k", 140.0, 30.0, 2),  # overlapping: the union, 70
            _ev("k", 1200.0, 10.0, 2), _ev("memset", 1900.0, 5.0, 2),  # step 1, the last one after its host end
            _ev("k", 2100.0, 7.0, 2)]
  trace = profiling.Trace(device=device, host=host, device_lines=["/device:GPU:0"])
  assert profiling.steps_device_us(trace, 3) == [70.0, 15.0, 7.0]
  with pytest.raises(RuntimeError, match="3 of the 4 step annotations"):
    profiling.steps_device_us(trace, 4)
  with pytest.raises(RuntimeError, match="no device events"):
    profiling.steps_device_us(profiling.Trace(device=[], host=host, device_lines=[]), 3)


def test_device_us_per_step_traces_annotated_calls():
  """On this CPU machine the real profiler run finds the step annotations and, with no GPU lines, says so."""
  f = jax.jit(lambda x: x * 2)
  with pytest.raises(RuntimeError, match="no device events") if jax.default_backend() == "cpu" \
      else contextlib.nullcontext():
    profiling.device_us_per_step(f, (jnp.ones(8),), steps=3)


def test_intervals_union():
  assert profiling.intervals_union([(0, 10), (5, 20), (30, 31)]) == 21
  assert profiling.intervals_union([]) == 0


def test_bench_timing_falls_back_to_wall_clock_without_device_events():
  """`jw4a16 bench --timing auto` takes GPU time only where the profiler gives device events (not on this CPU)."""
  from jw4a16 import bench  # noqa: PLC0415

  timing, why = bench.resolve_timing("auto")
  if jax.default_backend() == "cpu":
    assert timing == "wall" and "no device events" in why
  assert bench.resolve_timing("wall")[0] == "wall" and bench.resolve_timing("gpu")[0] == "gpu"
  with pytest.raises(ValueError, match="timing='fast' must be one of"):
    bench.resolve_timing("fast")
