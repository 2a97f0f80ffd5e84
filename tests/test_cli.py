import pathlib

import numpy as np
import pytest

from jw4a16 import checkpoint, cli, layout

ROOT = pathlib.Path(__file__).parent.parent
ASYM = ROOT / "tests/fixtures/llama-w4a16-asym"


def test_generate_default(capsys):
  cli.main(["generate", "--max-new-tokens", "6", "--quiet"])
  out = capsys.readouterr()
  assert out.out.startswith("int4 weights make")
  assert "tokens/s" in out.err and "reference path" in out.err


def test_generate_decode_chunk(capsys):
  """--decode-chunk: the same greedy tokens one step a call as in generate's default chunks; 0 is refused."""
  toks = []
  for chunk in ("1", "5"):
    cli.main(["generate", "--max-new-tokens", "7", "--quiet", "--decode-chunk", chunk])
    toks.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("tokens:")])
  assert toks[0] == toks[1] and len(toks[0]) == 1
  with pytest.raises(ValueError, match="decode_chunk=0 must be >= 1"):
    cli.main(["generate", "--max-new-tokens", "3", "--quiet", "--decode-chunk", "0"])


def test_inspect(capsys):
  cli.main(["inspect", str(ASYM)])
  out = capsys.readouterr().out
  assert "compressed-tensors" in out and "asymmetric" in out and "14 quantized layers" in out


def test_convert_round_trip(tmp_path, capsys):
  cli.main(["convert", str(ASYM), str(tmp_path / "out")])
  assert "verified 4 layers" in capsys.readouterr().out
  back, meta = checkpoint.restore(tmp_path / "out")
  src, _, _ = checkpoint.load(ASYM, progress=False)
  a = src["model"]["layers"]["0"]["self_attn"]["q_proj"]
  b = back["model"]["layers"]["0"]["self_attn"]["q_proj"]
  np.testing.assert_array_equal(np.asarray(a.qweight), np.asarray(b.qweight))
  assert meta["source_format"] == "compressed-tensors" and meta["symmetric"] is False


def test_convert_to_fragment_packing(tmp_path, capsys):
  cli.main(["convert", str(ASYM), str(tmp_path / "out"), "--packing", "fragment"])
  assert "verified 4 layers" in capsys.readouterr().out
  back, _ = checkpoint.restore(tmp_path / "out")
  src, _, _ = checkpoint.load(ASYM, progress=False)
  a = src["model"]["layers"]["0"]["mlp"]["down_proj"]
  b = back["model"]["layers"]["0"]["mlp"]["down_proj"]
  assert b.packing == "fragment"
  np.testing.assert_array_equal(np.asarray(b.qweight), layout.to_fragment_packed(np.asarray(a.qweight)))


def test_failed_convert_leaves_nothing(tmp_path):
  import shutil  # noqa: PLC0415

  bad = tmp_path / "bad"
  shutil.copytree(ASYM, bad)
  f = bad / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-5000])
  with pytest.raises(checkpoint.CheckpointError):
    cli.main(["convert", str(bad), str(tmp_path / "out")])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_doctor(capsys):
  cli.main(["doctor"])
  out = capsys.readouterr().out
  assert "w4a16_matmul path: reference" in out


def test_bench_tables_from_results(tmp_path):
  """The benchmark's Markdown table and plot from a results file (no GPU needed); the committed H100 results."""
  import json  # noqa: PLC0415

  from jw4a16 import bench  # noqa: PLC0415

  result = json.loads((ROOT / "benchmarks/results/h100.json").read_text())
  for key in ("card", "versions", "date", "copy_TBps", "bf16_TFLOPs", "rows"):
    assert key in result
  assert {"K", "N", "M", "dtype", "group_size", "symmetric", "us", "xla_bf16_us", "xla_int4_us", "floor_us"} <= set(
      result["rows"][0])
  md = bench.markdown(result)
  assert md.count("\n| ") == len(result["rows"]) + 1
  (tmp_path / "r.json").write_text(json.dumps(result))
  bench.main(["--plot", str(tmp_path / "r.json")])
  assert (tmp_path / "r.png").stat().st_size > 1000


def test_bench_table_flags_rows_below_the_floor():
  """A time below the floor is noise, not a result: the table says so instead of printing its ratios."""
  from jw4a16 import bench  # noqa: PLC0415

  row = dict(K=4096, N=6144, M=2, dtype="bfloat16", group_size=128, symmetric=True, us=4.2, xla_bf16_us=25.7,
             xla_int4_us=66.1, floor_us=4.6)
  result = dict(card="h100", date="2026-11-25", versions=dict(jax="0", triton="0", jax_triton="0"), copy_TBps=2.8,
                bf16_TFLOPs=697, rows=[row, dict(row, M=1, us=22.4, below_floor=False)])
  md = bench.markdown(result)
  assert "| 4.2 (below the floor: noise) | 25.7 | 66.1 | 4.6 | - | - | - |" in md
  assert "| 22.4 | 24.4 |" not in md and "| 22.4 | 25.7 | 66.1 | 4.6 | 0.21 | 1.15x | 2.95x |" in md
  assert "Below the floor: no kernel can be that fast" in md


def test_bench_table_of_gpu_timed_results():
  """Results timed on the GPU (profiler device time) print the wall-clock figures beside them."""
  from jw4a16 import bench  # noqa: PLC0415

  row = dict(K=8192, N=57344, M=1, dtype="bfloat16", group_size=128, symmetric=True, us=98.0, xla_bf16_us=300.0,
             xla_int4_us=800.0, floor_us=85.0, below_floor=False, wall_us=114.1, xla_bf16_wall_us=322.1,
             xla_int4_wall_us=837.0)
  result = dict(card="h100", date="2026-11-26", versions=dict(jax="0", triton="0", jax_triton="0"), copy_TBps=2.9,
                bf16_TFLOPs=700, timing="gpu", rows=[row])
  md = bench.markdown(result)
  assert "GPU time in microseconds" in md and "jw4a16 wall | XLA bf16 wall |" in md
  assert "| 98.0 | 300.0 | 800.0 | 85.0 | 0.87 | 3.06x | 8.16x | 114.1 | 322.1 |" in md


def test_bench_merge(tmp_path):
  """Runs split by M merge into one table in the benchmark's order, each row keeping its own floor; files of
  different cards or timings refuse to merge."""
  import json  # noqa: PLC0415

  from jw4a16 import bench  # noqa: PLC0415

  def run(ms, copy, card="h100"):
    rows = [dict(K=k, N=n, M=m, dtype="bfloat16", group_size=128, symmetric=True, us=10.0 * m, xla_bf16_us=20.0 * m,
                 xla_int4_us=30.0 * m, floor_us=5.0 * m / copy, below_floor=False, wall_us=11.0, xla_bf16_wall_us=21.0,
                 xla_int4_wall_us=31.0) for k, n in ((8192, 57344), (4096, 6144)) for m in ms]
    return dict(card=card, date="2026-11-26", versions=dict(jax="0", triton="0", jax_triton="0"), copy_TBps=copy,
                bf16_TFLOPs=800.0, timing="gpu", rows=rows)

  files = []
  for i, r in enumerate((run([16, 1], 2.9), run([4], 3.0), run([64], 2.95))):
    files.append(tmp_path / f"r{i}.json")
    files[-1].write_text(json.dumps(r))
  bench.main(["--merge", *map(str, files), "--out", str(tmp_path / "out"), "--name", "all"])
  merged = json.loads((tmp_path / "out/all.json").read_text())
  assert [(r["K"], r["M"]) for r in merged["rows"]] == [(4096, m) for m in (1, 4, 16, 64)] + [
      (8192, m) for m in (1, 4, 16, 64)]  # SHAPES order: the 8B qkv shape first
  assert merged["copy_TBps"] == 2.95 and [r["rows"] for r in merged["runs"]] == [4, 2, 2]
  assert merged["rows"][1]["floor_us"] == 5.0 * 4 / 3.0  # its own run's floor
  assert "Merged from 3 runs" in (tmp_path / "out/all.md").read_text()
  (tmp_path / "other.json").write_text(json.dumps(run([2], 2.9, card="a100")))
  with pytest.raises(ValueError, match="differ in 'card'"):
    bench.main(["--merge", str(files[0]), str(tmp_path / "other.json"), "--out", str(tmp_path / "out")])


def test_bench_and_tune_refuse_cpu():
  from jw4a16 import bench  # noqa: PLC0415

  with pytest.raises(SystemExit, match="needs a GPU"):
    bench.main(["--quick"])
  with pytest.raises(SystemExit, match="needs a GPU"):
    bench.tune_main(["--shapes", "4096x4096"])


@pytest.mark.parametrize("packing", ["gptq", "fragment"])
def test_cold_start_script(tmp_path, capsys, packing):
  """scripts/cold_start.py runs a case in a fresh process and records both first calls (reference path here)."""
  import importlib.util  # noqa: PLC0415
  import json  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location("cold_start", ROOT / "scripts/cold_start.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.main(["--cases", "256x64:1", "--packing", packing, "--json", str(tmp_path / "c.jsonl")])
  row = json.loads((tmp_path / "c.jsonl").read_text())
  assert (row["k"], row["n"], row["m"], row["packing"]) == (256, 64, 1, packing)
  assert row["first_call_s"] > 0 and row["new_shape_first_call_s"] > 0 and row["second_call_s"] > 0
  assert f"256x64 M=1 {packing}: first call in the process" in capsys.readouterr().out


def test_frag_ab_script_loads_a_kernel_file(tmp_path):
  """scripts/frag_ab.py compiles its "old" kernel from a source file (a copy of main's, say); the timing needs CUDA."""
  import importlib.util  # noqa: PLC0415
  import shutil  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location("frag_ab", ROOT / "scripts/frag_ab.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  old = tmp_path / "frag_main.py"
  shutil.copy(ROOT / "jw4a16/kernels/w4a16_frag.py", old)
  kernel = mod.load_kernel(str(old))
  assert kernel.__name__ == "w4a16_frag_kernel" and "frag_main" in kernel.fn.__module__


def test_convert_to_fragment_refuses_k_96_and_writes_nothing(tmp_path):
  from tests import checkpoint_writers as writers  # noqa: PLC0415

  writers.write_gptq(tmp_path / "k96", k=96, g=32)  # K = 96: not whole blocks of 64
  with pytest.raises(checkpoint.CheckpointError, match="layer: packing='fragment' needs .*K=96, group_size=32"):
    cli.main(["convert", str(tmp_path / "k96"), str(tmp_path / "out"), "--packing", "fragment"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["k96"]


def test_occupancy_script(tmp_path, capsys):
  """scripts/occupancy.py compiles a table pick for sm_90 (no GPU) and reports its registers, programs an SM and
  waves, consistent with each other."""
  import importlib.util  # noqa: PLC0415
  import json  # noqa: PLC0415

  from jw4a16 import tuning  # noqa: PLC0415
  from jw4a16.kernels.compile import programs_per_sm  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location("occupancy", ROOT / "scripts/occupancy.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.main(["--ms", "256", "--shapes", "4096x28672", "--json", str(tmp_path / "o.jsonl")])
  row = json.loads((tmp_path / "o.jsonl").read_text())
  cfg = tuning.select_config(256, 4096, 28672, 128, "bfloat16", False, tuning.H100, "fragment")
  assert (row["M"], row["K"], row["N"], row["block_n"], row["split_k"]) == (256, 4096, 28672, cfg.block_n, cfg.split_k)
  assert row["registers"] > 0 and row["spills"] == 0 and row["matrix_unit"] in ("wgmma", "mma")
  assert row["programs_per_sm"] == programs_per_sm("sm90", row["registers"], cfg.num_warps, row["shared"]) >= 1
  tiles, split = cfg.grid(256, 28672)
  assert row["programs"] == tiles * split
  assert row["waves"] == pytest.approx(row["programs"] / (row["programs_per_sm"] * tuning.H100.num_sms))
  assert f"| 256 | 4096x28672 | {cfg.block_m} x {cfg.block_n} x {cfg.block_k}" in capsys.readouterr().out
