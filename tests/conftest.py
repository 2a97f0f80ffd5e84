"""Test set-up.

CPU runs (CI): TRITON_INTERPRET=1 is set before anything imports triton, so the kernel source runs in Triton's
interpreter on CPU torch tensors.  GPU runs set JW4A16_TEST_GPU=1 instead (the interpreter would replace the
compiled kernels jax-triton needs) and run `pytest -m gpu`.
"""

import os

GPU_RUN = os.environ.get("JW4A16_TEST_GPU") == "1"
if not GPU_RUN:
  os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA or ROCm GPU with jax-triton (run with JW4A16_TEST_GPU=1)")
  config.addinivalue_line("markers", "interpret: runs the Triton kernel in Triton's CPU interpreter")
  config.addinivalue_line("markers", "slow: slower CPU tests")


def pytest_collection_modifyitems(config, items):
  del config
  gpu_ok = GPU_RUN and _jax_gpu()
  interp_ok = os.environ.get("TRITON_INTERPRET") == "1"
  for item in items:
    if "gpu" in item.keywords and not gpu_ok:
      item.add_marker(pytest.mark.skip(reason="needs a GPU and JW4A16_TEST_GPU=1"))
    if "interpret" in item.keywords and not interp_ok:
      item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (CPU runs)"))


def _jax_gpu() -> bool:
  import jax  # noqa: PLC0415

  return jax.default_backend() in ("gpu", "cuda", "rocm")
