"""The Llama model on real llm-compressor checkpoints against Hugging Face transformers (reference logits and
greedy tokens saved by scripts/make_fixtures.py, which ran transformers on the same directories)."""

import json
import pathlib

import jax
import jax.extend
import numpy as np
import pytest

from jw4a16.models import llama

ROOT = pathlib.Path(__file__).parent.parent
DIRS = [ROOT / "jw4a16/assets/tiny-llama-w4a16", ROOT / "tests/fixtures/llama-w4a16-asym",
        ROOT / "tests/fixtures/llama-w4a16-actorder", ROOT / "tests/fixtures/llama-w4a16-lmhead"]


@pytest.fixture(scope="module", params=DIRS, ids=lambda d: d.name)
def loaded(request):
  return llama.load(request.param, progress=False), json.loads((request.param / "fixture.json").read_text()), \
      np.load(request.param / "reference_logits.npy")


def test_logits_match_transformers(loaded):
  m, fx, ref = loaded
  # llama-w4a16-lmhead quantized its lm_head too (ignore: []): it runs as a W4A16Dense
  assert (m.quant.get("lm_head") is not None) == m.path.name.endswith("lmhead")
  got = np.asarray(m(np.array([fx["input_ids"]], np.int32)))
  assert got.dtype == np.float32 and got.shape == ref.shape
  # Both run bf16 activations with fp32 accumulation; transformers rounds logits to bf16 (ulp 2**-5 at |4|).
  # Measured: relative error ~1.2e-2 and max |diff| ~0.06 against logits of magnitude ~5; a wrong scale, zero or
  # nibble order gives relative errors near 1.
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2.5e-2
  assert np.abs(got - ref).max() < 0.15
  assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_greedy_matches_transformers_16_steps(loaded):
  m, fx, _ = loaded
  r = m.generate(np.array([fx["input_ids"]], np.int32), 16)
  assert r.tokens[0].tolist() == fx["greedy_tokens"]
  assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0


def test_sampling_and_bad_args(loaded):
  m, fx, _ = loaded
  ids = np.array([fx["input_ids"]] * 2, np.int32)
  a = m.generate(ids, 5, temperature=0.8, top_k=20, top_p=0.9, key=jax.random.key(1)).tokens
  b = m.generate(ids, 5, temperature=0.8, top_k=20, top_p=0.9, key=jax.random.key(1)).tokens
  assert a.shape == (2, 5) and (a == b).all()
  with pytest.raises(ValueError, match="needs key"):
    m.generate(ids, 3, temperature=1.0)
  with pytest.raises(ValueError, match="input_ids must be"):
    m.generate(ids[0], 3)


def test_decode_chunks_give_the_same_tokens(loaded):
  """generate's decode calls of `decode_chunk` steps (a lax.scan each; surplus steps discarded): the same greedy
  and sampled tokens whatever the chunk, and on_token once per token, in order."""
  m, fx, _ = loaded
  ids = np.array([fx["input_ids"]] * 2, np.int32)
  seen = []
  runs = [m.generate(ids, 7, decode_chunk=c, on_token=lambda i, t: seen.append((i, t.tolist()))).tokens
          for c in (1, 4, 16)]
  assert all((r == runs[0]).all() for r in runs) and runs[0].shape == (2, 7)
  assert [i for i, _ in seen] == list(range(7)) * 3
  assert [t for _, t in seen[:7]] == runs[0].T.tolist()
  sampled = [m.generate(ids, 6, temperature=0.8, top_k=20, key=jax.random.key(3), decode_chunk=c).tokens
             for c in (1, 5)]
  assert (sampled[0] == sampled[1]).all()
  with pytest.raises(ValueError, match="decode_chunk=0 must be >= 1"):
    m.generate(ids, 3, decode_chunk=0)


def test_no_recompile_per_token(loaded):
  m, fx, _ = loaded
  m.generate(np.array([fx["input_ids"]], np.int32), 4)
  before = m._step._cache_size()  # noqa: SLF001
  m.generate(np.array([fx["input_ids"]], np.int32), 20)
  assert m._step._cache_size() == before  # noqa: SLF001
  chunks = m._decode_n._cache_size()  # noqa: SLF001
  m.generate(np.array([fx["input_ids"]], np.int32), 30)  # the same chunk of 16 steps, the same cache length
  assert m._decode_n._cache_size() == chunks  # noqa: SLF001


def test_fused_projections_match_separate(loaded):
  """load() fuses q/k/v and gate/up where the checkpoint allows (not act-order int4); the logits are those of
  the separate projections, and the KV cache written in place is the same."""
  m, fx, _ = loaded
  sep = llama.load(m.path, progress=False, fuse=False)
  act_order = any(spec[2] for _, spec in sep.quant.layers)
  assert m.cfg.fuse_qkv == m.cfg.fuse_gate_up == (not act_order)
  assert ("qkv_proj" in m.params["layers_0"]["self_attn"]) == m.cfg.fuse_qkv
  assert not sep.cfg.fuse_qkv and "q_proj" in sep.params["layers_0"]["self_attn"]
  ids = np.array([fx["input_ids"]], np.int32)
  np.testing.assert_allclose(np.asarray(m(ids)), np.asarray(sep(ids)), rtol=0, atol=1e-5)
  cache = llama.init_cache(m.cfg, 1, 32)
  _, c1 = m.module.apply({"params": m.params}, ids, cache, 0)
  _, c2 = sep.module.apply({"params": sep.params}, ids, llama.init_cache(sep.cfg, 1, 32), 0)
  c1, c2 = np.asarray(jax.tree.leaves(c1)), np.asarray(jax.tree.leaves(c2))  # [L * 2, B, S, KVH, D]
  np.testing.assert_array_equal(c1, c2)
  t = ids.shape[1]
  assert np.abs(c1[:, :, :t]).max() > 0 and not c1[:, :, t:].any()


def test_fuse_projections_leaves_mixed_groups_alone():
  cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8)
  dense = lambda k, n: {"kernel": np.zeros((k, n), np.float32)}  # noqa: E731
  layer = {"self_attn": {"q_proj": dense(16, 16), "k_proj": dense(16, 8), "v_proj": dense(16, 8),
                         "o_proj": dense(16, 16)},
           "mlp": {"gate_proj": dense(16, 32), "up_proj": dense(16, 32), "down_proj": dense(32, 16)}}
  params = {"layers_0": layer, "layers_1": layer}
  # layer 1's up_proj int4: gate/up can't be one matmul anywhere; q/k/v still can
  quant = llama.QuantSpec((("layers_1.mlp.up_proj", (128, True, False)),))
  out, q, c = llama.fuse_projections(params, quant, cfg)
  assert c.fuse_qkv and not c.fuse_gate_up
  assert out["layers_1"]["self_attn"]["qkv_proj"]["kernel"].shape == (16, 32)
  assert set(out["layers_1"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"} and q == quant


TINY = llama.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64, dtype="bfloat16")


def _prefill_then_step(module, params, cache_len=48):
  """Logits of a 5-token prefill and of one decode step after it, and the cache after both."""
  step = jax.jit(lambda p, ids, c, i: module.apply({"params": p}, ids, c, i))
  cache = llama.init_cache(module.cfg, 1, cache_len)
  ids = np.array([[3, 14, 15, 9, 2]], np.int32)
  prefill, cache = step(params, ids, cache, np.int32(0))
  decode, cache = step(params, ids[:, :1], cache, np.int32(ids.shape[1]))
  return np.asarray(prefill), np.asarray(decode), cache


def test_scanned_layers_match_unrolled():
  """LlamaForCausalLM(scan_layers=True) over stacked weights: the logits and the per-layer cache of the unrolled
  model with the same weights (llama_bench.build draws the same random weights either way)."""
  from jw4a16.models import llama_bench  # noqa: PLC0415
  got = {}
  for scan in (False, True):
    module, params = llama_bench.build(TINY, True, jax.random.key(0), scan=scan)
    got[scan] = _prefill_then_step(module, params)
  for a, b in zip(got[False][:2], got[True][:2]):
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2)
  c0, c1 = got[False][2], got[True][2]
  assert jax.tree.structure(c0) == jax.tree.structure(c1) and len(c0) == TINY.num_layers
  for a, b in zip(jax.tree.leaves(c0), jax.tree.leaves(c1)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == (1, 48, TINY.num_kv_heads, TINY.head_dim)
    assert np.abs(a[:, :6]).max() > 0 and not a[:, 6:].any()  # 5 prefill positions + 1 decode position written
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-2)


def test_attention_reads_the_cache_it_wrote():
  """The decode step's attention dots read the per-layer buffers that dynamic_update_slice wrote, with no slice
  in between: XLA copied such a slice of the stacked [L, 2, ...] cache every step (2 copies a layer, 0.10 ms of a
  Llama-3-8B step on H100, session 13).  Checked in the jaxpr: nothing slices or gathers an array whose shape
  holds the cache length (48, used nowhere else)."""
  from jw4a16.models import llama_bench  # noqa: PLC0415
  module, params = llama_bench.build(TINY, True, jax.random.key(0))
  cache = llama.init_cache(TINY, 1, 48)
  jaxpr = jax.make_jaxpr(lambda p, c: module.apply({"params": p}, np.ones((1, 1), np.int32), c, np.int32(7)))(
      params, cache)
  writes, slices = 0, []

  def visit(j):
    nonlocal writes
    for e in j.eqns:
      shapes = [getattr(v.aval, "shape", ()) for v in e.invars]
      if e.primitive.name == "dynamic_update_slice" and 48 in shapes[0]:
        writes += 1
      if e.primitive.name in ("slice", "dynamic_slice", "gather", "squeeze") and any(48 in s for s in shapes):
        slices.append((e.primitive.name, shapes))
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  assert not slices, slices
  assert writes == 2 * TINY.num_layers


def test_bad_cache_is_refused():
  from jw4a16.models import llama_bench  # noqa: PLC0415
  module, params = llama_bench.build(TINY, True, jax.random.key(0))
  ids = np.ones((1, 4), np.int32)
  apply = lambda c, i=0: module.apply({"params": params}, ids, c, i)  # noqa: E731
  with pytest.raises(ValueError, match=r"cache: expected 2 \(k, v\) pairs of \[1, S, 2, 64\]"):
    apply(llama.init_cache(TINY, 2, 16))  # batch 2 for a batch of 1
  with pytest.raises(ValueError, match="cache: expected"):
    apply(llama.init_cache(TINY, 1, 16)[:1])  # one layer's pair for two layers
  with pytest.raises(ValueError, match="cache: expected"):
    apply(np.zeros((1, 16, 2, 64), np.float32))
  with pytest.raises(ValueError, match="too short for index 14 \\+ 4 tokens"):
    apply(llama.init_cache(TINY, 1, 16), 14)


def test_llama_bench_refuses_too_few_steps(capsys):
  """The first WARMUP_STEPS decode steps are not timed: fewer steps than that and one more is a clear error, not
  a median of nothing."""
  from jw4a16.models import llama_bench  # noqa: PLC0415

  with pytest.raises(SystemExit):
    llama_bench.main(["--steps", str(llama_bench.WARMUP_STEPS)])
  assert f"--steps={llama_bench.WARMUP_STEPS}: at least {llama_bench.WARMUP_STEPS + 1} are needed" in \
      capsys.readouterr().err


def test_llama_bench_measures_every_decode_mode():
  """llama_bench.measure on the tiny config (CPU): a step at a time, one step a call, and generate's chunks."""
  from jw4a16.models import llama_bench  # noqa: PLC0415

  res = llama_bench.measure(TINY, True, (1,), 5, 16, jax.random.key(0))
  for key in ("decode_tokens_per_s_b1", "decode_pipelined_tokens_per_s_b1", "decode_generate_tokens_per_s_b1",
              "prefill_tokens_per_s"):
    assert res[key] > 0, key


def test_llama_bench_int4_head():
  """llama_bench's w4a16-int4-head variant: the lm_head int4 as well (every other weight as in w4a16), and the
  bf16 model refuses it."""
  from jw4a16.models import llama_bench  # noqa: PLC0415

  model, params = llama_bench.build(TINY, True, jax.random.key(0), int4_head=True)
  plain_model, plain = llama_bench.build(TINY, True, jax.random.key(0))
  assert model.quant.get("lm_head") is not None and plain_model.quant.get("lm_head") is None
  assert "qweight" in params["lm_head"] and "kernel" in plain["lm_head"]
  np.testing.assert_array_equal(params["layers_1"]["mlp"]["down_proj"]["qweight"],
                                plain["layers_1"]["mlp"]["down_proj"]["qweight"])
  logits, _ = model.apply({"params": params}, np.ones((1, 3), np.int32), llama.init_cache(model.cfg, 1, 8), 0)
  assert logits.shape == (1, 3, TINY.vocab_size) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="int4_head: only for the quantized model"):
    llama_bench.build(TINY, False, jax.random.key(0), int4_head=True)


def test_prescaled_norm_wiring_matches(monkeypatch):
  """The wiring the GPU takes with the frag kernel, forced on the reference path: o_proj writes h times the
  post-attention norm's weight and gate/up scale only their rows (llama.prescales_norm); down_proj writes h times
  the next layer's input norm weight and its q/k/v scale only their rows (llama.prescales_input_norm).  Logits
  within bf16 rounding of those in transformers' order, and each route did run."""
  path = "jw4a16/assets/tiny-llama-w4a16"
  ids = np.array([[1, 5, 9, 2, 7, 3]], np.int32)
  want = np.asarray(llama.load(path, progress=False)(ids))
  monkeypatch.setattr(llama, "prescales_norm", lambda quant, prefix, cfg: True)
  mlp = np.asarray(llama.load(path, progress=False)(ids))
  monkeypatch.setattr(llama, "prescales_input_norm", lambda quant, prefix, cfg: True)
  m = llama.load(path, progress=False)
  both = np.asarray(m(ids))
  for got in (mlp, both):
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  assert not np.array_equal(mlp, want)
  assert not np.array_equal(both, mlp)
  assert m.cfg.num_layers > 1  # so that a down_proj hands a next layer its input


def test_prescaling_follows_the_frag_kernel(monkeypatch):
  """prescales_norm / prescales_input_norm read the paths the model builds: on for the fragment packing on the
  Triton path (mocked here), off for the GPTQ packing and on the reference path."""
  path = "jw4a16/assets/tiny-llama-w4a16"
  frag = llama.load(path, progress=False, packing="fragment")
  gptq = llama.load(path, progress=False, packing="gptq")
  for check in (llama.prescales_norm, llama.prescales_input_norm):
    assert not check(frag.quant, "layers_1", frag.cfg)  # the reference path here
  monkeypatch.setattr(llama.ops, "resolve_backend", lambda *a, **k: "triton")
  for check in (llama.prescales_norm, llama.prescales_input_norm):
    assert check(frag.quant, "layers_1", frag.cfg)
    assert not check(gptq.quant, "layers_1", gptq.cfg)


def test_decode_hands_split_k_slots_to_the_next_op(monkeypatch):
  """A decode step's q/k/v and gate/up reach the attention and the SwiGLU multiply as split-K slots
  (llama.takes_slots; one slot on this reference path), with the same logits as the same step summed by each
  projection; a dense layer or a prefill never gets them, and project refuses slots where it cannot give them."""
  import flax.linen as nn  # noqa: PLC0415

  from jw4a16.linen import W4A16Dense  # noqa: PLC0415

  dense, int4 = nn.Dense(8), W4A16Dense(8, group_size=32)
  assert llama.takes_slots(int4, True, 1)
  assert not llama.takes_slots(int4, True, 7) and not llama.takes_slots(int4, False, 1)
  assert not llama.takes_slots(dense, True, 1)
  with pytest.raises(ValueError, match="only a W4A16Dense that folds"):
    llama.project(dense, np.ones((1, 1, 4), np.float32), fold=True, partials=True)

  m = llama.load("tests/fixtures/llama-w4a16-asym", progress=False)
  ids = np.array([[5, 17, 3, 99, 42, 7]], np.int32)
  calls = []
  orig = llama.sum_partials
  monkeypatch.setattr(llama, "sum_partials", lambda p, dt: calls.append(p.shape) or orig(p, dt))

  def step(model):
    f = jax.jit(lambda p, ids, c, i: model.module.apply({"params": p}, ids, c, i))
    _, cache = f(model.params, ids, llama.init_cache(model.cfg, 1, 128), np.int32(0))
    return np.asarray(f(model.params, ids[:, :1], cache, np.int32(ids.shape[1]))[0])

  got = step(m)
  assert calls and all(s[0] == 1 and s[-1] == 2 * m.cfg.intermediate_size for s in calls), calls
  monkeypatch.setattr(llama, "takes_slots", lambda layer, fold, t: False)
  np.testing.assert_array_equal(got, step(llama.load("tests/fixtures/llama-w4a16-asym", progress=False)))


def _with_lm_head(src: pathlib.Path, dst: pathlib.Path, quantized: bool):
  """A copy of the tiny checkpoint whose lm_head is group-128 symmetric int4 in compressed-tensors'
  pack-quantized layout (quantized=True: weight_packed [V, K / 8] packed along K with tests/checkpoint_writers'
  own packer, weight_scale [V, K / 128] bf16, weight_shape; the config's ignore list emptied), or float holding
  exactly what those int4 values mean (quantized=False).  Returns the dense [V, K] weight."""
  import shutil  # noqa: PLC0415

  import ml_dtypes  # noqa: PLC0415
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415

  from tests.checkpoint_writers import pack_cols  # noqa: PLC0415

  shutil.copytree(src, dst)
  tensors = load_file(str(dst / "model.safetensors"))
  w = tensors.pop("lm_head.weight").astype(np.float32)  # [V, K]
  v, k = w.shape
  groups = w.reshape(v, k // 128, 128)
  s = (np.abs(groups).max(-1) / 7.0).astype(ml_dtypes.bfloat16)  # [V, K / 128]
  q = np.clip(np.rint(groups / s.astype(np.float32)[..., None]) + 8, 0, 15).astype(np.int64).reshape(v, k)
  dense = ((q - 8).reshape(v, k // 128, 128) * s.astype(np.float32)[..., None]).reshape(v, k)
  if quantized:
    tensors.update({"lm_head.weight_packed": pack_cols(q), "lm_head.weight_scale": s,
                    "lm_head.weight_shape": np.array([v, k], np.int64)})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = []
    (dst / "config.json").write_text(json.dumps(cfg))
  else:
    tensors["lm_head.weight"] = dense.astype(ml_dtypes.bfloat16)
  save_file(tensors, str(dst / "model.safetensors"))
  return dense


@pytest.mark.parametrize("packing", ["gptq", "fragment"])
def test_quantized_lm_head(tmp_path, packing):
  """A checkpoint that quantized its lm_head too (ignore: [], as torchao's int4 does every Linear): load makes the
  lm_head a W4A16Dense, and its logits and greedy tokens are those of the same model with the lm_head in float
  holding what the int4 values mean."""
  import ml_dtypes  # noqa: PLC0415

  src = ROOT / "jw4a16/assets/tiny-llama-w4a16"
  dense = _with_lm_head(src, tmp_path / "int4", True)
  _with_lm_head(src, tmp_path / "float", False)
  q = llama.load(tmp_path / "int4", progress=False, packing=packing)
  f = llama.load(tmp_path / "float", progress=False, packing=packing)
  assert q.quant.get("lm_head") is not None and f.quant.get("lm_head") is None
  assert "qweight" in q.params["lm_head"] and "kernel" in f.params["lm_head"]
  np.testing.assert_array_equal(np.asarray(f.params["lm_head"]["kernel"], np.float32),
                                dense.T.astype(ml_dtypes.bfloat16).astype(np.float32))
  ids = np.array([[1, 5, 9, 2, 7, 3]], np.int32)
  got, want = np.asarray(q(ids)), np.asarray(f(ids))
  # the same bf16 activations; the float lm_head's weights are the int4 values' meaning rounded to bf16
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-3
  assert (got.argmax(-1) == want.argmax(-1)).all()
  assert q.generate(ids, 12).tokens.tolist() == f.generate(ids, 12).tokens.tolist()
