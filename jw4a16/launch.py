"""How the Triton kernels are launched from XLA: jax-triton's custom call, or the same kernel as an FFI call.

jax-triton 0.3.1 lowers `triton_call` to the legacy custom call `triton_kernel_call` (api_version 2).  XLA's
command buffers (CUDA graphs) capture fusions and FFI handlers marked command-buffer compatible, never legacy
custom calls, so every legacy Triton launch goes out from the host and cuts the graphs around it into pieces: the
Llama-3-8B decode step was bound by the host for it (docs/performance.md, session 3).  jaxlib after 0.10.2 also
registers `triton_kernel_call_ffi`: the same launcher (the same zlib-compressed kernel-call proto, as attribute
`opaque`) as an FFI handler with the kCmdBufferCompatible trait; JAX's Pallas Triton backend emits it.

`ffi_triton_call` takes `jax_triton.triton_call`'s arguments and lowers through jax-triton's own lowering (same
compilation, same proto, same kernel binary), then retargets the emitted custom call to the FFI handler, so XLA
records the launches into its graphs.  Every jw4a16 launch takes `triton_call_for(resolve_launcher())`: this for
"ffi" (CUDA; on ROCm the call stays jax-triton's, untested with the FFI handler), `jax_triton.triton_call` itself
for the default, "legacy".
Measured on H100 (docs/performance.md): in session 5 "ffi" was not faster (the decode step, ~700 graph nodes,
became one graph whose cuGraphLaunch took 2.8 ms of host time).  In session 14, with 263 launches a step, the
pipelined decode loop ran at 360 tokens/s with "ffi" against 288 - 335 with "legacy", while a step the host waits
for and a 128-token prefill ran slower with "ffi".  So the Llama model traces its pipelined decode step with
"ffi" on NVIDIA (`use_launcher`, `decode_launcher`) and everything else with "legacy".  $JW4A16_LAUNCHER, when set, wins
over both.  The choice is read when a function is traced (jax caches the trace), so set it before the first call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import jax
from jax import tree_util
from jax.interpreters import mlir

LAUNCHERS = ("legacy", "ffi")
LAUNCHER_ENV = "JW4A16_LAUNCHER"
FFI_TARGET = "triton_kernel_call_ffi"
LEGACY_TARGET = "triton_kernel_call"


_SCOPED = contextvars.ContextVar("jw4a16_launcher", default=None)


def resolve_launcher() -> str:
  """'legacy' or 'ffi': $JW4A16_LAUNCHER when set, else the innermost `use_launcher`, else 'legacy'."""
  choice = os.environ.get(LAUNCHER_ENV) or _SCOPED.get() or "legacy"
  if choice not in LAUNCHERS:
    raise ValueError(f"${LAUNCHER_ENV}={choice!r} must be one of {LAUNCHERS}")
  return choice


def triton_call_for(launcher: str):
  """`jax_triton.triton_call` for "legacy", `ffi_triton_call` (same arguments) for "ffi"."""
  if launcher == "ffi":
    return ffi_triton_call
  import jax_triton as jt  # noqa: PLC0415 - lazily: fails on CPU-only JAX

  return jt.triton_call


def decode_launcher(device=None) -> str:
  """The launcher the Llama model traces its pipelined decode step with: "ffi" on an NVIDIA GPU (faster there,
  session 14), "legacy" elsewhere (on ROCm the FFI handler is untested, so the kernels launch as they always did;
  on the CPU no kernel launches)."""
  from jw4a16 import tuning  # noqa: PLC0415

  device = device or jax.devices()[0]
  if device.platform not in ("gpu", "cuda") or tuning.target_from_device(device).warp_size != 32:
    return "legacy"
  return "ffi"


@contextlib.contextmanager
def use_launcher(name: str):
  """Functions traced inside launch their Triton kernels with `name` (unless $JW4A16_LAUNCHER says otherwise)."""
  if name not in LAUNCHERS:
    raise ValueError(f"launcher={name!r} must be one of {LAUNCHERS}")
  token = _SCOPED.set(name)
  try:
    yield
  finally:
    _SCOPED.reset(token)


def retarget_to_ffi(op) -> None:
  """Turns jax-triton's legacy `triton_kernel_call` (backend_config = the compressed proto) into the FFI call."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415

  name = ir.StringAttr(op.attributes["call_target_name"]).value
  if name == FFI_TARGET:  # a jax-triton that already emits the FFI call
    return
  if name != LEGACY_TARGET:
    raise RuntimeError(f"jax-triton emitted custom call {name!r}; expected {LEGACY_TARGET!r} or {FFI_TARGET!r}")
  opaque = ir.StringAttr(op.attributes["backend_config"]).value_bytes
  with op.context:
    op.attributes["call_target_name"] = ir.StringAttr.get(FFI_TARGET)
    op.attributes["api_version"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 4)
    op.attributes["backend_config"] = ir.DictAttr.get({"opaque": ir.StringAttr.get(opaque)})


@functools.cache
def _primitive():
  """A primitive with jax-triton's parameters and abstract eval, lowered by jax-triton and then, on CUDA,
  retargeted to the FFI call."""
  import jax.extend as jex  # noqa: PLC0415
  from jax.interpreters import xla  # noqa: PLC0415
  from jax_triton import triton_lib as jtl  # noqa: PLC0415 - lazily: needs a GPU jaxlib

  prim = jex.core.Primitive("jw4a16_triton_kernel_call")
  prim.multiple_results = True
  prim.def_impl(functools.partial(xla.apply_primitive, prim))
  prim.def_abstract_eval(jtl.triton_kernel_call_abstract_eval)

  def lowering(backend_init, ctx, *args, **params):
    results = jtl.triton_kernel_call_lowering(backend_init, ctx, *args, **params)
    if backend_init is jtl.get_cuda_backend:
      retarget_to_ffi(results[0].owner)
    return results

  mlir.register_lowering(prim, functools.partial(lowering, jtl.get_cuda_backend), platform="cuda")
  mlir.register_lowering(prim, functools.partial(lowering, jtl.get_hip_backend), platform="rocm")
  return prim


def ffi_triton_call(*args, kernel, out_shape, grid, name: str = "", num_warps: int | None = None,
                    num_stages: int | None = None, zeroed_outputs=(), input_output_aliases=None, **metaparams):
  """`jax_triton.triton_call` (same arguments: arrays, then Python scalars; out_shape a sequence of
  ShapeDtypeStructs; constexprs as keywords), launched through jaxlib's FFI Triton target on CUDA.  Returns the
  list of outputs."""
  from jax_triton import triton_lib as jtl  # noqa: PLC0415

  array_args, scalar_args = [], []
  for i, arg in enumerate(args):
    if isinstance(arg, (bool, int, float)):
      scalar_args.append((i, jtl.get_triton_type(arg), arg))
    else:
      array_args.append(arg)
  flat_out, out_tree = tree_util.tree_flatten(
      tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), list(out_shape)))
  out = _primitive().bind(
      *array_args, fn=kernel, scalar_args=tuple(scalar_args), name=name, custom_call_target_name=LEGACY_TARGET,
      out_shapes=tuple(flat_out), grid=grid, num_warps=num_warps, num_stages=num_stages, num_ctas=1,
      compute_capability=None, enable_fp_fusion=True,
      input_output_aliases=tuple((input_output_aliases or {}).items()), zeroed_outputs=zeroed_outputs,
      debug=False, serialized_metadata=b"", **metaparams)
  return tree_util.tree_unflatten(out_tree, out)
