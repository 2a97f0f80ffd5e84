"""Launching a jw4a16 kernel as an XLA custom call that CUDA graphs can capture (CUDA only, opt-in).

Why: jax-triton 0.3.1 lowers `triton_call` to a legacy custom call (api_version 2).  XLA's command buffers (CUDA
graphs) capture only FFI handlers that declare themselves command-buffer compatible, so every Triton launch in
a jitted step is a host launch of its own, and it also cuts the graphs of the XLA ops around it in two.  A
Llama-3-8B decode step is host-bound because of it (docs/performance.md, session 3: 5.56 ms wall against
3.85 ms of GPU work, 128 Triton launches and 128 memsets per token).

How: the kernel is compiled with `triton.compile` for the device's compute capability (the same signature,
constexprs and 16-byte alignment that jax-triton gives it, kernels/compile.py), its cubin loaded into every
local GPU's primary context (the one XLA uses), and launched with the CUDA driver API from a
`jax.experimental.buffer_callback` marked command_buffer_compatible.  XLA runs the Python callback when it records
the command buffer, under stream capture, and replays the recorded launch afterwards; it records again when a
buffer the command uses moves.  Where XLA does not capture the call (command buffers off, or a construct it does
not capture), the callback runs on every execution: correct, with Python's cost per launch.

Select it with `launcher="graph"` on `w4a16_matmul` or JW4A16_LAUNCHER=graph; "jax-triton" stays the default.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re

import jax
import numpy as np

from jw4a16 import tuning

LAUNCHERS = ("jax-triton", "graph")
LAUNCHER_ENV = "JW4A16_LAUNCHER"
_MAX_STATIC_SHARED = 48 * 1024
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
callback_runs = [0]  # how many times a launch callback ran in this process (tests check what XLA replays)


@functools.lru_cache(maxsize=1)
def _libcuda():
  lib = ctypes.CDLL("libcuda.so.1")
  vp, u32, i32 = ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
  sigs = {
      "cuGetErrorName": [i32, ctypes.POINTER(ctypes.c_char_p)],
      "cuDeviceGet": [ctypes.POINTER(i32), i32],
      "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), i32],
      "cuCtxPushCurrent_v2": [vp],
      "cuCtxPopCurrent_v2": [ctypes.POINTER(vp)],
      "cuCtxGetDevice": [ctypes.POINTER(i32)],
      "cuModuleLoadData": [ctypes.POINTER(vp), ctypes.c_char_p],
      "cuModuleGetFunction": [ctypes.POINTER(vp), vp, ctypes.c_char_p],
      "cuFuncSetAttribute": [vp, i32, i32],
      "cuMemsetD32Async": [ctypes.c_uint64, u32, ctypes.c_size_t, vp],
      "cuLaunchKernel": [vp, u32, u32, u32, u32, u32, u32, u32, vp, ctypes.POINTER(vp), ctypes.POINTER(vp)],
  }
  for name, argtypes in sigs.items():
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = argtypes, i32
  return lib


def _check(res: int, what: str) -> None:
  if res != 0:
    name = ctypes.c_char_p()
    _libcuda().cuGetErrorName(res, ctypes.byref(name))
    raise RuntimeError(f"jw4a16 graph launcher: {what} failed with {name.value.decode() if name.value else res}")


@dataclasses.dataclass(frozen=True)
class _Loaded:
  functions: dict  # CUDA device ordinal -> CUfunction handle (int)
  shared: int
  threads: int
  n_params: int  # the kernel's parameters in the PTX, trailing scratch pointers included
  m_param: bool  # M is a runtime parameter (not a constexpr 1)


def _ptx_param_count(ptx: str, name: str) -> int:
  entry = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
  if entry is None:
    raise RuntimeError(f"jw4a16 graph launcher: no .entry {name} in the PTX")
  return entry.group(1).count(".param")


@functools.lru_cache(maxsize=None)
def _load(kernel: str, arch: int, dtype: str, m_is_one: bool, n: int, k: int, group_size: int, has_zp: bool,
          zp_bias: int, meta: tuple, num_warps: int, num_stages: int) -> _Loaded:
  """Compiles the kernel for sm_{arch} and loads it on every local CUDA device."""
  from jw4a16.kernels.compile import compile_kernel  # noqa: PLC0415 - needs triton: only on the GPU path

  # Importing jax_triton sets TRITON_CACHE_DIR="" for the process, and triton.compile needs a cache: ours is
  # on disk, so a new process finds these kernels compiled.
  saved = os.environ.get("TRITON_CACHE_DIR")
  os.environ["TRITON_CACHE_DIR"] = str(tuning.cache_root() / "triton")
  try:
    compiled = compile_kernel(f"sm{arch}", dict(meta), n=n, k=k, group_size=group_size, dtype=dtype,
                              has_zp=has_zp, zp_bias=zp_bias, num_warps=num_warps, num_stages=num_stages,
                              kernel=kernel, m_is_one=m_is_one)
  finally:
    if saved is None:
      del os.environ["TRITON_CACHE_DIR"]
    else:
      os.environ["TRITON_CACHE_DIR"] = saved
  md = compiled.metadata
  if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
    raise RuntimeError(f"jw4a16 graph launcher: kernel {md.name} needs Triton scratch memory, which it does not "
                       "allocate; use launcher='jax-triton'")
  cu = _libcuda()
  image = compiled.asm["cubin"]
  functions = {}
  for device in jax.local_devices(backend="gpu"):
    ordinal = device.local_hardware_id
    dev, ctx, module, fn = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(cu.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
    _check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(cu.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
      _check(cu.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
      _check(cu.cuModuleGetFunction(ctypes.byref(fn), module, md.name.encode()), "cuModuleGetFunction")
      if md.shared > _MAX_STATIC_SHARED:
        _check(cu.cuFuncSetAttribute(fn, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, md.shared),
               "cuFuncSetAttribute")
    finally:
      _check(cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")
    functions[ordinal] = fn.value
  return _Loaded(functions, md.shared, num_warps * 32, _ptx_param_count(compiled.asm["ptx"], md.name),
                 not m_is_one)


def _ptr(buf) -> int:
  return buf.__cuda_array_interface__["data"][0]


def launch(x2d, qweight, scales, qzeros, *, kernel: str, grid: tuple[int, int], out_shapes, zero_counters: bool,
           constexprs: dict, num_warps: int, num_stages: int):
  """The same launch as ops' jax_triton.triton_call, as a command-buffer-compatible custom call.

  Arguments are those of the kernel (x2d [M, K], qweight, scales, qzeros or scales as a stand-in); out_shapes the
  three outputs (out, fp32 partials, int32 counters).  zero_counters: the counters are memset on the stream first
  (recorded into the graph with the launch).
  """
  from jax.experimental.buffer_callback import buffer_callback  # noqa: PLC0415

  m = x2d.shape[0]
  arch = int(str(jax.devices()[0].compute_capability).replace(".", ""))
  c = dict(constexprs)
  loaded = _load(kernel, arch, np.dtype(x2d.dtype).name, m == 1, c.pop("N"), c.pop("K"), c.pop("GROUP_SIZE"),
                 bool(c.pop("HAS_ZP")), c.pop("ZP_BIAS"), tuple(sorted(c.items())), num_warps, num_stages)
  n_counters = int(np.prod(out_shapes[2].shape))

  def callback(ctx, outs, x, qw, s, qz):
    callback_runs[0] += 1
    cu = _libcuda()
    stream = ctypes.c_void_p(ctx.stream)
    out, partials, counters = outs
    if zero_counters:
      _check(cu.cuMemsetD32Async(_ptr(counters), 0, n_counters, stream), "cuMemsetD32Async")
    values = [ctypes.c_uint64(_ptr(b)) for b in (x, qw, s, qz)]
    if loaded.m_param:
      values.append(ctypes.c_int32(m))
    values += [ctypes.c_uint64(_ptr(b)) for b in (out, partials, counters)]
    values += [ctypes.c_uint64(0)] * (loaded.n_params - len(values))  # Triton's unused scratch pointers
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    device = ctypes.c_int()
    _check(cu.cuCtxGetDevice(ctypes.byref(device)), "cuCtxGetDevice")  # XLA made the executing GPU's current
    _check(cu.cuLaunchKernel(loaded.functions[device.value], grid[0], grid[1], 1, loaded.threads, 1, 1,
                             loaded.shared, stream, params, None), "cuLaunchKernel")

  call = buffer_callback(callback, tuple(out_shapes), command_buffer_compatible=True)
  return call(x2d, qweight, scales, qzeros)
