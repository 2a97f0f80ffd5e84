"""Every config the dispatcher can pick compiles for sm_80, sm_90, gfx942 and gfx950, within the target's shared
memory, without register spills, and on the matrix units where it uses tl.dot.  No GPU needed.

The compiles run in one subprocess per target without TRITON_INTERPRET (see jw4a16/kernels/compile.py).
"""

import functools

import pytest

from jw4a16 import tuning
from jw4a16.kernels.compile import compile_in_subprocess

TARGETS = ("sm80", "sm90", "gfx942", "gfx950")
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024, "gfx942": 64 * 1024, "gfx950": 160 * 1024}
HEURISTIC_TARGET = {"sm80": tuning.Target("a100", 108, shared_memory=163 * 1024), "sm90": tuning.H100,
                    "gfx942": tuning.MI300X, "gfx950": tuning.MI350}
SHAPES = [(4096, 6144), (14336, 4096), (4096, 28672), (8192, 10240)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]


def dispatchable(target_name):
  """(config, K, N, M) for every config select_config returns on real-model shapes for this target, at the
  first M that picks it."""
  target = HEURISTIC_TARGET[target_name]
  seen = {}
  for k, n in SHAPES:
    for m in MS:
      if not tuning.use_dequant_gemm(m, target):
        seen.setdefault(tuning.select_config(m, k, n, 128, "bfloat16", False, target), (k, n, m))
  return sorted(((c, k, n, m) for c, (k, n, m) in seen.items()), key=str)


def frag_dispatchable(target_name):
  """(config, K, N, M) for the distinct frag configs select_config returns for packing="fragment"."""
  target = HEURISTIC_TARGET[target_name]
  seen = {}
  for k, n in SHAPES[:3]:
    for m in (1, 16, 64, 256):
      seen.setdefault(tuning.select_config(m, k, n, 128, "bfloat16", False, target, "fragment"), (k, n, m))
  return sorted(((c, k, n, m) for c, (k, n, m) in seen.items()), key=str)


# The last field: M == 1, which jax-triton compiles as the constexpr 1 (the decode kernels).
JOBS = {t: [(c, k, n, g, dtype, zp, m == 1) for c, k, n, m in dispatchable(t)
            for g, dtype, zp in ((128, "bfloat16", False), (128, "float16", True))] +
           [(tuning.legalize(tuning.select_config(16, 4096, 6144, g, "bfloat16", True, HEURISTIC_TARGET[t]), 4096, g),
             4096, 6144, g, "bfloat16", True, False) for g in (32, 64, 256, 4096)] +
           # the two-row gemv kernel on every target, though only the H100 tables pick it (M = 2)
           [(tuning.gemv_config(256, 8, 16, 8, HEURISTIC_TARGET[t], rows=2), 4096, 6144, 128, "float16", zp, False)
            for zp in (False, True)] +
           # the swapped tile (out^T = W^T x^T) likewise, 16 and 32 rows of x
           [(tuning.KernelConfig(bm, 64, 128, split_k=4, num_stages=3, swap_ab=1), 4096, 6144, 128, dtype, zp, False)
            for bm, dtype, zp in ((16, "bfloat16", False), (32, "float16", True))] +
           # the fragment-packed kernel: what the dispatcher picks for packing="fragment" on two shapes
           [(c, k, n, 128, dtype, zp, m == 1) for c, k, n, m in frag_dispatchable(t)
            for dtype, zp in (("bfloat16", False), ("float16", True))] +
           # its scales read as int32 pairs (SCALE_W = 2), whether or not a pick uses them
           [(tuning.KernelConfig(bm, bn, 128, split_k=2, num_stages=3, kernel="frag", scale_w=2), 4096, 28672, 128,
             dtype, zp, bm == 8) for bm, bn, dtype, zp in ((8, 128, "bfloat16", False), (64, 64, "float16", True))
            if not t.startswith("gfx")] +  # an NVIDIA pipeliner's option: AMD stages loads by its own rules
           # groups of 32 on the fragment packing: two per 64-deep step
           [(tuning.KernelConfig(bm, bn, 64, split_k=4, num_stages=3, kernel="frag", scale_w=sw), 4096, 6144, 32,
             dtype, zp, bm == 8) for bm, bn, sw, dtype, zp in ((8, 64, 2, "bfloat16", False),
                                                               (64, 128, 2, "float16", True),
                                                               (16, 64, 1, "bfloat16", True))
            if not t.startswith("gfx")]
        for t in TARGETS}


# On NVIDIA the frag kernel's unpacked words stay whole register pairs in the K loop (w4a16_frag._magic_pairs): the
# only 16-bit halves cut out there are the scales' int32 pairs (SCALE_W = 2), at most 4 a step on these jobs.  The
# words split into halves gave 16 - 64 a step (sm_80, sm_90; before session 20).
HALF_SPLITS_OF_SCALES = 4


@functools.cache
def reports(target):
  jobs = [dict(meta=c.meta(), n=n, k=k, group_size=g, dtype=dtype, has_zp=zp, num_warps=c.num_warps,
               num_stages=c.num_stages, amd_options=c.amd_options(), kernel=c.kernel, m_is_one=m1)
          for c, k, n, g, dtype, zp, m1 in JOBS[target]]
  return compile_in_subprocess(target, jobs)


CASES = [(t, i) for t in TARGETS for i in range(len(JOBS[t]))]


@pytest.mark.parametrize("target,i", CASES,
                         ids=[f"{t}-{JOBS[t][i][0]}-g{JOBS[t][i][3]}-{JOBS[t][i][4]}" for t, i in CASES])
def test_compiles_within_limits(target, i):
  cfg, k, n, g, dtype, zp, _ = JOBS[target][i]
  rep = reports(target)[i]
  assert "error" not in rep, rep.get("error")
  assert rep["shared"] <= SHARED_LIMIT[target], rep
  assert rep["spills"] == 0, rep
  assert ("hsaco" if target.startswith("gfx") else "cubin") in rep["asm_keys"]
  assert rep["registers"] and rep["registers"] <= (512 if target.startswith("gfx") else 255), rep
  assert not rep["wgmma_in_flight"], rep  # no wgmma may outlive its loop iteration (kernels/w4a16_frag.py)
  if cfg.kernel == "frag" and cfg.scale_w == 2 and not target.startswith("gfx"):
    # every load of the SCALE_W = 2 K loop staged by the pipeliner (cp.async), the scales as int32 pairs
    assert rep["loop_global_loads"] == 0, rep
  if cfg.kernel == "frag" and target == "sm90":  # the dequantized tile stays the wgmma's register operand
    assert rep["tiles_to_shared"] == 0, rep
  if cfg.kernel == "frag" and not target.startswith("gfx"):
    assert rep["loop_half_splits"] <= HALF_SPLITS_OF_SCALES, rep
  if cfg.block_m >= 16:  # tl.dot must land on the matrix units; wgmma where its M (64 rows) is filled
    wgmma = target == "sm90" and (cfg.block_n if cfg.swap_ab or cfg.kernel == "frag" else cfg.block_m) >= 64
    expected = "v_mfma" if target.startswith("gfx") else ("wgmma" if wgmma else "mma")
    assert rep["matrix_unit"] == expected, rep


# The frag kernel with a layer's norm (NORM) or residual (RES, RES_GAMMA) folded in (w4a16_frag_norm_kernel), at
# the dispatcher's picks for the Llama-3-8B projections that take them in the model: q/k/v the norm, o the
# residual and the next norm's weight, gate/up the row scale (NORM = 2), down the residual; M = 1 and 16.  q/k/v
# and gate/up also with PARTIALS (the split-K slots, w4a16_matmul's partials: how a decode step runs them).
NORM_CASES_8B = ((4096, 6144, 1, 0, 0, 0), (4096, 28672, 2, 0, 0, 0), (14336, 4096, 0, 1, 0, 0),
                 (4096, 4096, 0, 1, 1, 0), (4096, 4096, 1, 1, 0, 0), (4096, 28672, 1, 0, 0, 0),
                 (4096, 6144, 1, 0, 0, 1), (4096, 28672, 2, 0, 0, 1), (4096, 4096, 0, 0, 0, 1))
NORM_JOBS = {t: [(tuning.select_config(m, k, n, 128, "bfloat16", False, HEURISTIC_TARGET[t], "fragment"), k, n, m,
                  norm, res, rg, pt) for k, n, norm, res, rg, pt in NORM_CASES_8B for m in (1, 16)]
             for t in TARGETS}


@functools.cache
def norm_reports(target):
  jobs = [dict(meta=c.meta(), n=n, k=k, group_size=128, dtype="bfloat16", has_zp=False, num_warps=c.num_warps,
               num_stages=c.num_stages, amd_options=c.amd_options(), kernel="frag", m_is_one=m == 1, norm=nm,
               res=bool(rs), res_gamma=bool(rg), partials=bool(pt)) for c, k, n, m, nm, rs, rg, pt in NORM_JOBS[target]]
  return compile_in_subprocess(target, jobs)


NORM_CASES = [(t, i) for t in TARGETS for i in range(len(NORM_JOBS[t]))]


@pytest.mark.parametrize("target,i", NORM_CASES, ids=[f"{t}-{i}" for t, i in NORM_CASES])
def test_fused_norm_kernel_compiles(target, i):
  cfg, *_ = NORM_JOBS[target][i]
  rep = norm_reports(target)[i]
  assert "error" not in rep, rep.get("error")
  assert rep["shared"] <= SHARED_LIMIT[target] and rep["spills"] == 0, rep
  assert not rep["wgmma_in_flight"], rep
  if cfg.scale_w == 2 and not target.startswith("gfx"):  # the norm weight, too, staged by the pipeliner
    assert rep["loop_global_loads"] == 0, rep
  if target == "sm90" and NORM_JOBS[target][i][4] != 1:  # the row scale (NORM = 2) leaves x in shared memory
    assert rep["tiles_to_shared"] == 0, rep
  if not target.startswith("gfx"):
    assert rep["loop_half_splits"] <= HALF_SPLITS_OF_SCALES, rep


# The decode-attention kernel (jw4a16.attention) at Llama-3 shapes: 4 query heads a kv head, head_dim 128 (and 64),
# one split (a long batch) and 16 splits (batch 1).
# The step kernel (rotary and cache writes folded in) at the same shapes.
ATTENTION_JOBS = [dict(kernel="decode_attention", dtype=dt, s=s, kvh=kvh, r=r, d=d, split=split, step=step)
                  for step in (False, True)
                  for dt, s, kvh, r, d, split in (("bfloat16", 2048, 8, 4, 128, 16), ("float16", 4096, 8, 4, 128, 1),
                                                  ("bfloat16", 512, 4, 8, 64, 4), ("bfloat16", 256, 32, 1, 128, 2))] + \
                 [dict(kernel="decode_attention", dtype=dt, s=s, kvh=8, r=4, d=128, split=split, step=True,
                       parts=parts, batch=b)  # q/k/v as split-K slots (PARTS), as a decode step passes them
                  for dt, s, split, parts, b in (("bfloat16", 256, 1, 8, 1), ("float16", 2048, 8, 2, 16))]


@functools.cache
def attention_reports(target):
  return compile_in_subprocess(target, [dict(j) for j in ATTENTION_JOBS])


# The kernels without matrix units, compiled in one subprocess a target: the RMSNorm kernel (jw4a16.norm) at Llama
# hidden sizes, with and without the residual add, and the dequantize-then-GEMM route's kernel
# (jw4a16.ops.dequantize_fragment_call) at Llama-3 shapes and groups.
PLAIN_JOBS = [dict(kernel="rms_norm", dtype=dt, n=n, has_res=res)
              for dt, n, res in (("bfloat16", 4096, True), ("bfloat16", 8192, False), ("float16", 896, True),
                                 ("bfloat16", 16384, True))] + \
             [dict(kernel="dequant", dtype=dt, n=n, k=k, group_size=g, has_zp=zp)
              for dt, n, k, g, zp in (("bfloat16", 28672, 4096, 128, False), ("float16", 4096, 14336, 32, True),
                                      ("bfloat16", 8192, 28672, 28672, False), ("bfloat16", 200, 512, 64, True))]


@functools.cache
def plain_reports(target):
  return compile_in_subprocess(target, [dict(j) for j in PLAIN_JOBS])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("i", range(len(PLAIN_JOBS)), ids=lambda i: f"{PLAIN_JOBS[i]['kernel']}-{i}")
def test_plain_kernels_compile(target, i):
  rep = plain_reports(target)[i]
  assert "error" not in rep, rep.get("error")
  assert rep["spills"] == 0, rep
  assert rep["shared"] <= SHARED_LIMIT[target], rep


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("i", range(len(ATTENTION_JOBS)))
def test_decode_attention_compiles(target, i):
  rep = attention_reports(target)[i]
  assert "error" not in rep, rep.get("error")
  assert rep["shared"] <= SHARED_LIMIT[target], rep
  assert rep["spills"] == 0, rep
  assert rep["matrix_unit"] == ("v_mfma" if target.startswith("gfx") else "mma"), rep  # tl.dot on the matrix units


@pytest.mark.parametrize("registers,warps,shared,want", [
    (127, 4, 35072, 4),  # the 4096x28672 M = 256 pick before session 20's unpacking (Triton 3.6)
    (133, 4, 35072, 3),  # after it: 136 registers allocated a thread, 17,408 a program
    (64, 4, 12032, 8),  # warps: 64 a SM
    (32, 4, 12032, 16),
    (32, 1, 1024, 32),  # resident programs: 32 a SM
    (128, 4, 120 * 1024, 1),  # shared memory: 228 KB a SM, 1 KB of it reserved a program
    (255, 8, 1024, 1),
])
def test_programs_per_sm(registers, warps, shared, want):
  from jw4a16.kernels.compile import programs_per_sm  # noqa: PLC0415

  assert programs_per_sm("sm90", registers, warps, shared) == want


def test_programs_per_sm_refuses_amd():
  from jw4a16.kernels.compile import programs_per_sm  # noqa: PLC0415

  with pytest.raises(ValueError, match="gfx942"):
    programs_per_sm("gfx942", 64, 4, 1024)
