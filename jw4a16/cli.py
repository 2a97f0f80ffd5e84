"""The `jw4a16` command: generate, inspect, convert, doctor, bench, tune."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

DEFAULT_CHECKPOINT = pathlib.Path(__file__).parent / "assets" / "tiny-llama-w4a16"


def cmd_generate(a):
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from jw4a16.models import llama  # noqa: PLC0415
  from jw4a16.ops import resolve_backend  # noqa: PLC0415

  m = llama.load(a.dir, progress=not a.quiet)
  if m.tokenizer is None:
    raise SystemExit(f"{a.dir}: no tokenizer.json; pass token ids with --ids")
  ids = [int(t) for t in a.ids.split(",")] if a.ids else m.tokenizer.encode(a.prompt).ids
  packings = "/".join(sorted({spec[3] for _, spec in m.quant.layers})) or "no"
  print(f"[{pathlib.Path(a.dir).name}: {m.cfg.num_layers} layers, hidden {m.cfg.hidden_size}, "
        f"{len(m.quant.layers)} int4 projections ({packings} packing), {resolve_backend()} path on "
        f"{jax.devices()[0].platform}]", file=sys.stderr)
  print(a.prompt if not a.ids else "", end="", flush=True)
  produced = []
  shown = [0]  # characters printed so far

  def on_token(step, toks):
    del step
    produced.append(int(toks[0]))
    text = m.tokenizer.decode(produced)
    if not text.endswith("\ufffd"):  # a byte-level token may end inside a UTF-8 character: wait for the rest
      print(text[shown[0]:], end="", flush=True)
      shown[0] = len(text)

  key = jax.random.key(a.seed) if a.temperature > 0 else None
  r = m.generate(np.array([ids], np.int32), a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                 top_p=a.top_p, key=key, on_token=on_token,
                 decode_chunk=llama.DECODE_CHUNK if a.decode_chunk is None else a.decode_chunk)
  print()
  print(f"tokens: {r.tokens[0].tolist()}", file=sys.stderr)
  print(f"prefill {r.prefill_tokens_per_s:.1f} tokens/s, decode {r.decode_tokens_per_s:.1f} tokens/s "
        "(first calls include compilation)", file=sys.stderr)


def cmd_inspect(a):
  from jw4a16 import checkpoint  # noqa: PLC0415

  info = checkpoint.inspect(a.dir)
  s = info["scheme"]
  print(f"format {s.format}, group_size {s.group_size}, {'symmetric' if s.symmetric else 'asymmetric'}, "
        f"actorder {s.actorder}, ignore {list(s.ignore)}")
  print(f"{len(info['layers'])} quantized layers, {info['quantized_bytes'] / 1e6:.2f} MB int4 tensors, "
        f"{info['float_bytes'] / 1e6:.2f} MB float tensors")
  for layer in info["layers"]:
    shapes = ", ".join(f"{k} {list(v)}" for k, v in layer["tensors"].items())
    print(f"  {layer['name']}: {shapes} ({layer['bytes'] / 1e3:.1f} kB)")
  if a.json:
    print(json.dumps(info["quantization_config"], indent=1))


def cmd_convert(a):
  from jw4a16 import checkpoint  # noqa: PLC0415
  from jw4a16.checkpoint import verify  # noqa: PLC0415

  params, config, scheme = checkpoint.load(a.src, progress=True)
  checked = verify.check_sample(a.src, params, scheme, count=a.verify)
  print(f"verified {len(checked)} layers against the source's own dequantization: {', '.join(checked)}")
  params = checkpoint.repack_params(params, a.packing, f"{a.src}: ")  # after the check, which reads GPTQ's layout
  out = checkpoint.save(params, a.dst, metadata=dict(source=str(a.src), source_format=scheme.format,
                                                    group_size=scheme.group_size, symmetric=scheme.symmetric,
                                                    actorder=scheme.actorder, config=config))
  print(f"wrote {out}")


def cmd_doctor(a):
  del a
  from jw4a16 import doctor  # noqa: PLC0415

  doctor.main()


def cmd_bench(a):
  from jw4a16 import bench  # noqa: PLC0415

  bench.main(a.rest)


def cmd_tune(a):
  from jw4a16 import bench  # noqa: PLC0415

  bench.tune_main(a.rest)


def main(argv=None):
  p = argparse.ArgumentParser(prog="jw4a16", description="int4-weight matmuls for JAX")
  sub = p.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("generate", help="generate text with a quantized Llama-family checkpoint")
  g.add_argument("dir", nargs="?", default=str(DEFAULT_CHECKPOINT),
                 help="Hugging Face directory (default: the embedded tiny checkpoint)")
  g.add_argument("--prompt", default="int4 weights make")
  g.add_argument("--ids", default=None, help="comma-separated token ids instead of --prompt")
  g.add_argument("--max-new-tokens", type=int, default=32)
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--top-k", type=int, default=None)
  g.add_argument("--top-p", type=float, default=None)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--decode-chunk", type=int, default=None,
                 help="decode steps per call (default: jw4a16.models.llama.DECODE_CHUNK; the text streams a call "
                      "behind; 1: each token as it comes, slower where the host's launches bound the step)")
  g.add_argument("--quiet", action="store_true")
  g.set_defaults(fn=cmd_generate)
  i = sub.add_parser("inspect", help="quantization config, layers, shapes and bytes of a checkpoint")
  i.add_argument("dir")
  i.add_argument("--json", action="store_true", help="also print the quantization_config")
  i.set_defaults(fn=cmd_inspect)
  c = sub.add_parser("convert", help="Hugging Face int4 directory -> jw4a16 Orbax checkpoint (kernel layout)")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--verify", type=int, default=4, help="layers to check against the source's dequantization")
  c.add_argument("--packing", default="gptq", choices=("gptq", "fragment"),
                 help="qweight layout to store: gptq (any GPU) or fragment (Hopper's fastest; K a multiple of 64, "
                 "G one too or 32)")
  c.set_defaults(fn=cmd_convert)
  d = sub.add_parser("doctor", help="platform, versions, which path w4a16_matmul takes and why")
  d.set_defaults(fn=cmd_doctor)
  b = sub.add_parser("bench", help="the W4A16 GEMM benchmark (python -m jw4a16.bench --help)", add_help=False)
  b.add_argument("rest", nargs=argparse.REMAINDER)
  b.set_defaults(fn=cmd_bench)
  t = sub.add_parser("tune", help="tune tile configs for shapes on this GPU into the on-disk cache",
                     add_help=False)
  t.add_argument("rest", nargs=argparse.REMAINDER)
  t.set_defaults(fn=cmd_tune)
  a = p.parse_args(argv)
  a.fn(a)


if __name__ == "__main__":
  main()
