"""W4A16Dense (linen), W4A16Linear (nnx), quantize and the Dense-params converter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jw4a16
from jw4a16 import nnx as jnnx
from jw4a16.quantize import error_bound, layer_params, weight_from_params
from tests.helpers import assert_close, make_x

K, N = 256, 64


def unbox(tree):
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_quantize_error_bound(symmetric, group_size):
  w = jax.random.normal(jax.random.key(0), (K, N)) * jnp.linspace(0.01, 2.0, N)
  w = w.at[:, 0].set(0.0)  # an all-zero column
  qw = jw4a16.quantize(w, group_size=group_size, symmetric=symmetric)
  deq = jw4a16.dequantize(qw.qweight, qw.scales, qw.qzeros, group_size=qw.group_size, dtype=jnp.float32)
  err = jnp.abs(deq - w)
  assert bool(jnp.all(err <= error_bound(w, qw))), float(jnp.max(err - error_bound(w, qw)))
  assert float(jnp.max(jnp.abs(deq[:, 0]))) == 0.0
  assert float(jnp.max(err / error_bound(w, qw))) > 0.4  # not vacuous: the bound is nearly reached


def test_quantize_bad_input():
  with pytest.raises(ValueError, match="N=60 .* multiple of 8"):
    jw4a16.quantize(jnp.ones((128, 60)))
  with pytest.raises(ValueError, match="must be a multiple of group_size=128"):
    jw4a16.quantize(jnp.ones((100, 64)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_linen_equals_op_and_nnx(symmetric):
  w = jax.random.normal(jax.random.key(1), (K, N)) * 0.05
  b = jax.random.normal(jax.random.key(2), (N,)).astype(jnp.bfloat16)
  qw = jw4a16.quantize(w, group_size=64, symmetric=symmetric)
  x = make_x((2, 3, K))
  layer = jw4a16.W4A16Dense(N, group_size=64, symmetric=symmetric)
  params = {"params": layer_params(qw, b)}
  y = jax.jit(layer.apply)(params, x)
  ref = jw4a16.w4a16_matmul(x, qw.qweight, qw.scales, qw.qzeros, group_size=64) + b
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
  lin = jnnx.W4A16Linear(K, N, group_size=64, symmetric=symmetric, rngs=nnx.Rngs(0)).load(qw, b)
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(lin, x), np.float32),
                                np.asarray(y, np.float32))


@pytest.mark.parametrize("use_bias", [False, True])
def test_layers_fold_norm_and_residual(use_bias):
  """W4A16Dense and W4A16Linear with norm_weight / residual / residual_norm_weight: the op's outputs without a
  bias; with a bias (the residual comes after it) the same math around the op, in jnp."""
  from jw4a16 import reference  # noqa: PLC0415

  w = jax.random.normal(jax.random.key(1), (K, N)) * 0.05
  b = jax.random.normal(jax.random.key(2), (N,)).astype(jnp.bfloat16)
  qw = jw4a16.quantize(w, group_size=64)
  x, res = make_x((2, 3, K)) * 3, make_x((2, 3, N), seed=4)
  gamma, gamma2 = jnp.linspace(0.5, 1.5, K).astype(jnp.bfloat16), jnp.linspace(1.5, 0.5, N).astype(jnp.bfloat16)
  layer = jw4a16.W4A16Dense(N, group_size=64, use_bias=use_bias)
  params = {"params": layer_params(qw, b if use_bias else None)}
  kw = dict(norm_weight=gamma, norm_eps=1e-5, residual=res, residual_norm_weight=gamma2)
  h, ssq, hg = jax.jit(lambda p, x: layer.apply(p, x, **kw))(params, x)
  y = jw4a16.w4a16_matmul(reference.rms_norm_from_ssq(x, gamma, 1e-5), qw.qweight, qw.scales, group_size=64)
  want = (y + b if use_bias else y) + res
  np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(want, np.float32), rtol=2**-7, atol=2e-2)
  np.testing.assert_allclose(np.asarray(ssq), np.asarray(reference.sum_squares(h)), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(hg, np.float32), np.asarray(h * gamma2, np.float32))
  lin = jnnx.W4A16Linear(K, N, group_size=64, use_bias=use_bias, rngs=nnx.Rngs(0)).load(qw, b if use_bias else None)
  for a, c in zip(nnx.jit(lambda m, x: m(x, **kw))(lin, x), (h, ssq, hg)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=1e-6)
  with pytest.raises(ValueError, match="residual: needs features % 64 == 0"):
    jw4a16.W4A16Dense(40, group_size=64).init(jax.random.key(0), x, residual=jnp.zeros((2, 3, 40), jnp.bfloat16))


@pytest.mark.parametrize("use_bias", [False, True])
def test_layers_hand_over_split_k_slots(use_bias):
  """partials=True: both layers return float32 slots [S, ..., N] whose sum is their output (with a bias, the
  output after it as the one slot); not with a residual."""
  from jw4a16 import reference  # noqa: PLC0415

  w = jax.random.normal(jax.random.key(1), (K, N)) * 0.05
  b = jax.random.normal(jax.random.key(2), (N,)).astype(jnp.bfloat16) if use_bias else None
  qw = jw4a16.quantize(w, group_size=64)
  x = make_x((2, 3, K))
  gamma = jnp.linspace(0.5, 1.5, K).astype(jnp.bfloat16)
  layer = jw4a16.W4A16Dense(N, group_size=64, use_bias=use_bias)
  params = {"params": layer_params(qw, b)}
  run = jax.jit(lambda p, x, slots: layer.apply(p, x, norm_weight=gamma, partials=slots), static_argnums=2)
  slots, want = run(params, x, True), run(params, x, False)
  assert slots.shape[1:] == (2, 3, N) and slots.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(reference.sum_partials(slots, jnp.bfloat16), np.float32),
                                np.asarray(want, np.float32))
  lin = jnnx.W4A16Linear(K, N, group_size=64, use_bias=use_bias, rngs=nnx.Rngs(0)).load(qw, b)
  got = nnx.jit(lambda m, x: m(x, norm_weight=gamma, partials=True))(lin, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(slots))
  with pytest.raises(ValueError, match="partials=True with a residual"):
    layer.apply(params, x, residual=jnp.zeros((2, 3, N), jnp.bfloat16), partials=True)


def test_init_shapes_types_and_partitioning():
  layer = jw4a16.W4A16Dense(N, group_size=64, symmetric=False, act_order=True)
  p = layer.init(jax.random.key(0), jnp.ones((1, K), jnp.bfloat16))["params"]
  assert p["qweight"].names == ("embed", "mlp") and p["bias"].names == ("mlp",)
  shapes = {k: (v.value.shape, str(v.value.dtype)) for k, v in p.items()}
  assert shapes == {"qweight": ((K, N // 8), "int32"), "scales": ((K // 64, N), "bfloat16"),
                    "qzeros": ((K // 64, N // 8), "int32"), "perm": ((K,), "int32"), "bias": ((N,), "bfloat16")}
  row = jw4a16.W4A16Dense(N, kernel_axes=("mlp", "embed")).init(jax.random.key(0), jnp.ones((1, K), jnp.bfloat16))
  assert row["params"]["qweight"].names == ("mlp", "embed")


@pytest.mark.parametrize("features,k,g,match", [(60, 256, 64, "features=60 must be a positive multiple of 8"),
                                                (64, 200, 64, "K=200 .* must be a multiple of group_size=64"),
                                                (64, 256, 100, "group_size=100 is not supported")])
def test_init_errors(features, k, g, match):
  with pytest.raises(ValueError, match=match):
    jw4a16.W4A16Dense(features, group_size=g).init(jax.random.key(0), jnp.ones((1, k), jnp.bfloat16))
  with pytest.raises(ValueError, match=match):
    jnnx.W4A16Linear(k, features, group_size=g, rngs=nnx.Rngs(0))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + jw4a16.W4A16Dense(K, group_size=64, use_bias=False)(x), None


def test_scan_and_vmap_over_layers():
  layers = 3
  ws = [jw4a16.quantize(jax.random.normal(jax.random.key(i), (K, K)) * 0.02, group_size=64) for i in range(layers)]
  stacked = {"params": {"qweight": jnp.stack([w.qweight for w in ws]), "scales": jnp.stack([w.scales for w in ws])}}
  scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
  model = nn.Dense(1)  # placeholder to build the scanned module below
  del model

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scan(name="blocks")(x, None)[0]

  x = make_x((2, K))
  params = {"params": {"blocks": {"W4A16Dense_0": stacked["params"]}}}
  y = jax.jit(Stack().apply)(params, x)
  ref = x
  for w in ws:
    ref = ref + jw4a16.quantized_matmul(ref, w)
  assert_close(y, np.asarray(ref, np.float64), "bfloat16")
  # vmap over stacked weights of one layer
  f = jax.vmap(lambda p, x: jw4a16.W4A16Dense(K, group_size=64, use_bias=False).apply({"params": p}, x))
  out = f(stacked["params"], jnp.stack([x] * layers))
  for i, w in enumerate(ws):
    assert_close(out[i], np.asarray(jw4a16.quantized_matmul(x, w), np.float64), "bfloat16")


def test_nnx_scan_over_layers():
  ws = [jw4a16.quantize(jax.random.normal(jax.random.key(i), (K, K)) * 0.02, group_size=64) for i in range(2)]

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(i):
    del i
    return jnnx.W4A16Linear(K, K, group_size=64, use_bias=False, rngs=nnx.Rngs(0))

  stack = make(jnp.arange(2))
  stack.qweight.set_value(jnp.stack([w.qweight for w in ws]))
  stack.scales.set_value(jnp.stack([w.scales for w in ws]))

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def run(layer, x):
    return x + layer(x)

  x = make_x((2, K))
  ref = x
  for w in ws:
    ref = ref + jw4a16.quantized_matmul(ref, w)
  assert_close(run(stack, x), np.asarray(ref, np.float64), "bfloat16")


def test_quantize_dense_params_and_orbax_round_trip(tmp_path):
  class MLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
      x = nn.relu(self.dense(128, name="up")(x))
      return self.dense(K, name="down")(x)

  x = make_x((4, K))
  fp = MLP().init(jax.random.key(0), x.astype(jnp.float32))
  qp = jw4a16.quantize_dense_params(fp["params"], group_size=64)
  assert set(qp["up"]) == {"qweight", "scales", "bias"}
  y = MLP(dense=lambda f, name: jw4a16.W4A16Dense(f, group_size=64, name=name)).apply({"params": qp}, x)
  y_fp = MLP().apply(fp, x.astype(jnp.float32))
  rel = float(jnp.linalg.norm(y.astype(jnp.float32) - y_fp) / jnp.linalg.norm(y_fp))
  assert rel < 0.2, rel  # int4 round-to-nearest, group 64, on a randomly initialized MLP: about 0.12
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "p", qp)
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "p", qp)
  for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(back)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  w = weight_from_params(back["up"], 64)
  assert w.shape == (K, 128)
