"""scripts/sweep.py's weight sets for the frag kernel (the GPU timing itself runs on the device only)."""

import importlib.util
import pathlib

import numpy as np
import torch

from jw4a16.layout import to_fragment_packed

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "sweep.py"


def _sweep():
  spec = importlib.util.spec_from_file_location("sweep", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fragment_sets_pack_once_and_copy():
  sweep = _sweep()
  sets = [sweep.make(128, 64, 64, torch.bfloat16, True, dev="cpu") for _ in range(3)]
  out = sweep.fragment_sets(sets)
  want = to_fragment_packed(sets[0][0].numpy())
  assert len(out) == 3
  for i, (qw, s, qz) in enumerate(out):
    np.testing.assert_array_equal(qw.numpy(), want)  # set 0 packed, the others copies of it
    assert s is sets[i][1] and qz is sets[i][2]  # each set keeps its own scales and zero points
  assert len({qw.data_ptr() for qw, _, _ in out}) == 3  # distinct buffers: they rotate the L2 cache
