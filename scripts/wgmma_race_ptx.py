"""A minimal Triton kernel with the wgmma race that session 9 found in jw4a16's frag kernel (for a Triton report).

The K loop computes the dot's left operand in registers (`w = load(...).to(bf16) * 2`), and the accumulator is only
read by the next iteration's dot.  Compiled for sm_90 with 16-byte aligned pointers (what torch and jax-triton
declare), Triton 3.6 and 3.9 make the dot asynchronous across iterations: the loop branches back with wgmma
groups in flight (`wgmma.wait_group` > 0 and no `wait_group 0` before the back edge), and the next iteration
rewrites the registers holding their operand A, which PTX leaves undefined.  Without the alignment hint, or with a
use of the accumulator inside the loop (USE=1, jw4a16's fix), the loop waits for them.  No GPU needed:

  python scripts/wgmma_race_ptx.py
"""

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from jw4a16.kernels.compile import wgmma_in_flight_at_loop_end


@triton.jit
def loop_dot(w_ptr, x_ptr, out_ptr, K: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
             USE: tl.constexpr):
  rows = tl.arange(0, BN)
  cols = tl.arange(0, BM)
  ks = tl.arange(0, BK)
  acc = tl.zeros((BN, BM), dtype=tl.float32)
  for k0 in range(0, K, BK):
    w = tl.load(w_ptr + rows[:, None] * K + (k0 + ks)[None, :]).to(tl.bfloat16) * 2  # operand A, in registers
    x = tl.load(x_ptr + (k0 + ks)[:, None] * BM + cols[None, :])
    acc = tl.dot(w, x, acc)
    if USE:
      acc = tl.where(k0 >= 0, acc, 0.0)
  tl.store(out_ptr + rows[:, None] * BM + cols[None, :], acc)


def main():
  sig = {"w_ptr": "*i32", "x_ptr": "*bf16", "out_ptr": "*fp32", "K": "constexpr", "BN": "constexpr",
         "BM": "constexpr", "BK": "constexpr", "USE": "constexpr"}
  for aligned in (True, False):
    for use in (0, 1):
      attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2)} if aligned else {}
      src = triton.compiler.ASTSource(fn=loop_dot, signature=sig, attrs=attrs,
                                      constexprs={"K": 4096, "BN": 128, "BM": 16, "BK": 128, "USE": use})
      ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ptx"]
      waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
      print(f"triton {triton.__version__}, aligned pointers {aligned!s:5}, acc used in the loop {bool(use)!s:5}: "
            f"wgmma in flight at the back edge {wgmma_in_flight_at_loop_end(ptx)!s:5} (wait_group {' '.join(waits)})")


if __name__ == "__main__":
  main()
