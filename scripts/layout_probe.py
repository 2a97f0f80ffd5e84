"""Probe for the next kernel layout: does the dequantized weight tile reach Hopper's wgmma without a layout
conversion?  Compiles a minimal swapped W4A16 loop (out^T [BN, BM] = (128 + q)^T-tile @ x^T, no scales) for sm_90
in three packings of the weights along K, prints what its TTGIR converts inside the loop and the loop's SASS
instruction mix, and checks each packing's result in Triton's CPU interpreter.  No GPU needed; not part of the
package (the kernels use GPTQ's packing along N).

  python scripts/layout_probe.py

Packings, per row n of W^T and per 64 values of k (8 words):
  0  "sequential": word j holds k = 8j .. 8j + 7, nibble i = k - 8j
  1  "fragment": word 2c + h holds the k that thread column c of a wgmma register operand holds,
     k = 16 q + 8 h + 2 c + p at nibble 2 q + p (q < 4, p < 2)
  2  "fragment, pairs 16 bits apart": the same words, k = 16 q + 8 h + 2 c + p at nibble q + 4 p, so one shift and
     one LOP ((w >> 4q) & 0x000F000F | 0x43004300) make both bf16 values of a register pair
"""

import os
import re
import subprocess
import sys

import numpy as np
import triton
import triton.language as tl

K, BN, BK, BM = 4096, 64, 64, 16


@triton.jit
def _halves(v):
  """bf16 values of the low and high 16 bits of int32 v, joined along a new minor dim."""
  return tl.join(v.to(tl.int16).to(tl.bfloat16, bitcast=True), (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True))


@triton.jit
def _fragment_order(t, BN: tl.constexpr, BK: tl.constexpr):
  """[BN, BK / 8, p, q0, q1] (word j = 2c + h per 64 k) -> [BN, BK] in k = 16 q + 8 h + 2 c + p order."""
  t = tl.reshape(t, (BN, BK // 64, 4, 2, 2, 2, 2))  # [n, block, c, h, p, q0, q1]
  return tl.reshape(tl.permute(t, (0, 1, 6, 5, 3, 2, 4)), (BN, BK))  # [n, block, q1, q0, h, c, p]


@triton.jit
def probe_kernel(w_ptr, x_ptr, o_ptr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                 PACKING: tl.constexpr):
  rn = tl.program_id(0) * BN + tl.arange(0, BN)
  acc = tl.zeros((BN, BM), dtype=tl.float32)
  for k0 in range(0, K, BK):
    words = tl.load(w_ptr + rn[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, :])
    if PACKING == 2:
      b0 = _halves((words & 0x000F000F) | 0x43004300)
      b1 = _halves(((words >> 4) & 0x000F000F) | 0x43004300)
      b2 = _halves(((words >> 8) & 0x000F000F) | 0x43004300)
      b3 = _halves(((words >> 12) & 0x000F000F) | 0x43004300)
      w = _fragment_order(tl.join(tl.join(b0, b1), tl.join(b2, b3)), BN, BK)
    else:
      p0, p1, p2, p3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
      p4, p5, p6, p7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
      if PACKING == 0:
        t = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
        q = tl.reshape(t, (BN, BK))
      else:
        t = tl.join(tl.join(tl.join(p0, p1), tl.join(p2, p3)), tl.join(tl.join(p4, p5), tl.join(p6, p7)))
        q = _fragment_order(t, BN, BK)
      w = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    x = tl.load(x_ptr + tl.arange(0, BM)[None, :] * K + (k0 + tl.arange(0, BK))[:, None])  # x^T [BK, BM]
    acc += tl.dot(w, x)
  tl.store(o_ptr + rn[:, None] * BM + tl.arange(0, BM)[None, :], acc)


def pack(q, packing):
  """Logical nibbles q [N, K] -> int32 words [N, K // 8] in the given packing."""
  n, k = q.shape
  kk = np.arange(k)
  if packing == 0:
    word, nib = kk // 8, kk % 8
  else:
    blk, r = kk // 64, kk % 64
    qq, h, c, p = r // 16, (r // 8) % 2, (r // 2) % 4, r % 2
    word, nib = blk * 8 + 2 * c + h, (2 * qq + p) if packing == 1 else (qq + 4 * p)
  out = np.zeros((n, k // 8), np.uint64)
  np.add.at(out, (slice(None), word), q.astype(np.uint64) << (4 * nib).astype(np.uint64))
  return out.astype(np.uint32).view(np.int32)


def compile_report(packing):
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415

  sig = {"w_ptr": "*i32", "x_ptr": "*bf16", "o_ptr": "*fp32", **{c: "constexpr" for c in ("K", "BN", "BK", "BM",
                                                                                          "PACKING")}}
  src = triton.compiler.ASTSource(fn=probe_kernel, signature=sig,
                                  constexprs=dict(K=K, BN=BN, BK=BK, BM=BM, PACKING=packing),
                                  attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2)})
  c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
  loop = c.asm["ttgir"].split("scf.for")[1].split("scf.yield")[0]
  converts = loop.count("ttg.convert_layout") + loop.count("ttg.local_alloc %")
  from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

  cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
  path = f"/tmp/layout_probe_{packing}.cubin"
  with open(path, "wb") as f:
    f.write(c.asm["cubin"])
  sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
  lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
  addr = [int(re.search(r"/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
  back = [(int(t.group(1), 16), a) for ln, a in zip(lines, addr)
          if "BRA" in ln and (t := re.search(r"0x([0-9a-f]+)", ln.split("BRA")[1])) and int(t.group(1), 16) < a]
  lo, hi = max(back, key=lambda b: b[1] - b[0])
  ops = {}
  for ln, a in zip(lines, addr):
    if lo <= a <= hi:
      op = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln).group(1)
      ops[op] = ops.get(op, 0) + 1
  return converts, ops


def check_interpreted(packing):
  """The packing's result against (128 + q) @ x^T in the interpreter (run in a child: TRITON_INTERPRET=1)."""
  code = ("import sys; sys.path[:0] = [%r, %r]; import numpy as np, torch, layout_probe as p\n"
          "from tests.interpret import patch_interpreter; patch_interpreter()\n"
          "rng = np.random.default_rng(0); q = rng.integers(0, 16, (p.BN, 128))\n"
          "x = torch.randn(p.BM, 128).to(torch.bfloat16); out = torch.zeros(p.BN, p.BM)\n"
          "p.probe_kernel[(1,)](torch.tensor(p.pack(q, %d)), x, out, K=128, BN=p.BN, BK=p.BK, BM=p.BM, PACKING=%d)\n"
          "ref = (q + 128.0) @ x.float().numpy().T; print(abs(out.numpy() - ref).max() / abs(ref).max())"
          % (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             packing, packing))
  env = dict(os.environ, TRITON_INTERPRET="1")
  return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.split()[-1])


def main():
  for packing in (0, 1, 2):
    converts, ops = compile_report(packing)
    top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    print(f"packing {packing}: layout conversions in the loop {converts}; loop SASS {sum(ops.values())} "
          f"instructions ({top}); interpreter rel. error {check_interpreted(packing):.1e}", flush=True)


if __name__ == "__main__":
  main()
