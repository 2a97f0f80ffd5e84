"""scripts/make_table.py --frag: later sweeps replace a point, and a config that spills registers on sm_90 is not
tabled (the next fastest is).  Compiles two configs for sm_90 in a subprocess; no GPU needed."""

import importlib.util
import json
import pathlib
import shutil

import pytest

from jw4a16 import tuning

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_table.py"


def _row(k, n, m, us, cfg):
  return dict(k=k, n=n, m=m, us=us, config=cfg.to_json())


@pytest.fixture
def make_table(tmp_path, monkeypatch):
  """scripts/make_table.py as a module, writing into a copy of the shipped H100 table under tmp_path."""
  spec = importlib.util.spec_from_file_location("make_table", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  shutil.copy(tuning.CONFIG_DIR / "h100.json", tmp_path / "h100.json")
  monkeypatch.setattr(module, "CONFIG_DIR", tmp_path)
  return module


def test_frag_entries_replace_and_skip_spills(tmp_path, make_table):
  k, n = 4096, 28672
  spilling = tuning.KernelConfig(128, 128, 128, num_warps=4, num_stages=3, kernel="frag", scale_w=1)  # 24 - 44 B
  clean = tuning.KernelConfig(128, 64, 64, num_warps=4, num_stages=3, kernel="frag", scale_w=1)
  stale = tuning.KernelConfig(64, 128, 64, num_warps=8, num_stages=3, kernel="frag", scale_w=1)
  old = tmp_path / "old.json"
  old.write_text(json.dumps([_row(k, n, 256, 1.0, stale)]))  # fastest, but re-measured below
  new = tmp_path / "new.json"
  new.write_text(json.dumps([_row(k, n, 256, 132.0, spilling), _row(k, n, 256, 142.0, clean)]))
  make_table.frag_entries("h100", [str(old), str(new)], 128)
  table = json.loads((tmp_path / "h100.json").read_text())["configs"]
  for dtype in ("bfloat16", "float16"):
    for has_zp in (False, True):
      got = tuning.KernelConfig(**table[tuning.table_key(256, k, n, 128, dtype, has_zp, "fragment")])
      assert got == tuning.legalize(clean, k, 128)


def test_frag_entries_asymmetric_rows_fill_the_zero_point_keys(tmp_path, make_table):
  """Rows of an --asym sweep fill the keys with zero points, whichever sweep comes last; symmetric rows the rest."""
  k, n = 4096, 6144
  sym = tuning.KernelConfig(16, 64, 128, split_k=8, num_stages=3, kernel="frag", scale_w=2)
  asym = tuning.KernelConfig(16, 128, 128, split_k=8, num_stages=3, kernel="frag", scale_w=1)
  asym_sweep = tmp_path / "asym.json"
  asym_sweep.write_text(json.dumps([dict(_row(k, n, 16, 20.0, asym), asym=True)]))
  sym_sweep = tmp_path / "sym.json"
  sym_sweep.write_text(json.dumps([dict(_row(k, n, 16, 10.0, sym), asym=False)]))
  make_table.frag_entries("h100", [str(asym_sweep), str(sym_sweep)], 128)
  table = json.loads((tmp_path / "h100.json").read_text())["configs"]
  for dtype in ("bfloat16", "float16"):
    assert tuning.KernelConfig(**table[tuning.table_key(16, k, n, 128, dtype, False, "fragment")]) == sym
    assert tuning.KernelConfig(**table[tuning.table_key(16, k, n, 128, dtype, True, "fragment")]) == asym
