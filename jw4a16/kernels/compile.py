"""Ahead-of-time compilation of the W4A16 kernel for any target, no GPU needed (triton.compile + GPUTarget).

Used by CI (every config the dispatcher can pick, for sm_80, sm_90, gfx942 and gfx950) and by `jw4a16 doctor`.
Imports only triton.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from jw4a16.kernels import KERNELS

TARGETS = {
    "sm80": GPUTarget("cuda", 80, 32),
    "sm90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
}
# Per-block shared memory / LDS limits (bytes): A100 and H100 opt-in maxima, MI300 and MI350 LDS.
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024, "gfx942": 64 * 1024, "gfx950": 160 * 1024}
_TT = {"bfloat16": "bf16", "float16": "fp16"}


@dataclasses.dataclass(frozen=True)
class CompileReport:
  target: str
  shared: int
  spills: int | None  # registers spilled (None where the tool chain does not say)
  matrix_unit: str | None  # the matrix instruction found in the assembly, if any
  asm_keys: tuple[str, ...]
  wgmma_in_flight: bool = False  # a loop's back edge with wgmmas unfinished (wgmma_in_flight_at_loop_end)
  loop_global_loads: int = 0  # ld.global in the K loops (global_loads_in_mma_loops): loads not pipelined
  tiles_to_shared: int = 0  # register tensors stored to shared memory (tiles_stored_to_shared)
  loop_half_splits: int = 0  # 16-bit halves cut out of words in the K loops (half_splits_in_mma_loops)
  registers: int | None = None  # a thread's registers (ptxas -v on NVIDIA, VGPRs on AMD; None if not reported)


def compile_kernel(target: str, meta: dict, *, n: int, k: int, group_size: int, dtype: str = "bfloat16",
                   has_zp: bool = False, zp_bias: int = 8, num_warps: int = 4, num_stages: int = 3,
                   amd_options: dict | None = None, kernel: str = "tile", m_is_one: bool = False,
                   norm: int = 0, res: bool = False, res_gamma: bool = False, partials: bool = False):
  """Compiles KERNELS[kernel] for `target` (a key of TARGETS) with the constexprs jax-triton would pass.

  m_is_one: M is the constexpr 1, as jax-triton makes an integer argument equal to 1.
  norm (0, 1, 2), res, res_gamma (kernel "frag"): w4a16_frag_norm_kernel with NORM / RES / RES_GAMMA, as
  ops._launch passes a norm weight (1) or only its squares (2), a residual, a residual norm weight; partials: its
  PARTIALS (w4a16_matmul's partials=True: the split-K slots, no epilogue sum).
  """
  tt = _TT[dtype]
  sig = {"x_ptr": f"*{tt}", "qweight_ptr": "*i32", "scales_ptr": f"*{tt}", "qzeros_ptr": "*i32", "M": "i32",
         "lock_ptr": "*i32", "out_ptr": f"*{tt}", "partial_ptr": "*fp32"}
  constexprs = dict(N=n, K=k, GROUP_SIZE=group_size, HAS_ZP=has_zp, ZP_BIAS=zp_bias, **meta)
  fn = KERNELS[kernel]
  if kernel == "frag":  # NVIDIA: the unpacking's inline-PTX LOP3, as ops._launch passes it
    constexprs.setdefault("PTX", int(TARGETS[target].backend == "cuda"))
  if norm or res or res_gamma or partials:
    from jw4a16.kernels.w4a16_frag import w4a16_frag_norm_kernel  # noqa: PLC0415

    if kernel != "frag":
      raise ValueError(f"norm / res: only the frag kernel folds them in, not {kernel!r}")
    sig = {name: sig[name] for name in ("x_ptr", "qweight_ptr", "scales_ptr", "qzeros_ptr", "M", "lock_ptr")}
    sig |= {"gamma_ptr": f"*{tt}", "ssq_in_ptr": "*fp32", "res_ptr": f"*{tt}", "res_gamma_ptr": f"*{tt}",
            "out_ptr": f"*{tt}", "partial_ptr": "*fp32", "ssq_out_ptr": "*fp32", "hg_out_ptr": f"*{tt}"}
    constexprs |= dict(NORM=int(norm), RES=int(res), RES_GAMMA=int(res_gamma), EPS=1e-5, PARTIALS=int(partials))
    fn = w4a16_frag_norm_kernel
  if m_is_one:
    constexprs["M"] = 1
  sig.update({name: "constexpr" for name in constexprs})
  # jax-triton assumes 16-byte aligned arrays; say so, as it does
  attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name.endswith("_ptr")}
  src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
  options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True)  # jax-triton's default
  if TARGETS[target].backend == "hip" and amd_options:
    options.update({k: v for k, v in amd_options.items() if v})
  return triton.compile(src, target=TARGETS[target], options=options)


def compile_attention(target: str, *, dtype: str = "bfloat16", s: int, kvh: int, r: int, d: int, split: int,
                      block_s: int = 64, num_warps: int = 4, num_stages: int = 3, step: bool = False,
                      parts: int = 0, batch: int = 1):
  """Compiles the decode-attention kernel (kernels/decode_attention.py) for `target` with the constexprs
  jw4a16.attention.decode_attention passes; step=True: the step kernel (rotary and cache writes folded in), as
  jw4a16.attention.decode_attention_step launches it, with parts > 0 on float32 split-K slots of q/k/v for a batch
  of `batch` sequences (its PARTS, SLOT)."""
  from jw4a16.kernels import decode_attention as da  # noqa: PLC0415

  tt = _TT[dtype]
  if step:
    names = ("qkv_ptr", "cos_ptr", "sin_ptr", "k_ptr", "v_ptr", "len_ptr", "lock_ptr", "out_ptr", "k_out_ptr",
             "v_out_ptr", "part_acc_ptr", "part_ml_ptr")
    kernel = da.decode_attention_step_kernel
  else:
    names = ("q_ptr", "k_ptr", "v_ptr", "len_ptr", "lock_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr")
    kernel = da.decode_attention_kernel
  types = {"len_ptr": "*i32", "lock_ptr": "*i32", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32"}
  if parts:
    types["qkv_ptr"] = "*fp32"
  sig = {name: types.get(name, f"*{tt}") for name in names}
  constexprs = dict(S=s, KVH=kvh, R=r, D=d, SCALE=float(d**-0.5), BLOCK_R=da.block_rows(r),
                    BLOCK_S=block_s, SPLIT=split, ROWS=da.step_rows(r))
  if step:
    constexprs |= dict(PARTS=parts, SLOT=batch * (kvh * r + 2 * kvh) * d if parts else 0)
  sig.update({name: "constexpr" for name in constexprs})
  attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
  src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
  options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True)
  return triton.compile(src, target=TARGETS[target], options=options)


def compile_rms_norm(target: str, *, dtype: str = "bfloat16", n: int, has_res: bool):
  """Compiles the RMSNorm kernel (kernels/rms_norm.py) for `target` as jw4a16.norm launches it."""
  from jw4a16.kernels.rms_norm import launch_params, rms_norm_kernel  # noqa: PLC0415

  tt = _TT[dtype]
  names = ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")
  params = launch_params(n)
  constexprs = dict(N=n, EPS=1e-5, BLOCK_N=params["BLOCK_N"], HAS_RES=int(has_res))
  sig = {name: f"*{tt}" for name in names} | {name: "constexpr" for name in constexprs}
  attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
  src = triton.compiler.ASTSource(fn=rms_norm_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
  return triton.compile(src, target=TARGETS[target], options=dict(num_warps=params["num_warps"], num_stages=1))


def compile_dequant(target: str, *, dtype: str = "bfloat16", n: int, k: int, group_size: int, has_zp: bool,
                    block_k: int = 256, zp_bias: int = 8):
  """Compiles the fragment dequantization kernel (kernels/dequant.py) for `target` as
  jw4a16.ops.dequantize_fragment_call launches it."""
  from jw4a16.kernels.dequant import dequant_fragment_kernel  # noqa: PLC0415

  names = ("qweight_ptr", "scales_ptr", "qzeros_ptr", "out_ptr")
  constexprs = dict(N=n, K=k, GROUP_SIZE=group_size, HAS_ZP=has_zp, ZP_BIAS=zp_bias, BLOCK_K=block_k,
                    PTX=int(TARGETS[target].backend == "cuda"))
  sig = dict(zip(names, ("*i32", f"*{_TT[dtype]}", "*i32", f"*{_TT[dtype]}"))) | {c: "constexpr" for c in constexprs}
  attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
  src = triton.compiler.ASTSource(fn=dequant_fragment_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
  return triton.compile(src, target=TARGETS[target], options=dict(num_warps=4, num_stages=1))


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
  """(spill-store bytes, registers a thread) that the ptxas Triton itself picks for this arch reports for the PTX;
  (None, None) where that ptxas cannot be found."""
  try:
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

    ptxas = get_ptxas(arch).path
  except Exception:  # other Triton versions: the tool's location moved
    return None, None
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "k.ptx")
    with open(path, "w") as f:
      f.write(ptx)
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    res = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", path, "-o", os.path.join(d, "k.cubin")],
                         capture_output=True, text=True, check=True)
  found = re.findall(r"(\d+) bytes spill stores", res.stderr)
  regs = re.findall(r"Used (\d+) registers", res.stderr)
  return (sum(int(v) for v in found) if found else 0), (max(int(v) for v in regs) if regs else None)


# Per-SM limits of the NVIDIA targets: registers, warps, resident programs, shared memory a program may use in all
# (the opt-in total, of which the driver reserves 1 KB a program).
_SM_LIMITS = {"sm80": (65536, 64, 32, 164 * 1024), "sm90": (65536, 64, 32, 228 * 1024)}


def programs_per_sm(target: str, registers: int, num_warps: int, shared: int) -> int:
  """How many programs of a kernel fit one SM at once (NVIDIA), limited by registers (allocated per warp in
  units of 256), warps, resident blocks and shared memory.  With the grid's size this says how many waves a
  launch takes, e.g. session 21's 4096x28672 M = 256 pick: 127 registers -> 4 programs, 133 -> 3 (4 warps)."""
  if target not in _SM_LIMITS:
    raise ValueError(f"programs_per_sm: target {target!r} is not one of {sorted(_SM_LIMITS)}")
  regs, warps, blocks, smem = _SM_LIMITS[target]
  per_warp = -(-registers * 32 // 256) * 256
  return min(regs // (per_warp * num_warps), warps // num_warps, blocks, smem // (shared + 1024))


def wgmma_in_flight_at_loop_end(ptx: str) -> bool:
  """Whether some loop of the PTX takes its back edge with wgmma groups still in flight: after the loop body's
  last wgmma.commit_group no `wgmma.wait_group 0` before the branch back.  Where a wgmma reads its A operand from
  registers, the next iteration then rewrites registers an unfinished wgmma reads (undefined in PTX; Triton 3.6
  emits it for a loop-carried accumulator, jw4a16.kernels.w4a16_frag)."""
  lines = ptx.splitlines()
  labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:", line)}
  for j, line in enumerate(lines):
    back = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
    if not back or labels.get(back.group(1), j) >= j:  # not a branch back
      continue
    body = lines[labels[back.group(1)]:j]
    commits = [i for i, text in enumerate(body) if "wgmma.commit_group" in text]
    if commits and not any(re.search(r"wgmma\.wait_group\.sync\.aligned\s+0;", text) for text in body[commits[-1]:]):
      return True
  return False


def _loops(ptx: str):
  """The bodies (lists of lines) of the PTX's loops: from a label to a later branch back to it."""
  lines = ptx.splitlines()
  labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:", line)}
  for j, line in enumerate(lines):
    back = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
    if back and labels.get(back.group(1), j) < j:
      yield lines[labels[back.group(1)]:j]


def _count_in_mma_loops(ptx: str, pattern: str) -> int:
  """Lines matching `pattern` inside the PTX's loops that issue matrix instructions (the K loops; not the split-K
  epilogue's)."""
  return sum(1 for body in _loops(ptx) if any("mma" in text for text in body)
             for text in body if re.search(pattern, text))


def global_loads_in_mma_loops(ptx: str) -> int:
  """ld.global instructions inside the PTX's K loops.  In the frag kernel's K loop every load should be staged
  through shared memory by Triton's pipeliner (cp.async); an ld.global there is waited for in the step that issued
  it."""
  return _count_in_mma_loops(ptx, r"\bld\.global")


def half_splits_in_mma_loops(ptx: str) -> int:
  """cvt.u16.u32 instructions (a 16-bit half cut out of a 32-bit register) inside the PTX's K loops.  The frag
  kernel's unpacking on NVIDIA keeps each LOP3 result whole as a register pair (w4a16_frag._magic_pairs); split into
  halves and joined again, the pairs cost ptxas ~8 byte permutes (PRMT) a word (docs/performance.md, session 20)."""
  return _count_in_mma_loops(ptx, r"\bcvt\.u16\.u32\b")


def tiles_stored_to_shared(ttgir: str) -> int:
  """`ttg.local_alloc`s with a register source in the TTGIR: tensors computed in registers and then written to
  shared memory (the pipeliner's buffers are allocated empty, `local_alloc : ()`, and filled by async copies).  In
  the frag kernel that is the dequantized weight tile leaving the wgmma's register operand for shared memory,
  which the zero points' layout caused on 34 of the H100 table's 82 asymmetric configs (session 11)."""
  return len(re.findall(r"ttg\.local_alloc\s+%", ttgir))


def report(target: str, compiled) -> CompileReport:
  asm = compiled.asm
  if "amdgcn" in asm:
    gcn = asm["amdgcn"]
    spills = sum(int(v) for v in re.findall(r"\.(?:v|s)gpr_spill_count:\s*(\d+)", gcn))
    unit = "v_mfma" if "v_mfma" in gcn else None
    vgprs = re.findall(r"\.vgpr_count:\s*(\d+)", gcn)
    registers = max(int(v) for v in vgprs) if vgprs else None
    in_flight = False
    loop_loads = half_splits = 0
  else:
    ptx = asm["ptx"]
    spills, registers = _ptxas_usage(ptx, TARGETS[target].arch)
    unit = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else None)
    in_flight = wgmma_in_flight_at_loop_end(ptx)
    loop_loads = global_loads_in_mma_loops(ptx)
    half_splits = half_splits_in_mma_loops(ptx)
  return CompileReport(target, compiled.metadata.shared, spills, unit, tuple(asm), in_flight, loop_loads,
                       tiles_stored_to_shared(asm.get("ttgir", "")), half_splits, registers)


def compile_in_subprocess(target: str, jobs: list[dict], timeout: float = 900) -> list[dict]:
  """Runs `main` on `jobs` in a fresh Python process without TRITON_INTERPRET (see main) and returns its reports,
  one dict per job, in order ({"error": ...} for a job that failed to compile)."""
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415

  env = {name: v for name, v in os.environ.items() if name != "TRITON_INTERPRET"}
  res = subprocess.run([sys.executable, "-m", "jw4a16.kernels.compile", target], input=json.dumps(jobs),
                       capture_output=True, text=True, env=env, timeout=timeout)
  if res.returncode != 0:
    raise RuntimeError(f"python -m jw4a16.kernels.compile {target} failed:\n{res.stderr[-3000:]}")
  return [json.loads(line) for line in res.stdout.splitlines()]


def main(argv=None):
  """python -m jw4a16.kernels.compile TARGET < JSON list of jobs: prints one JSON report per job.

  A job is {"meta": {...}} plus compile_kernel's keyword arguments ("n", "k", "group_size", "dtype", "has_zp",
  "num_warps", "num_stages", "amd_options", "kernel", "m_is_one", ...), or {"kernel": "decode_attention"} plus
  compile_attention's, or {"kernel": "rms_norm"} plus compile_rms_norm's.  A separate process, because under
  TRITON_INTERPRET=1 (the CPU test runs) @triton.jit builds interpreter functions that triton.compile cannot take.
  """
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415

  target = (argv or sys.argv[1:])[0]
  for job in json.load(sys.stdin):
    meta = job.pop("meta", None)
    try:
      if job.get("kernel") == "decode_attention":
        job.pop("kernel")
        compiled = compile_attention(target, **job)
      elif job.get("kernel") == "rms_norm":
        job.pop("kernel")
        compiled = compile_rms_norm(target, **job)
      elif job.get("kernel") == "dequant":
        job.pop("kernel")
        compiled = compile_dequant(target, **job)
      else:
        compiled = compile_kernel(target, meta, **job)
      rep = dataclasses.asdict(report(target, compiled))
    except Exception as e:  # reported to the caller, which fails the test with the message
      rep = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(rep), flush=True)


if __name__ == "__main__":
  main()
