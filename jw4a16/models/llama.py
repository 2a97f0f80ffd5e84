"""A Llama / Mistral / Qwen2-style decoder in Flax whose quantized projections run through W4A16Dense.

  m = jw4a16.models.llama.load("path/to/compressed-tensors-dir")
  logits = m(input_ids)                                  # int32 [B, T] -> float32 [B, T, vocab]
  out = m.generate(input_ids, max_new_tokens=32)         # greedy; temperature / top_k / top_p with key=

Numerics follow Hugging Face transformers' eager Llama in the checkpoint dtype (bf16 activations, RMSNorm and
softmax in fp32, rotary tables cast to the activation dtype), so logits match it to bf16 rounding.  Generation
compiles one prefill and one decode step (the KV cache is preallocated, the position is a traced scalar), so no
step recompiles.  Prompts in a batch share one length (no padding).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jw4a16 import launch, ops
from jw4a16.attention import apply_rope, attention, attention_step, split_qkv, write_cache
from jw4a16.linen import W4A16Dense
from jw4a16.norm import rms_norm
from jw4a16.qweight import QuantizedWeight
from jw4a16.quantize import layer_params
from jw4a16.reference import residual_sum, rms_norm_from_ssq, sum_partials, sum_squares


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # sorted (key, value) items of the HF rope dict, hashable for jit
  tensor_parallel: str | None = None  # mesh axis that int4 projections are split over (jw4a16.sharding)
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: q/k/v biases
  mlp_bias: bool = False
  dtype: str = "bfloat16"
  # One matmul for q, k and v ([q | k | v] along N, params 'qkv_proj') and one for gate and up ('gate_up_proj'):
  # fewer, wider launches.  `fuse_projections` turns a checkpoint's separate params into these.
  fuse_qkv: bool = False
  fuse_gate_up: bool = False

  @classmethod
  def from_hf(cls, c: dict) -> LlamaConfig:
    arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
    if not any(a in arch for a in ("Llama", "Mistral", "Qwen2")):
      raise ValueError(f"config.json architecture {arch!r}: expected a Llama, Mistral or Qwen2 decoder")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
      raise ValueError(f"rope type {kind!r} is not supported (default, linear, llama3)")
    heads = c["num_attention_heads"]
    dtype = c.get("dtype") or c.get("torch_dtype") or "bfloat16"
    return cls(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
               num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
               head_dim=c.get("head_dim") or c["hidden_size"] // heads, rms_norm_eps=c.get("rms_norm_eps", 1e-5),
               rope_theta=float(theta), rope_scaling=tuple(sorted(rope.items())) if kind != "default" else None,
               max_position_embeddings=c.get("max_position_embeddings", 4096),
               tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
               attention_bias=bool(c.get("attention_bias", "Qwen2" in arch)), mlp_bias=bool(c.get("mlp_bias", False)),
               dtype=dtype if dtype in ("bfloat16", "float16") else "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which projections are int4 and how: module paths like 'layers_0.self_attn.q_proj' -> (group_size,
  symmetric, act_order) or (group_size, symmetric, act_order, packing) (packing "gptq" when absent)."""

  layers: tuple[tuple[str, tuple], ...] = ()

  def get(self, path: str):
    return dict(self.layers).get(path)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if cfg.rope_scaling is None:
    return inv.astype(np.float32)
  r = dict(cfg.rope_scaling)
  kind = r.get("rope_type", r.get("type"))
  factor = r["factor"]
  if kind == "linear":
    return (inv / factor).astype(np.float32)
  low, high, old = r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


class RMSNorm(nn.Module):
  """transformers' LlamaRMSNorm (the Triton kernel where it runs, jw4a16.norm); the model's final norm."""

  eps: float
  allow_kernel: bool = True

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones_init(), (x.shape[-1],), x.dtype)
    return rms_norm(x, w, self.eps, allow_kernel=self.allow_kernel)


class NormWeight(nn.Module):
  """An RMSNorm's weight (params '<name>/weight', as RMSNorm's) for a norm that the next projection applies."""

  features: int
  dtype: Any

  @nn.compact
  def __call__(self):
    return self.param("weight", nn.initializers.ones_init(), (self.features,), self.dtype)


def folds_norms(cfg: LlamaConfig) -> bool:
  """Whether the layers' norms and residual adds run inside the int4 projections (w4a16_matmul's norm_weight and
  residual): hidden sizes in whole 64-column blocks, no tensor parallelism (a row-parallel projection adds its
  residual after the psum)."""
  return cfg.hidden_size % 64 == 0 and cfg.tensor_parallel is None


def project(layer, x, norm=None, residual=None, residual_norm_weight=None, *, fold: bool, partials: bool = False):
  """layer(x), with norm = (weight, eps, ssq) of x normalized first (fold only; weight None: x is h times the
  weight already, only its rows are scaled), and with a residual, (h, ssq, hg) = (y + residual, its sums of squares
  per 64 columns, h * residual_norm_weight), the last two None unless fold.  A W4A16Dense folds all of it into its
  kernel (fold); a dense layer gets it in jnp.  partials (a W4A16Dense that folds, no residual; `takes_slots`):
  float32 split-K slots [S, ..., N] of the output, which the caller sums (reference.sum_partials)."""
  if fold and isinstance(layer, W4A16Dense):
    kw = {} if norm is None else dict(norm_weight=norm[0], norm_eps=norm[1], norm_ssq=norm[2])
    if residual is None:
      return layer(x, partials=partials, **kw)
    out = layer(x, residual=residual, residual_norm_weight=residual_norm_weight, **kw)
  else:
    if partials:
      raise ValueError("partials: only a W4A16Dense that folds the norms returns split-K slots (takes_slots)")
    y = layer(x if norm is None else rms_norm_from_ssq(x, *norm))
    if residual is None:
      return y
    out = residual_sum(y, residual, residual_norm_weight) if fold else (y + residual, None)
  return out if len(out) == 3 else (*out, None)


def norm_input(h, hg, norm, cfg: LlamaConfig):
  """(x, norm) for `project` of the projections after the norm (weight, eps, ssq) of h: where the norms are not
  folded (folds_norms), the normalized h and None; where the previous projection wrote hg = h times the weight,
  hg and (None, eps, ssq): only the rows' scale is left (the kernel's NORM = 2, its K loop plain); else h and the
  norm, applied in the kernel's K loop (NORM = 1)."""
  if not folds_norms(cfg):
    return rms_norm(h, norm[0], norm[1], allow_kernel=cfg.tensor_parallel is None), None
  if hg is not None:
    return hg, (None, *norm[1:])
  return h, norm


def takes_slots(layer, fold: bool, t: int) -> bool:
  """Whether `project` hands a decode step's (t = 1) output over as split-K slots (w4a16_matmul's partials) that
  the next op sums as it reads them (the attention kernel, the SwiGLU fusion): an int4 layer that folds the norms.
  On the frag kernel that drops the wait of each tile's last program for the other splits' partials (1.2 - 1.9 us
  a launch on H100 at M = 1, docs/performance.md, session 17); elsewhere the slot is the output itself."""
  return t == 1 and fold and isinstance(layer, W4A16Dense)


def prescales_norm(quant: QuantSpec, prefix: str, cfg: LlamaConfig) -> bool:
  """Whether the MLP at `prefix` takes its input as h times the norm weight from o_proj (residual_norm_weight)
  and applies only the norm's row scale: where its gate/up run the frag kernel (packing "fragment" on the Triton
  path), whose K loop then stays plain.  The product's rounding differs from transformers' order (the weight
  times the normalized row rounded to the dtype) by a bf16 ulp here and there, so the reference path keeps that
  order (the CPU tests compare greedy tokens with transformers', and either packing gives the same logits)."""
  names = ("gate_up_proj",) if cfg.fuse_gate_up else ("gate_proj", "up_proj")
  return _frag_folds(quant, cfg, [f"{prefix}.mlp.{n}" for n in names])


def prescales_input_norm(quant: QuantSpec, prefix: str, cfg: LlamaConfig) -> bool:
  """Whether the attention at `prefix` takes its input as h times its input norm's weight, written by the previous
  layer's down_proj (residual_norm_weight), and applies only the norm's row scale (the kernel's NORM = 2, its K
  loop plain; NORM = 1 normalizes each x tile in the loop, ~0.7 us more a launch on H100 at M = 1, session 16):
  where its q/k/v run the frag kernel, as prescales_norm for the MLP."""
  names = ("qkv_proj",) if cfg.fuse_qkv else ("q_proj", "k_proj", "v_proj")
  return _frag_folds(quant, cfg, [f"{prefix}.self_attn.{n}" for n in names])


def _frag_folds(quant: QuantSpec, cfg: LlamaConfig, paths) -> bool:
  """Whether the projections at `paths` all fold the norms into the frag kernel: int4 with packing "fragment" on
  the Triton path."""
  specs = [quant.get(p) for p in paths]
  return (folds_norms(cfg) and ops.resolve_backend() == "triton"
          and all(sp is not None and len(sp) > 3 and sp[3] == "fragment" for sp in specs))


# Megatron-style split of each block over the tensor-parallel axis: q/k/v and gate/up split their outputs
# (heads, intermediate), o/down their inputs, so a block needs one psum after o_proj and one after down_proj.
# Fused projections split their (concatenated) outputs too: correct under shard_map, as each device computes its
# own contiguous columns of [q | k | v], and the split after the matmul works on the global array.
PARALLEL = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "gate_proj": "column", "up_proj": "column",
            "qkv_proj": "column", "gate_up_proj": "column", "o_proj": "row", "down_proj": "row"}


def projection(quant: QuantSpec, path: str, features: int, bias: bool, dtype, name: str, tp: str | None = None):
  spec = quant.get(path)
  if spec is None:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)
  g, sym, act, *packing = spec
  return W4A16Dense(features, group_size=g, symmetric=sym, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    act_order=act, name=name, parallel=PARALLEL.get(name) if tp else None,
                    parallel_axis=tp or "tp", packing=packing[0] if packing else "gptq")


class Attention(nn.Module):
  """cache: this layer's (k, v), each [B, S, KVH, D].  The new keys and values are written at `index` in place
  (a donated cache is never copied) and the attention dots read those same buffers: a slice of one stacked
  [L, 2, ...] cache, as before, cost XLA a copy of the layer's keys and of its values every step."""

  cfg: LlamaConfig
  quant: QuantSpec
  prefix: str

  @nn.compact
  def __call__(self, h, cos, sin, cache, index, norm, next_norm_weight, hg=None):
    """h [B, T, hidden] the hidden state, norm (weight, eps, ssq) its input_layernorm, next_norm_weight the
    post_attention_layernorm's (or None), hg h times norm's weight (or None) -> ((h + attention, its ssq, that
    times next_norm_weight or None), cache)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, _ = h.shape
    heads, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    allow_kernel = cfg.tensor_parallel is None  # a custom call would gather arrays that GSPMD shards
    p = lambda n, f, bias: projection(self.quant, f"{self.prefix}.{n}", f, bias, dt, n,  # noqa: E731
                                      cfg.tensor_parallel)
    fold = folds_norms(cfg)
    h_in, norm = norm_input(h, hg, norm, cfg)  # one norm for q, k, v where it is not folded
    if cfg.fuse_qkv:
      layer = p("qkv_proj", (heads + 2 * kvh) * d, cfg.attention_bias)
      slots = takes_slots(layer, fold, t)  # the attention kernel sums them as it loads q, k, v
      qkv = project(layer, h_in, norm, fold=fold, partials=slots)
      if not slots:
        q, k, v = split_qkv(qkv, heads, kvh, d)
    else:
      qkv = None
      q, k, v = (project(p(n, f * d, cfg.attention_bias), h_in, norm, fold=fold).reshape(b, t, f, d)
                 for n, f in (("q_proj", heads), ("k_proj", kvh), ("v_proj", kvh)))
    if t == 1:  # a decode step: rotary, cache writes and attention in one call (one kernel where it runs)
      if qkv is None:
        qkv = jnp.concatenate([a.reshape(b, t, -1) for a in (q, k, v)], axis=-1)
      out, k_cache, v_cache = attention_step(qkv[..., 0, :], cos.reshape(d), sin.reshape(d), *cache, index,
                                             allow_kernel=allow_kernel)
      out = out[:, None]
    else:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      k_cache, v_cache = write_cache(cache[0], k, index), write_cache(cache[1], v, index)
      out = attention(q, k_cache, v_cache, index, allow_kernel=allow_kernel)
    out = project(p("o_proj", cfg.hidden_size, False), out.reshape(b, t, heads * d), residual=h,
                  residual_norm_weight=next_norm_weight, fold=fold)
    return out, (k_cache, v_cache)


class MLP(nn.Module):
  cfg: LlamaConfig
  quant: QuantSpec
  prefix: str

  @nn.compact
  def __call__(self, h, hg, norm, next_norm_weight=None):
    """h the hidden state, hg h times norm's weight (or None), norm (weight, eps, ssq) its
    post_attention_layernorm, next_norm_weight the next layer's input_layernorm weight (or None) -> (h + mlp, its
    ssq, that times next_norm_weight or None)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    p = lambda n, f: projection(self.quant, f"{self.prefix}.{n}", f, cfg.mlp_bias, dt, n,  # noqa: E731
                                cfg.tensor_parallel)
    fold = folds_norms(cfg)
    h_in, norm = norm_input(h, hg, norm, cfg)
    if cfg.fuse_gate_up:
      layer = p("gate_up_proj", 2 * cfg.intermediate_size)
      slots = takes_slots(layer, fold, h.shape[-2])  # summed in the SwiGLU multiply's fusion
      gate_up = project(layer, h_in, norm, fold=fold, partials=slots)
      gate, up = jnp.split(sum_partials(gate_up, dt) if slots else gate_up, 2, axis=-1)
    else:
      gate, up = (project(p(n, cfg.intermediate_size), h_in, norm, fold=fold) for n in ("gate_proj", "up_proj"))
    return project(p("down_proj", cfg.hidden_size), nn.silu(gate) * up, residual=h,
                   residual_norm_weight=next_norm_weight, fold=fold)


class Block(nn.Module):
  """carry = (h, ssq): the hidden state and its sums of squares per 64 columns (reference.sum_squares; None where
  the norms are not folded, folds_norms).  Each residual add runs inside the projection before it (residual),
  which also leaves the squares of its output for the next norm, and each norm inside the projection after it: a
  decode step runs no norm kernels between its matmuls.  o_proj also writes h times the post-attention norm's
  weight (residual_norm_weight), so gate/up only scale their rows (the kernel's NORM = 2, its K loop untouched);
  down_proj likewise writes h times the next layer's input norm weight where the model hands it over
  (next_input_norm; carry[2], else None), else q/k/v normalize their x tiles in the K loop (NORM = 1)."""

  cfg: LlamaConfig
  quant: QuantSpec
  prefix: str

  @nn.compact
  def __call__(self, carry, cos, sin, cache, index, next_input_norm=None):
    h, ssq, hg = carry
    cfg = self.cfg
    eps, dt = cfg.rms_norm_eps, jnp.dtype(cfg.dtype)
    w_in = NormWeight(cfg.hidden_size, dt, name="input_layernorm")()
    w_post = NormWeight(cfg.hidden_size, dt, name="post_attention_layernorm")()
    (h, ssq, hg), cache = Attention(cfg, self.quant, f"{self.prefix}.self_attn", name="self_attn")(
        h, cos, sin, cache, index, (w_in, eps, ssq), w_post if prescales_norm(self.quant, self.prefix, cfg) else None,
        hg)
    return MLP(cfg, self.quant, f"{self.prefix}.mlp", name="mlp")(h, hg, (w_post, eps, ssq), next_input_norm), cache


class LlamaForCausalLM(nn.Module):
  """input_ids int32 [B, T], cache (init_cache's: L pairs (k, v), each [B, S, KVH, D]; or None), index (first
  position) -> (float32 logits [B, T, vocab], new cache)."""

  cfg: LlamaConfig
  quant: QuantSpec = QuantSpec()
  scan_layers: bool = False  # one scanned Block with params stacked on axis 0 (quant paths 'layers.*')

  @nn.compact
  def __call__(self, input_ids, cache=None, index=0):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t = input_ids.shape
    if cache is None:
      cache = init_cache(cfg, b, t)
    check_cache(cfg, cache, b, int(index) if isinstance(index, (int, np.integer)) else None, t)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt, name="embed_tokens")
    x = embed(input_ids)
    pos = (index + jnp.arange(t)).astype(jnp.float32)
    freqs = pos[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(dt)[None, :, None, :]
    sin = jnp.sin(emb).astype(dt)[None, :, None, :]
    carry = (x, sum_squares(x) if folds_norms(cfg) else None, None)
    if self.scan_layers:  # compiles one layer instead of num_layers
      blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers)
      stacked = tuple(jnp.stack(c) for c in zip(*cache))  # scanned over: ([L, B, S, KVH, D],) * 2
      carry, (ks, vs) = blocks(cfg, self.quant, "layers", name="layers")(carry, cos, sin, stacked, index)
      new_cache = tuple(zip(ks, vs))
    else:
      new_cache = []
      for i in range(cfg.num_layers):
        carry, kv = Block(cfg, self.quant, f"layers_{i}", name=f"layers_{i}")(carry, cos, sin, cache[i], index,
                                                                              self._input_norm_for(i + 1))
        new_cache.append(kv)
      new_cache = tuple(new_cache)
    x = RMSNorm(cfg.rms_norm_eps, cfg.tensor_parallel is None, name="norm")(carry[0])
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = projection(self.quant, "lm_head", cfg.vocab_size, False, dt, "lm_head")(x)
    return logits.astype(jnp.float32), new_cache

  def _input_norm_for(self, i: int):
    """layers_i's input_layernorm weight where its q/k/v take h times it (prescales_input_norm), for layers_{i-1}'s
    down_proj to write that product; else None (also while the params are being made: the weight is read from
    the params given to apply)."""
    if i >= self.cfg.num_layers or self.is_initializing() or not prescales_input_norm(self.quant, f"layers_{i}",
                                                                                      self.cfg):
      return None
    return self.variables["params"][f"layers_{i}"]["input_layernorm"]["weight"]


def check_cache(cfg: LlamaConfig, cache, batch: int, index: int | None, t: int):
  """A clear error for a cache that is not init_cache's structure for this model and batch (shapes only: this
  runs while tracing)."""
  want = f"{cfg.num_layers} (k, v) pairs of [{batch}, S, {cfg.num_kv_heads}, {cfg.head_dim}] (init_cache)"
  try:
    shapes = [tuple(tuple(c.shape) for c in kv) for kv in cache]
  except (TypeError, AttributeError):
    raise ValueError(f"cache: expected {want}, got {type(cache).__name__}") from None
  ok = len(shapes) == cfg.num_layers and all(
      len(kv) == 2 and kv[0] == kv[1] and len(kv[0]) == 4 and kv[0][0] == batch
      and kv[0][2:] == (cfg.num_kv_heads, cfg.head_dim) for kv in shapes)
  if not ok:
    raise ValueError(f"cache: expected {want}, got shapes {shapes[:2]}{' ...' if len(shapes) > 2 else ''} "
                     f"({len(shapes)} entries)")
  if index is not None and index + t > shapes[0][0][1]:
    raise ValueError(f"cache: {shapes[0][0][1]} positions, too short for index {index} + {t} tokens")


def init_cache(cfg: LlamaConfig, batch: int, length: int) -> tuple:
  """The KV cache: one (k, v) pair a layer, each zeros [batch, length, KVH, D] in the model's dtype.  Separate
  buffers a layer, so that the attention reads the buffer the step wrote in place (see Attention)."""
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  return tuple((jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype)))
               for _ in range(cfg.num_layers))


def hf_to_flax(params: dict, cfg: LlamaConfig) -> tuple[dict, QuantSpec]:
  """The loader's tree (Hugging Face module paths) -> this module's params and its QuantSpec."""
  root = params.get("model", params)
  dt = jnp.dtype(cfg.dtype)
  quant = []

  def proj(parent, name, path):
    """A projection's params: W4A16Dense's from a QuantizedWeight (bias from '<name>_bias' beside it), or
    nn.Dense's from a float {'weight' [N, K], 'bias'?}."""
    node = parent[name]
    if isinstance(node, QuantizedWeight):
      quant.append((path, (node.group_size, node.qzeros is None, node.perm is not None)))
      bias = parent.get(f"{name}_bias")
      return layer_params(node, None if bias is None else np.asarray(bias).astype(dt))
    if not (isinstance(node, dict) and "weight" in node):
      raise ValueError(f"{path}: expected a quantized weight or a float Linear, got {type(node).__name__}")
    out = {"kernel": np.asarray(node["weight"]).T.astype(dt)}
    if "bias" in node:
      out["bias"] = np.asarray(node["bias"]).astype(dt)
    return out

  flax = {"embed_tokens": {"embedding": np.asarray(root["embed_tokens"]["weight"]).astype(dt)},
          "norm": {"weight": np.asarray(root["norm"]["weight"]).astype(dt)}}
  for i in range(cfg.num_layers):
    layer = root["layers"][str(i)]
    pre = f"layers_{i}"
    attn = {n: proj(layer["self_attn"], n, f"{pre}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    flax[pre] = {"self_attn": attn,
                 "mlp": {n: proj(layer["mlp"], n, f"{pre}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")},
                 "input_layernorm": {"weight": np.asarray(layer["input_layernorm"]["weight"]).astype(dt)},
                 "post_attention_layernorm": {
                     "weight": np.asarray(layer["post_attention_layernorm"]["weight"]).astype(dt)}}
  if not cfg.tie_word_embeddings:
    flax["lm_head"] = proj(params, "lm_head", "lm_head")
  return flax, QuantSpec(tuple(quant))


FUSIONS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj", "fuse_qkv"),
           ("mlp", ("gate_proj", "up_proj"), "gate_up_proj", "fuse_gate_up"))


def _fusable(node: dict, specs: dict, path: str, names) -> bool:
  """Projections `names` of `node` (module path `path`) can be one matmul: same params, and all float or all
  int4 with one (group, symmetry) and no act-order."""
  if not all(n in node for n in names) or len({tuple(sorted(node[n])) for n in names}) != 1:
    return False
  got = {specs.get(f"{path}.{n}") for n in names}
  return len(got) == 1 and (None in got or not next(iter(got))[2])


def fuse_projections(params: dict, quant: QuantSpec, cfg: LlamaConfig) -> tuple[dict, QuantSpec, LlamaConfig]:
  """q/k/v -> qkv_proj and gate/up -> gate_up_proj, their params concatenated along N, in every layer.

  A group is fused only where every layer allows it: all of its projections int4 with one group size and
  symmetry and no act-order (each act-order projection has its own row order), or all float, with the same
  params (bias or none).  Returns (params, quant, cfg) to build the model with; what can't be fused stays as it
  came.  Works on unrolled ('layers_<i>') and stacked ('layers', scan) trees alike: the concatenation is along the
  last axis.
  """
  prefixes = [k for k in params if k == "layers" or k.startswith("layers_")]
  specs, new_params, fused = dict(quant.layers), dict(params), {}
  for group, names, target, flag in FUSIONS:
    if not prefixes or not all(_fusable(params[pre][group], specs, f"{pre}.{group}", names) for pre in prefixes):
      continue
    fused[flag] = True
    for pre in prefixes:
      node = dict(new_params[pre][group])
      parts = [node.pop(n) for n in names]
      cat = np.concatenate if all(isinstance(a, np.ndarray) for p in parts for a in p.values()) else jnp.concatenate
      node[target] = {key: cat([p[key] for p in parts], axis=-1) for key in parts[0]}
      new_params[pre] = {**new_params[pre], group: node}
      spec = [specs.pop(f"{pre}.{group}.{n}", None) for n in names][0]
      if spec is not None:
        specs[f"{pre}.{group}.{target}"] = spec
  return new_params, QuantSpec(tuple(sorted(specs.items()))), dataclasses.replace(cfg, **fused)


def repack_projections(params: dict, quant: QuantSpec, packing: str = "auto") -> tuple[dict, QuantSpec]:
  """Every int4 projection's qweight in `packing`: "gptq", "fragment", or "auto" (`jw4a16.preferred_packing` per
  projection: "fragment" on H100 / H200 where K and the group allow it).  Run after `fuse_projections` (which
  concatenates along N, GPTQ's packed axis).  Stacked (scan) weights are repacked one layer at a time."""
  from jw4a16.ops import resolve_packing  # noqa: PLC0415

  specs, new_params = {}, dict(params)
  for path, spec in quant.layers:
    g, sym, act, *old = spec
    old = old[0] if old else "gptq"
    keys = path.split(".")
    node = new_params
    for key in keys[:-1]:  # copy the path's dicts: the caller's tree is left as it was
      node[key] = dict(node[key])
      node = node[key]
    p = dict(node[keys[-1]])
    w = QuantizedWeight(p["qweight"], p["scales"], None, None, g, 8, old)
    want = resolve_packing(packing, w.shape[0], g)
    w = w.repack(want)
    p["qweight"] = w.qweight
    node[keys[-1]] = p
    specs[path] = (g, sym, act, want)
  return new_params, QuantSpec(tuple(sorted(specs.items())))


def sample(logits, key, temperature: float, top_k: int | None, top_p: float | None):
  """Next tokens [B] from float32 logits [B, V]: greedy at temperature 0, else top-k / top-p sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    cutoff = jnp.take_along_axis(srt, jnp.sum(cum < top_p, axis=-1, keepdims=True), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


DECODE_CHUNK = 16  # decode steps per call of LlamaModel.generate (its decode_chunk)


def decode_loop(step, tok, state, index, n: int):
  """n decode steps in one lax.scan: step(tok [B], state, position) -> (next tok, state), positions index ..
  index + n - 1.  Returns (tokens [B, n], the last token, state)."""

  def body(carry, j):
    nxt, st = step(*carry, index + j)
    return (nxt, st), nxt

  (tok, state), toks = jax.lax.scan(body, (tok, state), jnp.arange(n, dtype=jnp.int32))
  return toks.T, tok, state


@dataclasses.dataclass
class GenerateResult:
  tokens: np.ndarray  # [B, max_new_tokens]
  prefill_tokens_per_s: float
  decode_tokens_per_s: float


class LlamaModel:
  """A loaded model: `m(input_ids)` -> logits; `m.generate(...)`."""

  def __init__(self, cfg: LlamaConfig, params: dict, quant: QuantSpec, tokenizer=None, path=None):
    self.cfg, self.quant, self.tokenizer, self.path = cfg, quant, tokenizer, path
    self.module = LlamaForCausalLM(cfg, quant)
    self.params = jax.device_put(params)
    self._forward = jax.jit(lambda p, ids: self.module.apply({"params": p}, ids)[0])
    self._step = jax.jit(lambda p, ids, cache, index: self.module.apply({"params": p}, ids, cache, index),
                         donate_argnums=(2,))
    self._decode = jax.jit(self._decode_step, donate_argnums=(2,), static_argnums=(5, 6, 7))
    self._decode_n = jax.jit(self._decode_steps, donate_argnums=(2,), static_argnums=(5, 6, 7, 8))

  def _decode_step(self, params, tok, cache, index, key, temperature, top_k, top_p):
    """One decode step with its sampling: the next tokens [B] come out on the device, so the host can queue
    the following step before it reads them."""
    logits, cache = self.module.apply({"params": params}, tok[:, None], cache, index)
    key, sub = jax.random.split(key)
    return sample(logits[:, -1], sub, temperature, top_k, top_p), cache, key

  def _decode_steps(self, params, tok, cache, index, key, temperature, top_k, top_p, n):
    """n decode steps in one call (lax.scan over _decode_step): tokens [B, n], the last token [B], cache, key.
    The host queues one call per n tokens: one step a call left the Llama-3-8B-shaped batch-1 decode bound by the
    host (2.6 - 3.0 ms to queue a step of ~200 kernels, about what the GPU takes for it; docs/performance.md,
    session 16)."""

    def step(tok, state, i):
      nxt, cache, key = self._decode_step(params, tok, state[0], i, state[1], temperature, top_k, top_p)
      return nxt, (cache, key)

    toks, tok, (cache, key) = decode_loop(step, tok, (cache, key), index, n)
    return toks, tok, cache, key

  def __call__(self, input_ids):
    return self._forward(self.params, jnp.asarray(input_ids, jnp.int32))

  def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, key=None, on_token=None,
               decode_chunk: int = DECODE_CHUNK) -> GenerateResult:
    """Greedy (temperature 0) or sampled continuation; `on_token(step, tokens [B])` is called per token (for
    streaming, a chunk behind: see below).  Decoding runs `decode_chunk` steps per call (one compiled lax.scan;
    the last call's surplus steps are discarded).  The cache holds prompt + new tokens, rounded up to 128 so
    nearby lengths share compiles."""
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T] int32, got shape {ids.shape}")
    b, t = ids.shape
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if decode_chunk < 1:
      raise ValueError(f"decode_chunk={decode_chunk} must be >= 1")
    n = min(decode_chunk, max(max_new_tokens - 1, 1))
    calls = -(-(max_new_tokens - 1) // n)
    length = -(-(t + 1 + calls * n) // 128) * 128
    if temperature > 0 and key is None:
      raise ValueError("sampling (temperature > 0) needs key=jax.random.key(...)")
    key = key if key is not None else jax.random.key(0)
    cache = init_cache(self.cfg, b, length)
    start = time.perf_counter()
    logits, cache = self._step(self.params, ids, cache, np.int32(0))
    key, sub = jax.random.split(key)
    tok = sample(logits[:, -1], sub, temperature, top_k, top_p)
    tok.block_until_ready()
    prefill_s = time.perf_counter() - start
    out = [tok[:, None]]
    emitted = 0

    def emit(toks):  # on_token for each of toks' columns that is wanted (no read-back without an on_token)
      nonlocal emitted
      if not on_token:
        return
      for col in np.asarray(toks).T:
        if emitted < max_new_tokens:
          on_token(emitted, col)
        emitted += 1

    start = time.perf_counter()
    # Call c + 1 is queued before call c's tokens are read back (for on_token), so the host's work for one call
    # overlaps the kernels of the one before.  Traced with launch.decode_launcher(): on NVIDIA the FFI launch,
    # which XLA's command buffers take (session 14: 360 against 288 - 335 tokens/s a step at a time).
    with launch.use_launcher(launch.decode_launcher()):
      for c in range(calls):
        toks, tok, cache, key = self._decode_n(self.params, tok, cache, np.int32(t + c * n), key, temperature,
                                               top_k, top_p, n)
        emit(out[-1])
        out.append(toks)
    emit(out[-1])
    tokens = np.asarray(jnp.concatenate(out, axis=1))[:, :max_new_tokens]
    decode_s = time.perf_counter() - start
    return GenerateResult(tokens, b * t / prefill_s, b * (max_new_tokens - 1) / decode_s if max_new_tokens > 1
                          else float("nan"))


def load(path, *, dtype=None, progress: bool = True, fuse: bool = True, packing: str = "auto") -> LlamaModel:
  """Loads a compressed-tensors (or GPTQ / AWQ) Llama-family directory with its tokenizer.json, if any.
  fuse: q/k/v and gate/up run as one matmul each where the checkpoint allows it (`fuse_projections`).
  packing: the int4 weights' layout (`repack_projections`): "auto" picks the fastest for this device."""
  from jw4a16 import checkpoint  # noqa: PLC0415

  params, config, _ = checkpoint.load(path, dtype=dtype, progress=progress)
  cfg = LlamaConfig.from_hf(config)
  if dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  flax_params, quant = hf_to_flax(params, cfg)
  if fuse:
    flax_params, quant, cfg = fuse_projections(flax_params, quant, cfg)
  flax_params, quant = repack_projections(flax_params, quant, packing)
  tok = None
  tok_file = pathlib.Path(path) / "tokenizer.json"
  if tok_file.exists():
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(str(tok_file))
  return LlamaModel(cfg, flax_params, quant, tok, path)


__all__ = ["LlamaConfig", "LlamaForCausalLM", "LlamaModel", "QuantSpec", "fuse_projections", "hf_to_flax",
           "check_cache", "init_cache", "load", "repack_projections", "sample"]
