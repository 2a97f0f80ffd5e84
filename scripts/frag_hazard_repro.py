"""The frag-kernel configs that gave wrong results on H100 (Triton 3.6) before session 9, launched again.

The cause (session 9, docs/performance.md): with SCALE_W = 1 the accumulator only feeds the next K step's dot,
and Triton 3.6 left that step's wgmmas in flight across the loop's back edge (wgmma.wait_group 7 or 3 inside the
body, none before the branch), while the next step's dequantization rewrote the registers those wgmmas read their
weight operand from.  kernels/w4a16_frag.py now uses the accumulator inside the step, so Triton waits for them;
`jw4a16.kernels.compile.wgmma_in_flight_at_loop_end` finds the pattern in PTX and tests/test_compile.py checks it.

Launches kernels/w4a16_frag.py from torch on fp16 / bf16, symmetric / asymmetric weights with the session-7 config
(BLOCK_M 64, BLOCK_N 128, BLOCK_K 128, 8 warps, 3 stages, SCALE_W 1) and its neighbours, then session 8's (BLOCK_M
16, BLOCK_N 128, BLOCK_K 128, 4 warps, 3 stages, SCALE_W 1, M = 1 on 8192 x 57344 bf16, 20 launches), and prints
each one's relative error against a dequantize-then-matmul reference.  Session 9, same card and lease: before the
change, errors up to 7.5e-2 on session 8's case and 4.4e-1 once on the session-7 neighbour with 8 warps and 4
stages (bf16, M = 131); after it, every error at the bf16 / fp16 rounding level (1.7e-3 / 2.1e-4).
Needs a CUDA GPU and torch; not part of the package or the tests.

  python scripts/frag_hazard_repro.py
"""

import itertools
import sys

import numpy as np
import torch

sys.path.insert(0, "scripts")
from sweep import dequant, make  # noqa: E402

from jw4a16 import layout  # noqa: E402
from jw4a16.kernels.w4a16_frag import w4a16_frag_kernel  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, SCALE_W, warps, stages, PTX): the failing config first
CONFIGS = [(64, 128, 128, 1, 8, 3, 1), (64, 128, 128, 1, 8, 3, 0), (64, 128, 128, 0, 8, 3, 1),
           (64, 128, 128, 1, 4, 3, 1), (64, 128, 128, 1, 8, 2, 1), (64, 128, 128, 1, 8, 4, 1),
           (64, 128, 64, 1, 8, 3, 1), (128, 128, 128, 1, 8, 3, 1), (32, 128, 128, 1, 8, 3, 1)]


def run(x, qf, s, qz, g, cfg):
  bm, bn, bk, sw, warps, stages, ptx = cfg
  m, k = x.shape
  n = s.shape[1]
  grid = (-(-m // bm) * -(-n // bn), 1)
  out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
  scratch = torch.empty((1,), dtype=torch.float32, device="cuda")
  locks = torch.zeros((1,), dtype=torch.int32, device="cuda")
  w4a16_frag_kernel[grid](x, qf, s, s if qz is None else qz, m, locks, out, scratch, N=n, K=k, GROUP_SIZE=g,
                          HAS_ZP=qz is not None, ZP_BIAS=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1,
                          SCALE_W=sw, PTX=ptx, num_warps=warps, num_stages=stages)
  return out


def main():
  for (k, n, g), (dtype, asym) in itertools.product(
      [(256, 1040, 256), (4096, 6144, 128)],
      [(torch.float16, False), (torch.float16, True), (torch.bfloat16, False)]):
    torch.manual_seed(0)
    qw, s, qz = make(k, n, g, dtype, asym)
    w = dequant(qw, s, qz, g).float()
    qf = torch.from_numpy(np.asarray(layout.to_fragment_packed(qw.cpu().numpy()))).cuda()
    for m in (33, 64, 65, 131):
      x = torch.randn(m, k, dtype=dtype, device="cuda")
      ref = x.float() @ w
      errs = [((run(x, qf, s, qz, g, c).float() - ref).norm() / ref.norm()).item() for c in CONFIGS if c[2] <= g]
      print(f"K={k} N={n} G={g} {str(dtype)[6:]} {'asym' if asym else 'sym '} M={m:3d}: " +
            " ".join(f"{e:.1e}" for e in errs), flush=True)
  print("columns:", CONFIGS)
  # session 8: (K, N), M, (BLOCK_M, BLOCK_N, BLOCK_K, SCALE_W, warps, stages, PTX); the failing config first
  for (k, n), m, cfg in [((8192, 57344), 1, (16, 128, 128, 1, 4, 3, 1)), ((8192, 57344), 1, (8, 128, 128, 1, 4, 3, 1)),
                         ((8192, 57344), 1, (16, 128, 128, 0, 4, 3, 1)), ((8192, 57344), 2, (16, 128, 128, 1, 4, 3, 1)),
                         ((4096, 28672), 1, (16, 128, 128, 1, 4, 3, 1))]:
    torch.manual_seed(0)
    qw, s, qz = make(k, n, 128, torch.bfloat16, False)
    w = dequant(qw, s, qz, 128).float()
    qf = torch.from_numpy(np.asarray(layout.to_fragment_packed(qw.cpu().numpy()))).cuda()
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ w
    errs = [((run(x, qf, s, None, 128, cfg).float() - ref).norm() / ref.norm()).item() for _ in range(20)]
    print(f"K={k} N={n} M={m} {cfg}: errors over 20 launches {min(errs):.1e} - {max(errs):.1e}", flush=True)


if __name__ == "__main__":
  main()
