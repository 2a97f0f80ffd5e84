"""`jw4a16 doctor`: platform, devices, versions, which path w4a16_matmul takes and why, and a kernel check."""

from __future__ import annotations

import importlib.metadata as md
import platform


def _version(pkg):
  try:
    return md.version(pkg)
  except md.PackageNotFoundError:
    return "not installed"


def main():
  import jax  # noqa: PLC0415

  from jw4a16 import layout, ops, tuning  # noqa: PLC0415

  backend = jax.default_backend()
  devices = jax.devices()
  plat = {"gpu": "cuda"}.get(backend, backend)
  if backend == "gpu" and devices and "rocm" in getattr(devices[0].client, "platform_version", "").lower():
    plat = "rocm"
  print(f"platform: {plat} (jax default backend {backend!r}), python {platform.python_version()}")
  for d in devices[:8]:
    print(f"  device {d.id}: {getattr(d, 'device_kind', d.platform)}")
  for pkg in ("jax", "jaxlib", "jax-triton", "triton", "flax", "orbax-checkpoint"):
    print(f"{pkg}: {_version(pkg)}")
  reason = ops.triton_unavailable_reason(backend)
  path = ops.resolve_backend()
  print(f"w4a16_matmul path: {path}" + (f" ({reason})" if reason and path == "reference" else "") +
        (" (forced by JW4A16_BACKEND)" if path == "reference" and not reason else ""))
  if path == "triton":
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    target = tuning.target_from_device(devices[0])
    print(f"tuning target: {target.name} ({target.num_sms} SMs/CUs, warp {target.warp_size}); shipped table: "
          f"{len(tuning.shipped_table(target.name))} entries; cache {tuning.cache_path(target.name)}")
    print(f"weight packing the loaders pick here (K a multiple of 64, G one too or 32): "
          f"{ops.preferred_packing(4096, 128)}")
    k, n = 512, 256
    rng = np.random.default_rng(0)
    qw = jnp.asarray(rng.integers(-2**31, 2**31 - 1, (k, n // 8)), jnp.int32)
    s = jnp.asarray(rng.random((k // 128, n)) * 0.01, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16)
    ref = ops.w4a16_matmul(x, qw, s, group_size=128, backend="reference")
    for packing, w in (("gptq", qw), ("fragment", layout.to_fragment_packed(qw))):
      try:
        got = ops.w4a16_matmul(x, w, s, group_size=128, packing=packing, backend="triton")
        rel = float(jnp.linalg.norm((got - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        print(f"kernel on this device ({packing} packing): compiled and ran, relative error against the reference "
              f"{rel:.1e}: {'OK' if rel < 1e-2 else 'WRONG'}")
      except Exception as e:  # report, don't crash: this is a diagnostic
        print(f"kernel on this device ({packing} packing): FAILED: {type(e).__name__}: {e}")
  else:
    from jw4a16.kernels import compile as aot  # noqa: PLC0415

    for tgt in ("sm90", "gfx942"):
      try:
        cfg = tuning.select_config(16, 4096, 4096, 128, "bfloat16", False, tuning.H100)
        rep = aot.report(tgt, aot.compile_kernel(tgt, cfg.meta(), n=4096, k=4096, group_size=128,
                                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                 kernel=cfg.kernel))
        print(f"kernel cross-compiles for {tgt} (no GPU needed): shared {rep.shared} B, {rep.registers} registers, "
              f"spills {rep.spills}, {rep.matrix_unit}")
      except Exception as e:  # report, don't crash
        print(f"kernel cross-compile for {tgt}: FAILED: {type(e).__name__}: {e}")


if __name__ == "__main__":
  main()
