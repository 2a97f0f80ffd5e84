"""Tensor-parallel checks on 8 CPU devices; run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must precede JAX's start).

  python tests/sharding_checks.py CHECK
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jw4a16  # noqa: E402
from jw4a16 import sharding  # noqa: E402
from tests.helpers import make_weights, make_x  # noqa: E402

MESH = jax.make_mesh((8,), ("tp",), axis_types=(jax.sharding.AxisType.Explicit,))
AUTO = jax.make_mesh((8,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))


def weight(k, n, g, symmetric=False, act_order=False):
  qw, s, qz, g_idx, w = make_weights(k, n, g, symmetric=symmetric, act_order=act_order)
  if act_order:
    return jw4a16.QuantizedWeight.from_act_order(qw, s, qz, g_idx, group_size=g), w
  return jw4a16.QuantizedWeight(jnp.asarray(qw), jnp.asarray(s), None if qz is None else jnp.asarray(qz), None, g), w


def place(w, mode):
  sh = sharding.param_shardings(w, mode, "tp", MESH)
  return jax.tree.map(lambda a, s: jax.device_put(a, s), w, sh)


def check_column_and_row():
  for mode, act, packing in (("column", False, "gptq"), ("row", False, "gptq"), ("row", True, "gptq"),
                             ("column", True, "gptq"), ("column", False, "fragment"), ("row", True, "fragment")):
    w, dense = weight(1024, 512, 64, act_order=act)
    w = w.repack(packing)
    ws = place(w, mode)
    x = make_x((3, 1024))
    f = jax.jit(lambda x, w: sharding.parallel_matmul(x, w, mode, "tp", mesh=MESH))
    y = f(x, ws)
    ref = jw4a16.quantized_matmul(x, w)
    rel = float(jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    assert rel < 5e-3, (mode, act, rel)
    hlo = f.lower(x, ws).compile().as_text()
    assert "all-gather" not in hlo, f"{mode}: the compiled HLO gathers: {mode}"
    if mode == "row":
      assert "all-reduce" in hlo
    # each device holds only its shard of the weights
    shard_shapes = {s.data.shape for s in ws.qweight.addressable_shards}
    want = {(1024, 512 // 64)} if mode == "column" else {(1024 // 8, 512 // 8)}
    if packing == "fragment":  # qweight [N / 64, 8 K]: 64 columns a shard, or K / 8 per shard
      want = {(512 // 64 // 8, 8 * 1024)} if mode == "column" else {(512 // 64, 8 * 1024 // 8)}
    assert shard_shapes == want, (packing, shard_shapes)
    print("ok", mode, "act_order" if act else "", packing, rel)


def check_errors():
  w, _ = weight(1024, 8 * 12, 64)  # 12 words: not divisible by 8 shards
  try:
    sharding.parallel_matmul(make_x((2, 1024)), w, "column", "tp", mesh=MESH)
    raise SystemExit("no error for N")
  except ValueError as e:
    assert "N per shard must be a multiple of 8" in str(e), e
  w, _ = weight(512, 64, 128)  # K per shard 64 < group 128
  try:
    sharding.parallel_matmul(make_x((2, 512)), w, "row", "tp", mesh=MESH)
    raise SystemExit("no error for K")
  except ValueError as e:
    assert "whole groups of group_size=128" in str(e), e
  w, _ = weight(512, 256, 64)  # fragment: 32 columns per shard, not whole blocks of 64
  try:
    sharding.parallel_matmul(make_x((2, 512)), w.repack("fragment"), "column", "tp", mesh=MESH)
    raise SystemExit("no error for fragment N")
  except ValueError as e:
    assert "whole blocks of 64 columns (N per shard 32)" in str(e), e
  try:  # the same split asked of a checkpoint restore
    sharding.param_shardings(w.repack("fragment"), "column", "tp", MESH)
    raise SystemExit("no error for fragment N in param_shardings")
  except ValueError as e:
    assert "whole blocks of 64 columns (N per shard 32)" in str(e), e
  print("ok errors")


def check_layer_under_mesh():
  w, _ = weight(512, 256, 64, symmetric=True)
  x = make_x((2, 512))
  from jw4a16.quantize import layer_params  # noqa: PLC0415

  params = {"params": layer_params(w)}
  ref = jw4a16.W4A16Dense(256, group_size=64, use_bias=False).apply(params, x)
  with jax.set_mesh(AUTO):
    for mode in ("column", "row"):
      layer = jw4a16.W4A16Dense(256, group_size=64, use_bias=False, parallel=mode)
      y = jax.jit(layer.apply)(params, x)
      np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
      from flax import nnx  # noqa: PLC0415

      from jw4a16.nnx import W4A16Linear  # noqa: PLC0415

      lin = W4A16Linear(512, 256, group_size=64, use_bias=False, parallel=mode, rngs=nnx.Rngs(0)).load(w)
      y2 = nnx.jit(lambda m, x: m(x))(lin, x)
      np.testing.assert_allclose(np.asarray(y2, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
  print("ok layer")


def check_orbax_sharded_restore():
  import tempfile  # noqa: PLC0415

  from jw4a16 import checkpoint  # noqa: PLC0415

  w, _ = weight(1024, 512, 64)
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save({"layer": w}, f"{d}/ckpt")
    sh = {"layer": sharding.param_shardings(w, "row", "tp", MESH)}
    back, _ = checkpoint.restore(f"{d}/ckpt", shardings=sh)
    q = back["layer"].qweight
    assert q.sharding == NamedSharding(MESH, P("tp", None)), q.sharding
    assert {s.data.shape for s in q.addressable_shards} == {(128, 64)}
    np.testing.assert_array_equal(np.asarray(q), np.asarray(w.qweight))
    f = w.repack("fragment")  # qweight [N / 64, 8 K]: the row split is along its second axis
    checkpoint.save({"layer": f}, f"{d}/frag")
    back, _ = checkpoint.restore(f"{d}/frag", shardings={"layer": sharding.param_shardings(f, "row", "tp", MESH)})
    q = back["layer"].qweight
    assert back["layer"].packing == "fragment" and q.sharding == NamedSharding(MESH, P(None, "tp")), q.sharding
    assert {s.data.shape for s in q.addressable_shards} == {(8, 1024)}
    np.testing.assert_array_equal(np.asarray(q), np.asarray(f.qweight))
  print("ok orbax")


def check_llama_tp():
  import dataclasses  # noqa: PLC0415

  from jw4a16.models import llama  # noqa: PLC0415

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                      "llama-w4a16-asym")
  m = llama.load(path, progress=False)
  ids = np.array([[5, 17, 42, 7, 99, 3]], np.int32)
  ref = np.asarray(m(ids))
  # 8-way: K per shard must hold whole groups of 128, so split over 2 here (hidden 256, intermediate 512)
  mesh = jax.make_mesh((2, 4), ("tp", "dp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cfg = dataclasses.replace(m.cfg, tensor_parallel="tp")
  module = llama.LlamaForCausalLM(cfg, m.quant)
  with jax.set_mesh(mesh):
    got = np.asarray(jax.jit(lambda p, i: module.apply({"params": p}, i)[0])(m.params, ids))
  assert np.abs(got - ref).max() < 0.1 * max(1.0, np.abs(ref).max() / 10), np.abs(got - ref).max()
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel < 2e-2, rel
  print("ok llama tp 2 x dp 4", rel)

  # 8-way tensor parallelism: o_proj's K = 256 splits into 32 per device, so requantize with group 32
  from jw4a16.quantize import layer_params, quantize  # noqa: PLC0415

  def requant(tree):
    if isinstance(tree, dict) and "qweight" in tree:
      w = jw4a16.dequantize(tree["qweight"], tree["scales"], tree.get("qzeros"), group_size=128,
                            dtype=jnp.float32)
      return layer_params(quantize(w, group_size=32, symmetric=False))
    return {k: requant(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

  params = requant(jax.device_get(m.params))
  quant = llama.QuantSpec(tuple((path, (32, False, False)) for path, _ in m.quant.layers))
  single = np.asarray(jax.jit(lambda p, i: llama.LlamaForCausalLM(m.cfg, quant).apply({"params": p}, i)[0])(
      params, ids))
  mesh8 = jax.make_mesh((8,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
  module = llama.LlamaForCausalLM(dataclasses.replace(m.cfg, tensor_parallel="tp"), quant)
  with jax.set_mesh(mesh8):
    got8 = np.asarray(jax.jit(lambda p, i: module.apply({"params": p}, i)[0])(params, ids))
  rel8 = np.linalg.norm(got8 - single) / np.linalg.norm(single)
  assert rel8 < 2e-2, rel8
  print("ok llama tp 8", rel8)


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  globals()[f"check_{sys.argv[1]}"]()
