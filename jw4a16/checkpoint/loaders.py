"""Hugging Face int4 checkpoint directories -> kernel-layout parameters, streamed tensor by tensor."""

from __future__ import annotations

import pathlib

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jw4a16 import checks
from jw4a16.checkpoint.formats import LINEAR_READERS, MARKER, Scheme
from jw4a16.checkpoint.safetensors_dir import CheckpointError, SafetensorsDir, read_config, set_path
from jw4a16.ops import resolve_packing
from jw4a16.qweight import QuantizedWeight

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def parse_scheme(config: dict, path="") -> Scheme:
  """The quantization scheme of a model config.json (compressed-tensors, GPTQ or AWQ)."""
  qc = config.get("quantization_config")
  if qc is None:
    raise CheckpointError(f"{path}/config.json has no quantization_config: not a quantized checkpoint")
  method = qc.get("quant_method")
  if method == "compressed-tensors":
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") for g in groups.values() if g.get("weights")]
    if not weights:
      raise CheckpointError(f"{path}/config.json: compressed-tensors config without weight quantization")
    w = weights[0]
    if any(x != w for x in weights[1:]):
      raise CheckpointError(f"{path}/config.json: config groups with different weight schemes are not supported")
    fmt = w.get("format") or groups[next(iter(groups))].get("format") or fmt
    if fmt != "pack-quantized":
      raise CheckpointError(f"{path}/config.json: compressed-tensors format {fmt!r} is not supported; "
                            "expected 'pack-quantized' (int4 weights)")
    if w.get("num_bits") != 4 or w.get("type") != "int":
      raise CheckpointError(f"{path}/config.json: weights of {w.get('num_bits')} bits, type {w.get('type')!r}; "
                            "only 4-bit int weights are supported")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
      raise CheckpointError(f"{path}/config.json: quantization strategy {strategy!r} is not supported; "
                            "expected 'group' or 'channel'")
    if w.get("input_activations") or any(g.get("input_activations") for g in groups.values()):
      raise CheckpointError(f"{path}/config.json: quantized activations are not supported (W4A16 only)")
    return Scheme("compressed-tensors", (w.get("group_size") or -1) if strategy == "group" else -1,
                  bool(w.get("symmetric", True)), w.get("actorder"), ignore=tuple(qc.get("ignore") or ()))
  if method == "gptq":
    if qc.get("bits", 4) != 4:
      raise CheckpointError(f"{path}/config.json: GPTQ with {qc.get('bits')} bits is not supported (4 only)")
    return Scheme("gptq", qc.get("group_size", 128), bool(qc.get("sym", True)),
                  "group" if qc.get("desc_act") else None, qc.get("checkpoint_format", "gptq"))
  if method == "awq":
    if qc.get("bits", qc.get("w_bit", 4)) != 4:
      raise CheckpointError(f"{path}/config.json: AWQ with {qc.get('bits')} bits is not supported (4 only)")
    if qc.get("version", "gemm").lower() != "gemm":
      raise CheckpointError(f"{path}/config.json: AWQ version {qc.get('version')!r}; only 'gemm' is supported")
    return Scheme("awq", qc.get("group_size", qc.get("q_group_size", 128)), bool(not qc.get("zero_point", True)))
  raise CheckpointError(f"{path}/config.json: quant_method {method!r} is not supported "
                        "(compressed-tensors, gptq, awq)")


def quantized_prefixes(st: SafetensorsDir, scheme: Scheme) -> list[str]:
  marker = MARKER[scheme.format]
  return sorted(name[: -len(marker)] for name in st.keys() if name.endswith(marker))


def load(path, *, dtype=None, progress: bool = True, packing: str = "gptq"):
  """Loads a quantized Hugging Face directory (format from config.json's quantization_config).

  Returns (params, config, scheme): params is a nested dict keyed by module path ('model' -> 'layers' -> '0' ->
  'self_attn' -> 'q_proj' -> QuantizedWeight, with numpy arrays; float tensors as numpy arrays under their own
  names, e.g. ...['embed_tokens']['weight']; a quantized Linear's bias as '<name>_bias' beside it, e.g.
  ...['self_attn']['q_proj_bias']).  Scales and float tensors are cast to `dtype` (default: the
  config's dtype, else bfloat16).  Tensors are read one at a time.

  packing: the QuantizedWeights' qweight layout: "gptq" (the kernel layout, [K, N // 8]), "fragment" (Hopper's
  operand order, [ceil(N / 64), 8 K]; a layer whose K or group size is not a multiple of 64 raises), or "auto"
  (`jw4a16.preferred_packing` per layer for this process's device, "gptq" where "fragment" cannot hold it).
  """
  if packing not in checks.PACKINGS + ("auto",):
    raise ValueError(f"packing={packing!r} must be 'gptq', 'fragment' or 'auto'")
  path = pathlib.Path(path)
  config = read_config(path)
  scheme = parse_scheme(config, path)
  st = SafetensorsDir(path)
  dtype = dtype or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
  if dtype not in ("bfloat16", "float16"):
    dtype = "bfloat16"
  np_dtype = DTYPES[dtype]
  prefixes = quantized_prefixes(st, scheme)
  if not prefixes:
    raise CheckpointError(f"{path}: no quantized Linear found (no tensor ending in {MARKER[scheme.format]!r})")
  quant_names = {f"{p}.{suffix}" for p in prefixes for suffix in _suffixes(scheme.format)}
  reader = LINEAR_READERS[scheme.format]
  params: dict = {}
  names = [n for n in st.keys() if n not in quant_names]
  bar = tqdm(total=len(prefixes) + len(names), desc=f"loading {path.name}", unit="tensor", disable=not progress)
  for prefix in prefixes:
    w = reader(st, prefix, scheme)
    w = type(w)(w.qweight, w.scales.astype(np_dtype), w.qzeros, w.perm, w.group_size, w.zp_bias)
    set_path(params, prefix, _repack(w, packing, f"{path}: {prefix}"))
    bar.update()
  quantized = set(prefixes)
  for name in names:
    arr = st.get(name)
    if arr.dtype.kind == "f":
      arr = arr.astype(np_dtype)
    if name.endswith(".bias") and name[: -len(".bias")] in quantized:
      name = name[: -len(".bias")] + "_bias"  # a quantized Linear's float bias sits beside its QuantizedWeight
    set_path(params, name, arr)
    bar.update()
  bar.close()
  return params, config, scheme


def repack_params(params: dict, packing: str, where: str = "") -> dict:
  """Every QuantizedWeight in a nested dict (as `load` returns) repacked to `packing` (see `load`); a weight that
  cannot be raises a CheckpointError naming its module path."""
  def walk(node, path):
    if isinstance(node, QuantizedWeight):
      return _repack(node, packing, where + ".".join(path))
    if isinstance(node, dict):
      return {k: walk(v, path + (str(k),)) for k, v in node.items()}
    return node

  return walk(params, ())


def _repack(w, packing: str, where: str):
  try:
    return w.repack(resolve_packing(packing, w.shape[0], w.group_size))
  except ValueError as e:
    raise CheckpointError(f"{where}: {e}") from None


def _suffixes(fmt):
  if fmt == "compressed-tensors":
    return ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
  return ("qweight", "qzeros", "scales", "g_idx")


def load_compressed_tensors(path, **kw):
  """`load` for a compressed-tensors pack-quantized directory (refuses other formats)."""
  scheme = parse_scheme(read_config(path), path)
  if scheme.format != "compressed-tensors":
    raise CheckpointError(f"{path}: quant_method is {scheme.format!r}, not compressed-tensors")
  return load(path, **kw)


def inspect(path) -> dict:
  """Quantization config, layers, shapes and bytes, without reading tensor data."""
  path = pathlib.Path(path)
  config = read_config(path)
  scheme = parse_scheme(config, path)
  st = SafetensorsDir(path)
  prefixes = quantized_prefixes(st, scheme)
  layers = []
  for p in prefixes:
    names = [f"{p}.{s}" for s in _suffixes(scheme.format) if f"{p}.{s}" in st]
    layers.append(dict(name=p, tensors={n.rsplit(".", 1)[1]: st.shape(n) for n in names},
                       bytes=sum(st.nbytes(n) for n in names)))
  quant = {n for layer in layers for n in (f"{layer['name']}.{t}" for t in layer["tensors"])}
  other = sum(st.nbytes(n) for n in st.keys() if n not in quant)
  return dict(scheme=scheme, quantization_config=config["quantization_config"], layers=layers,
              quantized_bytes=sum(layer["bytes"] for layer in layers), float_bytes=other)
