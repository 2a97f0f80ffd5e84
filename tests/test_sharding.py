"""Tensor parallelism on 8 CPU devices (reference path), each check in its own process (XLA_FLAGS)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("check", ["column_and_row", "errors", "layer_under_mesh", "orbax_sharded_restore",
                                   "llama_tp"])
def test_sharding(check):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, os.path.join(HERE, "sharding_checks.py"), check], capture_output=True,
                       text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  assert "ok" in res.stdout
