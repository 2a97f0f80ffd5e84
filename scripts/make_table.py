"""Builds jw4a16/configs/<gpu>.json from scripts/sweep.py output: the fastest config per (K, N, M bucket), with
unmeasured buckets up to 256 taking the nearest measured M.  bf16, symmetric, the sweep's group size.

  python scripts/make_table.py benchmarks/results/sweep-h100-2026-11-25.json [more sweeps] h100 --group 128 \
      [--gemv-from SWEEP ...]

--gemv-from: only these sweeps' gemv rows count (the others' were measured with an older gemv kernel); a bucket
up to tuning.GEMV_MAX_M whose best row comes from another sweep is left out of the table, so the dispatcher's
gemv heuristic answers it rather than a tile config that the current gemv kernel may beat.

--frag SWEEP ...: instead, rewrite only the table's packing="fragment" entries (keys ending in _frag) from these
sweeps of the frag kernel (measured M buckets only; rows of `sweep.py --asym` for the keys with zero points),
keeping every other entry as it is:

  python scripts/make_table.py h100 --frag benchmarks/results/sweep-frag-h100-2026-11-26-s7.json
"""

import argparse
import json
import pathlib

from jw4a16.kernels.compile import compile_in_subprocess
from jw4a16.tuning import CONFIG_DIR, GEMV_MAX_M, KernelConfig, frag_acc_fits, legalize, table_key

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("sweep", nargs="*", help="sweep files; a later file's (K, N, M) rows replace earlier ones'")
  p.add_argument("gpu")
  p.add_argument("--frag", nargs="+", default=None, help="frag-kernel sweeps: rewrite only the _frag entries")
  p.add_argument("--group", type=int, default=128)
  p.add_argument("--gemv-from", nargs="*", default=None, help="sweeps whose gemv rows are current (default: all)")
  a = p.parse_args()
  if a.frag:
    return frag_entries(a.gpu, a.frag, a.group)
  gemv_max_m = GEMV_MAX_M.get(a.gpu, 1)
  best = {}
  for path in a.sweep:
    rows = json.loads(pathlib.Path(path).read_text())
    for key in {(r["k"], r["n"], r["m"]) for r in rows}:
      best.pop(key, None)
    for r in rows:
      if a.gemv_from is not None and r["config"].get("kernel") == "gemv" and path not in a.gemv_from:
        continue
      key = (r["k"], r["n"], r["m"])
      if key not in best or r["us"] < best[key]["us"]:
        best[key] = dict(r, path=path)
  table = {}
  for k, n in sorted({(k, n) for k, n, _ in best}):
    measured = sorted(m for kk, nn, m in best if (kk, nn) == (k, n))
    for bucket in BUCKETS:
      if bucket > 2 * max(measured):  # far past what was measured: the heuristic knows better
        continue
      m = min(measured, key=lambda mm: (abs(mm - bucket), mm))
      cfg = legalize(KernelConfig(**best[(k, n, m)]["config"]), k, a.group)
      if cfg.kernel == "gemv" and bucket != m:  # rows per program are fixed, its cost grows with M: measured M only
        continue
      if cfg.swap_ab and bucket > m:  # measured to lose at M = 64: not extrapolated upwards
        continue
      if (cfg.kernel != "gemv" and bucket <= gemv_max_m and a.gemv_from is not None
          and (bucket != m or best[(k, n, m)]["path"] not in a.gemv_from)):
        continue  # not measured beside the current gemv kernel at this M: leave it to the gemv heuristic
      for dtype in ("bfloat16", "float16"):
        for has_zp in (False, True):
          table[table_key(bucket, k, n, a.group, dtype, has_zp)] = cfg.to_json()
  out = CONFIG_DIR / f"{a.gpu}.json"
  out.write_text(json.dumps({"source": " ".join(a.sweep), "configs": table}, indent=1, sort_keys=True))
  print(f"wrote {len(table)} entries to {out}")


COMPILE_TARGET = {"h100": "sm90"}  # where frag_entries checks its picks for register spills


def spill_bytes(jobs: list[tuple[KernelConfig, int, int, int]], group: int, target: str,
                has_zp: list[bool] | None = None) -> list[int]:
  """Register spill bytes of the frag kernel for each (config, K, N, M) on `target` (compiled in a subprocess:
  the tests may import this module under TRITON_INTERPRET=1), with zero points where has_zp says so."""
  has_zp = has_zp or [False] * len(jobs)
  specs = [dict(meta=cfg.meta(), n=n, k=k, group_size=group, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                kernel="frag", m_is_one=m == 1, has_zp=zp) for (cfg, k, n, m), zp in zip(jobs, has_zp)]
  reports = compile_in_subprocess(target, specs)
  for (cfg, k, n, _), rep in zip(jobs, reports):
    if "error" in rep:
      raise RuntimeError(f"{cfg} for K={k} N={n}: {rep['error']}")
  return [rep["spills"] or 0 for rep in reports]


def frag_entries(gpu: str, sweeps: list[str], group: int):
  """The fastest frag config per measured (K, N, M bucket) and symmetry, for both dtypes (the sweeps measure
  bf16), merged into configs/<gpu>.json in place of its old _frag entries.  Rows of symmetric weights (no "asym"
  field, or false) fill the symmetric keys, and the keys with zero points where no sweep measured those
  (rows with "asym": true, from scripts/sweep.py --asym).  As for the other entries, a later sweep's (K, N, M)
  rows replace earlier sweeps' of the same symmetry (a re-measured point after a kernel change).  Tiles past
  tuning.frag_acc_fits are left out, and on GPUs in COMPILE_TARGET so is any config that spills registers there,
  compiled with zero points for the asymmetric keys (the fastest that does not is tabled; tests/test_compile.py
  holds dispatchable configs to that)."""
  measured = {False: {}, True: {}}  # asym -> {(K, N, M): rows}
  for path in sweeps:
    found = [r for r in json.loads(pathlib.Path(path).read_text()) if r["config"].get("kernel") == "frag"
             and r["m"] in BUCKETS and frag_acc_fits(KernelConfig(**r["config"]))]
    fresh = {False: {}, True: {}}
    for r in found:
      fresh[bool(r.get("asym"))].setdefault((r["k"], r["n"], r["m"]), []).append(r)
    for asym, points in fresh.items():
      measured[asym].update(points)
  rows = {(*key, False): found for key, found in measured[False].items()}
  rows.update({(*key, True): found for key, found in measured[False].items()})
  rows.update({(*key, True): found for key, found in measured[True].items()})
  order = {key: sorted(found, key=lambda r: r["us"]) for key, found in rows.items()}
  best = {key: found[0] for key, found in order.items()}
  unchecked = sorted(best) if gpu in COMPILE_TARGET else []
  while unchecked:  # compile each point's fastest; where it spills, the next fastest
    jobs = [(legalize(KernelConfig(**best[key]["config"]), key[0], group), *key[:3]) for key in unchecked]
    spills = spill_bytes(jobs, group, COMPILE_TARGET[gpu], [key[3] for key in unchecked])
    spilled = [(key, job) for key, job, b in zip(unchecked, jobs, spills) if b]
    unchecked = []
    for key, (cfg, *_) in spilled:
      print(f"K={key[0]} N={key[1]} M={key[2]}{' asym' if key[3] else ''}: {best[key]['us']:.1f} us config spills "
            f"on {COMPILE_TARGET[gpu]}, not tabled: {cfg}")
      order[key].pop(0)
      if order[key]:
        best[key] = order[key][0]
        unchecked.append(key)
      else:
        del best[key]
  out = CONFIG_DIR / f"{gpu}.json"
  doc = json.loads(out.read_text())
  table = {key: cfg for key, cfg in doc["configs"].items() if not key.endswith("_frag")}
  for (k, n, m, has_zp), r in sorted(best.items()):
    cfg = legalize(KernelConfig(**r["config"]), k, group)
    for dtype in ("bfloat16", "float16"):
      table[table_key(m, k, n, group, dtype, has_zp, "fragment")] = cfg.to_json()
  doc.update(configs=table, frag_source=" ".join(sweeps))
  out.write_text(json.dumps(doc, indent=1, sort_keys=True))
  print(f"wrote {len(best) * 2} _frag entries ({len(table)} in all) to {out}")


if __name__ == "__main__":
  main()
