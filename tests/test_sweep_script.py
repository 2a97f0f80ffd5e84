"""scripts/sweep.py's weight sets for the frag kernel and scripts/frag_neighbours.py's candidates (the GPU timing
itself runs on the device only)."""

import importlib.util
import pathlib

import numpy as np
import torch

from jw4a16.layout import to_fragment_packed

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "sweep.py"


def _sweep(script=SCRIPT):
  spec = importlib.util.spec_from_file_location(script.stem, script)
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


def test_frag_neighbours_try_what_the_sweeps_left_out():
  from jw4a16 import tuning  # noqa: PLC0415

  neighbours = _sweep(SCRIPT.parent / "frag_neighbours.py").neighbours
  pick = tuning.KernelConfig(8, 128, 128, split_k=2, num_warps=4, num_stages=3, kernel="frag", scale_w=2)
  cands = neighbours(pick, 4096, tuning.H100)
  assert cands[0] == pick and len(cands) == len(set(cands))
  assert {(c.block_k, c.num_stages) for c in cands if c.num_warps == 4} >= {(64, 3), (64, 4), (128, 2), (128, 3)}
  assert {c.split_k for c in cands} == {1, 2, 4} and any(c.num_warps == 8 for c in cands)
  assert all(tuning.fits(c, tuning.H100) and 4096 // c.split_k >= 2 * c.block_k for c in cands)
