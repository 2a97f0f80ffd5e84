"""The launcher choice and the retargeting of jax-triton's legacy custom call to jaxlib's FFI Triton handler."""

import zlib

import jax
import jax.numpy as jnp
import pytest
from jax._src.lib.mlir import ir

from jw4a16 import launch


@pytest.mark.parametrize(("env", "want"), [("ffi", "ffi"), ("legacy", "legacy"), (None, "legacy")])
def test_resolve_launcher(monkeypatch, env, want):
  if env is None:
    monkeypatch.delenv(launch.LAUNCHER_ENV, raising=False)
  else:
    monkeypatch.setenv(launch.LAUNCHER_ENV, env)
  assert launch.resolve_launcher() == want


def test_resolve_launcher_rejects_unknown(monkeypatch):
  monkeypatch.setenv(launch.LAUNCHER_ENV, "graph")
  with pytest.raises(ValueError, match=r"JW4A16_LAUNCHER='graph' must be one of \('legacy', 'ffi'\)"):
    launch.resolve_launcher()


def test_use_launcher_scopes_the_choice(monkeypatch):
  """use_launcher sets the choice inside its block (nested blocks restore the outer one); $JW4A16_LAUNCHER, when
  set, wins over it; an unknown name is refused."""
  monkeypatch.delenv(launch.LAUNCHER_ENV, raising=False)
  with launch.use_launcher("ffi"):
    assert launch.resolve_launcher() == "ffi"
    with launch.use_launcher("legacy"):
      assert launch.resolve_launcher() == "legacy"
    assert launch.resolve_launcher() == "ffi"
    monkeypatch.setenv(launch.LAUNCHER_ENV, "legacy")
    assert launch.resolve_launcher() == "legacy"
  monkeypatch.delenv(launch.LAUNCHER_ENV)
  assert launch.resolve_launcher() == "legacy"
  with pytest.raises(ValueError, match=r"launcher='graph' must be one of \('legacy', 'ffi'\)"):
    with launch.use_launcher("graph"):
      pass


class _Device:
  def __init__(self, platform, kind):
    self.platform, self.device_kind, self.core_count = platform, kind, None


@pytest.mark.parametrize(("platform", "kind", "want"), [
    ("gpu", "NVIDIA H100 80GB HBM3", "ffi"), ("cuda", "NVIDIA A100-SXM4-80GB", "ffi"),
    ("gpu", "AMD Instinct MI300X", "legacy"), ("rocm", "gfx942", "legacy"), ("cpu", "cpu", "legacy")])
def test_decode_launcher(platform, kind, want):
  """The model's decode step: the FFI launch on NVIDIA only (ROCm keeps jax-triton's custom call)."""
  assert launch.decode_launcher(_Device(platform, kind)) == want
  if jax.default_backend() == "cpu":
    assert launch.decode_launcher() == "legacy"


def _custom_calls(target: str, blob: bytes):
  """The lowered module of one legacy (api_version 2) custom call carrying `blob`, and its custom_call ops."""
  def f(x):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype), custom_call_api_version=2,
                            legacy_backend_config=blob)(x)

  module = jax.jit(f).lower(jnp.ones(4)).compiler_ir("stablehlo")
  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          if o.operation.name == "stablehlo.custom_call":
            found.append(o.operation)
          walk(o.operation)

  walk(module.operation)
  return module, found


def test_retarget_to_ffi_keeps_the_proto_bytes():
  blob = zlib.compress(bytes(range(256)) * 3)  # every byte value: the attribute must carry raw bytes
  _, (op,) = _custom_calls(launch.LEGACY_TARGET, blob)
  launch.retarget_to_ffi(op)
  assert ir.StringAttr(op.attributes["call_target_name"]).value == launch.FFI_TARGET
  assert ir.IntegerAttr(op.attributes["api_version"]).value == 4
  assert ir.StringAttr(ir.DictAttr(op.attributes["backend_config"])["opaque"]).value_bytes == blob
  launch.retarget_to_ffi(op)  # already the FFI call: left as it is
  assert ir.StringAttr(ir.DictAttr(op.attributes["backend_config"])["opaque"]).value_bytes == blob


def test_retarget_to_ffi_refuses_other_calls():
  _, (op,) = _custom_calls("my_kernel", b"x")
  with pytest.raises(RuntimeError, match="jax-triton emitted custom call 'my_kernel'"):
    launch.retarget_to_ffi(op)
