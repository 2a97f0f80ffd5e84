"""Llama-3-8B-shaped decode and prefill throughput: random int4 weights (group 128, symmetric) against the same
model in bf16, built in memory (nothing to download), in one run.

  python -m jw4a16.models.llama_bench [--layers 32] [--out docs/llama_bench.json]

Decode tokens/s at batch 1 and 16, three ways: a step at a time (median time of one jitted decode step that the
host waits for, cache preallocated and donated), pipelined (`--steps` greedy steps, one a call, queued back to
back, the next token sampled inside the step) and as `LlamaModel.generate` runs (`--steps` rounded up to calls of
`llama.DECODE_CHUNK` greedy steps, a lax.scan each, queued back to back); prefill tokens/s at 2048 tokens (batch
1).
Layers unrolled as `load` builds them (--scan: one scanned layer over stacked weights).

The lm_head stays bf16 in the int4 model (variant w4a16), as llm-compressor's recipes leave it (ignore:
[lm_head]); variant w4a16-int4-head has it int4 as well, as a checkpoint that quantized every Linear has it
(torchao's int4 weight-only quantization, the issue's point of comparison, does that by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import launch, tuning
from jw4a16.models.llama import (DECODE_CHUNK, LlamaConfig, LlamaForCausalLM, QuantSpec, decode_loop,
                                 fuse_projections, init_cache, repack_projections)

LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                        rope_scaling=tuple(sorted(dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192).items())))
PROJ = {"self_attn.q_proj": lambda c: (c.hidden_size, c.num_heads * c.head_dim),
        "self_attn.k_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
        "self_attn.v_proj": lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
        "self_attn.o_proj": lambda c: (c.num_heads * c.head_dim, c.hidden_size),
        "mlp.gate_proj": lambda c: (c.hidden_size, c.intermediate_size),
        "mlp.up_proj": lambda c: (c.hidden_size, c.intermediate_size),
        "mlp.down_proj": lambda c: (c.intermediate_size, c.hidden_size)}


def random_params(cfg: LlamaConfig, quantized: bool, key, int4_head: bool = False):
  """Stacked (scan) params on the device: int4 projections (group 128, symmetric) or bf16.  int4_head: the lm_head
  int4 too (with quantized), as a checkpoint that quantized every Linear has it."""
  dt = jnp.bfloat16
  L = cfg.num_layers
  keys = iter(jax.random.split(key, 64))
  layers = {"input_layernorm": {"weight": jnp.ones((L, cfg.hidden_size), dt)},
            "post_attention_layernorm": {"weight": jnp.ones((L, cfg.hidden_size), dt)},
            "self_attn": {}, "mlp": {}}
  for name, shape in PROJ.items():
    k, n = shape(cfg)
    group, proj = name.split(".")
    if quantized:
      p = {"qweight": jax.random.randint(next(keys), (L, k, n // 8), -2**31, 2**31 - 1, jnp.int32),
           "scales": (jax.random.uniform(next(keys), (L, k // 128, n), jnp.float32, 0.0005, 0.002)).astype(dt)}
    else:
      p = {"kernel": (jax.random.normal(next(keys), (L, k, n), dt) * 0.01).astype(dt)}
    layers[group][proj] = p
  embedding = jax.random.normal(next(keys), (cfg.vocab_size, cfg.hidden_size), dt)
  head_key = next(keys)  # drawn either way, so every other weight is the same with and without int4_head
  k, n = cfg.hidden_size, cfg.vocab_size
  if quantized and int4_head:
    lm_head = {"qweight": jax.random.randint(next(keys), (k, n // 8), -2**31, 2**31 - 1, jnp.int32),
               "scales": jax.random.uniform(next(keys), (k // 128, n), jnp.float32, 0.0005, 0.002).astype(dt)}
  else:
    lm_head = {"kernel": jax.random.normal(head_key, (k, n), dt) * 0.01}
  return {"embed_tokens": {"embedding": embedding}, "norm": {"weight": jnp.ones((cfg.hidden_size,), dt)},
          "lm_head": lm_head, "layers": layers}


def unstack(params: dict, num_layers: int) -> dict:
  """Scan params (layers stacked on axis 0) -> one 'layers_i' subtree per layer, as `load` builds them."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


def build(cfg, quantized, key, scan=False, fuse=True, packing="auto", int4_head=False):
  """(module, params on the device) of the random model.  scan=False (as `load` builds models): one set of
  arrays per layer.  scan=True: one compiled layer under lax.scan over stacked arrays, whose per-layer slices XLA
  copies out before each custom call (the Triton kernel) and each bf16 dot: a copy of every weight per step, so
  decode is slower that way.  fuse: q/k/v and gate/up as one matmul each (as `load` builds models), for both
  the int4 and the bf16 model.  packing: the int4 weights' layout, as `load` takes it.  int4_head: the lm_head in
  int4 as well (quantized models only; else it stays bf16, as llm-compressor's recipes usually leave it)."""
  if int4_head and not quantized:
    raise ValueError("int4_head: only for the quantized model (the bf16 model has no int4 weights)")
  prefixes = ["layers"] if scan else [f"layers_{i}" for i in range(cfg.num_layers)]
  quant = (QuantSpec(tuple((f"{p}.{n}", (128, True, False)) for p in prefixes for n in PROJ)
                     + ((("lm_head", (128, True, False)),) if int4_head else ())) if quantized
           else QuantSpec())
  params = random_params(cfg, quantized, key, int4_head)
  if not scan:
    params = unstack(params, cfg.num_layers)
  if fuse:
    params, quant, cfg = fuse_projections(params, quant, cfg)
  if quantized:
    params, quant = repack_projections(params, quant, packing)
  return LlamaForCausalLM(cfg, quant, scan_layers=scan), jax.block_until_ready(params)


VARIANTS = ("w4a16", "w4a16-nogemv", "w4a16-int4-head", "bf16")
WARMUP_STEPS = 3  # decode steps a step-at-a-time measurement leaves out of its median


def measure(cfg, quantized, batches, steps, prefill_len, key, scan=False, fuse=True, packing="auto",
            int4_head=False):
  """Decode and prefill timings of `build(cfg, quantized, key, scan, fuse, packing, int4_head)`."""
  model, params = build(cfg, quantized, key, scan, fuse, packing, int4_head)
  cfg = model.cfg
  step = jax.jit(lambda p, ids, cache, i: model.apply({"params": p}, ids, cache, i), donate_argnums=(2,))

  def greedy_fn(p, tok, cache, i):
    logits, cache = model.apply({"params": p}, tok[:, None], cache, i)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  greedy = jax.jit(greedy_fn, donate_argnums=(2,))

  chunk = jax.jit(lambda p, tok, cache, i: decode_loop(lambda *a: greedy_fn(p, *a), tok, cache, i, DECODE_CHUNK),
                  donate_argnums=(2,))  # as LlamaModel._decode_steps: DECODE_CHUNK greedy steps in one call
  res = {"weights_GB": sum(a.nbytes for a in jax.tree.leaves(params)) / 1e9}
  for b in batches:
    cache = init_cache(cfg, b, max(256, -(-(2 * steps + 2 + 2 * DECODE_CHUNK) // 128) * 128))
    ids = jnp.ones((b, 1), jnp.int32)
    t0 = time.perf_counter()
    logits, cache = step(params, ids, cache, np.int32(0))
    logits.block_until_ready()
    res[f"decode_compile_s_b{b}"] = time.perf_counter() - t0
    times = []
    for i in range(1, steps + 1):
      t0 = time.perf_counter()
      logits, cache = step(params, ids, cache, np.int32(i))
      logits.block_until_ready()
      times.append(time.perf_counter() - t0)
    med = statistics.median(times[WARMUP_STEPS:])
    res[f"decode_ms_b{b}"] = med * 1e3
    res[f"decode_tokens_per_s_b{b}"] = b / med
    # As LlamaModel.generate runs: greedy sampling inside the step, each step queued before the last one ends, the
    # step traced with generate's launcher (launch.decode_launcher() unless $JW4A16_LAUNCHER says otherwise).
    tok = jnp.ones((b,), jnp.int32)
    with launch.use_launcher(launch.decode_launcher()):
      tok, cache = greedy(params, tok, cache, np.int32(0))
      tok.block_until_ready()
      t0 = time.perf_counter()
      for i in range(1, steps + 1):
        tok, cache = greedy(params, tok, cache, np.int32(i))
      tok.block_until_ready()
    per_step = (time.perf_counter() - t0) / steps
    res[f"decode_pipelined_ms_b{b}"] = per_step * 1e3
    res[f"decode_pipelined_tokens_per_s_b{b}"] = b / per_step
    calls = -(-steps // DECODE_CHUNK)
    with launch.use_launcher(launch.decode_launcher()):
      toks, tok, cache = chunk(params, tok, cache, np.int32(steps + 1))
      toks.block_until_ready()
      t0 = time.perf_counter()
      for c in range(calls):
        toks, tok, cache = chunk(params, tok, cache, np.int32(steps + 1 + DECODE_CHUNK * (c + 1)))
      toks.block_until_ready()
    per_step = (time.perf_counter() - t0) / (calls * DECODE_CHUNK)
    res[f"decode_generate_ms_b{b}"] = per_step * 1e3
    res[f"decode_generate_tokens_per_s_b{b}"] = b / per_step
    del cache
  cache = init_cache(cfg, 1, prefill_len)
  ids = jnp.ones((1, prefill_len), jnp.int32)
  logits, cache = step(params, ids, cache, np.int32(0))
  logits.block_until_ready()
  times = []
  for _ in range(5):
    cache = init_cache(cfg, 1, prefill_len)
    t0 = time.perf_counter()
    logits, cache = step(params, ids, cache, np.int32(0))
    logits.block_until_ready()
    times.append(time.perf_counter() - t0)
  res["prefill_tokens_per_s"] = prefill_len / statistics.median(times)
  return res


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--steps", type=int, default=40,
                 help=f"decode steps per batch size (the first {WARMUP_STEPS} are warm-up, not timed)")
  p.add_argument("--prefill", type=int, default=2048)
  p.add_argument("--out", default=None)
  p.add_argument("--scan", action="store_true", help="scanned layers over stacked weights (default: unrolled)")
  p.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up matmuls (default: fused)")
  p.add_argument("--batches", default="1,16", help="decode batch sizes")
  p.add_argument("--packing", default="auto", choices=("auto", "gptq", "fragment"),
                 help="the int4 weights' layout (default: the fastest for this device)")
  p.add_argument("--variants", default="w4a16,w4a16-int4-head,bf16",
                 help="comma list of w4a16, w4a16-nogemv (the dispatcher without the gemv kernel), w4a16-int4-head "
                      "(the lm_head int4 as well), bf16")
  a = p.parse_args(argv)
  if a.steps <= WARMUP_STEPS:
    p.error(f"--steps={a.steps}: at least {WARMUP_STEPS + 1} are needed (the first {WARMUP_STEPS} steps are warm-up, "
            "not timed)")
  cfg = dataclasses.replace(LLAMA3_8B, num_layers=a.layers)
  out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "layers": a.layers, "scan": a.scan,
         "fused": not a.no_fuse, "packing": a.packing}
  for name in a.variants.split(","):
    if name not in VARIANTS:
      raise SystemExit(f"--variants: unknown {name!r}")
    # the dispatcher reads the variable when the model is traced, inside measure
    with mock.patch.dict(os.environ, {tuning.DISABLE_ENV: "gemv"} if name == "w4a16-nogemv" else {}):
      out[name] = measure(cfg, name != "bf16", tuple(int(b) for b in a.batches.split(",")), a.steps, a.prefill,
                          jax.random.key(0), scan=a.scan, fuse=not a.no_fuse, packing=a.packing,
                          int4_head=name == "w4a16-int4-head")
    print(name, json.dumps(out[name]), flush=True)
  for name in out:
    if name.startswith("w4a16") and "bf16" in out:
      for label, key in (("a step at a time", "decode_tokens_per_s_b1"),
                         ("pipelined, a step a call", "decode_pipelined_tokens_per_s_b1"),
                         (f"as generate runs, {DECODE_CHUNK} steps a call", "decode_generate_tokens_per_s_b1")):
        r = out[name][key] / out["bf16"][key]
        print(f"batch-1 decode ({label}): {name} {out[name][key]:.0f} tokens/s, bf16 {out['bf16'][key]:.0f} "
              f"tokens/s ({r:.2f}x)")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
