"""Decode attention (one query position, Llama-3-8B heads: 32 query heads, 8 kv heads, head_dim 128) on the GPU:
the Triton kernel (jw4a16.attention.decode_attention) against the jnp reference that XLA compiles, GPU time per
layer (jw4a16.profiling: device events of a profiler trace, median of 10 calls over L layers' caches).

  python scripts/attention_bench.py                  # kernel (today's defaults) vs jnp, B 1 / 16, S 256 - 8192
  python scripts/attention_bench.py --sweep          # kernel variants: block_s, warps, stages, split

Session 13's figures (docs/performance.md) were made this way.  Needs a GPU with jax-triton.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import attention, ops, profiling

H, KVH, D = 32, 8, 128
VARIANTS = ((64, 4, 3), (64, 4, 2), (128, 4, 2), (128, 8, 2), (32, 4, 2), (64, 8, 2))  # block_s, warps, stages


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--cases", default="1x256x0.98,1x2048x1,1x8192x1,16x256x0.98,16x2048x1,16x8192x1",
                 help="BxSxF: batch, cache length, filled fraction (the valid length is S * F)")
  a = p.parse_args(argv)
  L, dt = a.layers, jnp.bfloat16
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for case in a.cases.split(","):
    b, s, frac = case.split("x")
    b, s, n = int(b), int(s), int(int(s) * float(frac))
    caches = [(jax.random.normal(jax.random.key(2 * i), (b, s, KVH, D), dt),
               jax.random.normal(jax.random.key(2 * i + 1), (b, s, KVH, D), dt)) for i in range(L)]
    qs = jax.random.normal(jax.random.key(0), (L, b, H, D), dt)
    lengths = jnp.full((b,), n, jnp.int32)
    ref = jax.jit(lambda qs, caches, i: [attention.attention_reference(qs[l][:, None], *caches[l], i)[:, 0]
                                         for l in range(L)])
    want = np.asarray(jnp.stack(ref(qs, caches, np.int32(n - 1))), np.float32)
    ref_us = profiling.device_us(ref, (qs, caches, np.int32(n - 1))) / L
    variants = VARIANTS if a.sweep else VARIANTS[:1]
    rows = []
    for bs, nw, st in variants:
      base = attention.split_for(b, KVH, s, ops.current_target().num_sms, bs)
      for split in sorted({max(1, base // 4), base, min(attention.SPLIT_MAX, base * 4)}) if a.sweep else [base]:
        f = jax.jit(lambda qs, caches, lens, bs=bs, nw=nw, st=st, split=split: [
            attention.decode_attention(qs[l], *caches[l], lens, split=split, block_s=bs, num_warps=nw,
                                       num_stages=st) for l in range(L)])
        err = np.abs(np.asarray(jnp.stack(f(qs, caches, lengths)), np.float32) - want).max()
        rows.append((profiling.device_us(f, (qs, caches, lengths)) / L, bs, nw, st, split, split == base, err))
    rows.sort()
    print(f"B={b:2d} S={s:5d} length={n:5d}: jnp {ref_us:7.2f} us a layer", flush=True)
    for us, bs, nw, st, split, is_base, err in rows[:6]:
      print(f"   kernel {us:7.2f} us ({ref_us / us:4.2f}x)  block_s {bs:3d} warps {nw} stages {st} split {split:2d}"
            f"{' (split_for)' if is_base else ''}  max |diff| vs jnp {err:.1e}", flush=True)


if __name__ == "__main__":
  main()
