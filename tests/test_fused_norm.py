"""A Llama layer's RMSNorm and residual add folded into the matmul (w4a16_matmul's norm_weight, norm_ssq,
residual): the frag kernel's NORM / RES in Triton's interpreter, the op's jnp path, vmap, act-order and bad
input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jw4a16
from jw4a16 import layout, reference
from tests.helpers import assert_close, make_weights, make_x

EPS = 1e-5


def _inputs(m, k, n, dtype, seed=2):
  """h (rms ~3, so a skipped norm fails), a norm weight around 1, a residual."""
  rng = np.random.default_rng(seed)
  h = jnp.asarray(3.0 * np.asarray(make_x((m, k), "float32", seed)), dtype)
  gamma = jnp.asarray(rng.uniform(0.5, 1.5, k).astype(np.float32), dtype)
  res = jnp.asarray(rng.standard_normal((m, n)).astype(np.float32), dtype)
  return h, gamma, res


def _expected(h, gamma, res, w, norm: bool, residual: bool):
  """float64 product of the jnp norm (rounded to the dtype, as the kernel rounds it) and W, plus the residual."""
  xn = reference.rms_norm_from_ssq(h, gamma, EPS) if norm else h
  out = np.asarray(xn, np.float64) @ w
  return out + np.asarray(res, np.float64) if residual else out


def run_frag_norm_kernel(h, qweight, scales, qzeros, *, group_size, gamma, ssq, res, block_m, block_n, block_k,
                         split, scale_w, res_gamma=None, partials=False):
  """Mirrors ops._launch's fused call with CPU torch tensors; returns (out, ssq_out, hg_out) as numpy, or with
  partials (PARTIALS) the split-K slots [split, M, N].  gamma None with ssq given: h is already times the norm weight
  (NORM = 2)."""
  from jw4a16.kernels.w4a16_frag import w4a16_frag_norm_kernel  # noqa: PLC0415
  from tests.interpret import _torch, patch_interpreter  # noqa: PLC0415

  patch_interpreter()
  m, k = h.shape
  n = scales.shape[1]
  dt = torch.bfloat16 if h.dtype == jnp.bfloat16 else torch.float16
  out = torch.full((m, n), float("nan"), dtype=dt)
  ssq_out = torch.full((m, n // 64) if res is not None else (1,), float("nan"))
  hg_out = torch.full((m, n) if res_gamma is not None else (1,), float("nan"), dtype=dt)
  slots = torch.full((split, m, n) if split > 1 or partials else (1,), float("nan"))
  grid = (-(-m // block_m) * -(-n // block_n), split)
  locks = torch.zeros(grid[0] if split > 1 else 1, dtype=torch.int32)
  st, ht = _torch(scales), _torch(h)
  opt = lambda a: ht if a is None else _torch(a)  # noqa: E731
  w4a16_frag_norm_kernel[grid](
      ht, _torch(layout.to_fragment_packed(np.asarray(qweight))), st, st if qzeros is None else _torch(qzeros), m,
      locks, opt(gamma), opt(ssq), opt(res), opt(res_gamma), out, slots, ssq_out, hg_out, N=n, K=k,
      GROUP_SIZE=group_size, HAS_ZP=qzeros is not None, ZP_BIAS=8, BLOCK_M=block_m, BLOCK_N=block_n,
      BLOCK_K=block_k, SPLIT_K=split, SCALE_W=scale_w, NORM=1 if gamma is not None else (2 if ssq is not None else 0),
      RES=int(res is not None), RES_GAMMA=int(res_gamma is not None), EPS=EPS, PARTIALS=int(partials))
  assert (locks == 0).all()
  if partials:
    return slots.numpy()
  return out.float().numpy(), ssq_out.numpy(), hg_out.float().numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("norm,residual", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,bn,split,scale_w,symmetric", [(1, 64, 1, 2, True), (3, 128, 3, 0, False),
                                                          (19, 64, 2, 1, True)])
def test_frag_norm_kernel(m, bn, split, scale_w, symmetric, norm, residual, dtype):
  k, n, g = 256, 192, 128
  qw, s, qz, _, w = make_weights(k, n, g, symmetric=symmetric, dtype=dtype)
  h, gamma, res = _inputs(m, k, n, dtype)
  out, ssq_out, _ = run_frag_norm_kernel(
      h, qw, s, qz, group_size=g, gamma=gamma if norm else None, ssq=reference.sum_squares(h) if norm else None,
      res=res if residual else None, block_m=16, block_n=bn, block_k=64, split=split, scale_w=scale_w)
  assert_close(out, _expected(h, gamma, res, w, norm, residual), dtype)
  if residual:  # the squares of what was written, per 64 columns
    np.testing.assert_allclose(ssq_out, np.asarray(reference.sum_squares(jnp.asarray(out, dtype))), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("m,bn,split,scale_w", [(1, 64, 1, 2), (3, 128, 3, 0), (19, 64, 2, 1)])
def test_frag_kernel_prescaled_norm_and_residual_gamma(m, bn, split, scale_w, dtype):
  """NORM = 2 (x is h times the norm weight: rows scaled by rstd after the product) chained after RES_GAMMA (the
  residual sum times the next norm's weight), as a Llama layer's o_proj -> gate/up run on the frag kernel."""
  k, n, g = 256, 192, 128
  qw, s, qz, _, w = make_weights(k, n, g, dtype=dtype)
  qw2, s2, _, _, w2 = make_weights(n, 128, 64, dtype=dtype, seed=5)
  x, gamma_next, res = _inputs(m, k, n, dtype)
  gamma_next = gamma_next[0] * jnp.ones((n,), dtype) + jnp.linspace(-0.3, 0.3, n).astype(dtype)
  h, ssq, hg = run_frag_norm_kernel(x, qw, s, qz, group_size=g, gamma=None, ssq=None, res=res, res_gamma=gamma_next,
                                    block_m=16, block_n=bn, block_k=64, split=split, scale_w=scale_w)
  assert_close(h, _expected(x, None, res, w, False, True), dtype)
  np.testing.assert_array_equal(hg, np.asarray(jnp.asarray(h, dtype) * gamma_next, np.float32))
  out, _, _ = run_frag_norm_kernel(jnp.asarray(hg, dtype), qw2, s2, None, group_size=64, gamma=None, ssq=ssq,
                                   res=None, block_m=16, block_n=64, block_k=64, split=split, scale_w=scale_w)
  assert_close(out, _expected(jnp.asarray(h, dtype), gamma_next, None, w2, True, False), dtype)


def test_frag_norm_kernel_uses_the_given_squares():
  """The kernel's rstd comes from norm_ssq, not from x: squares of 4 h give the norm of h / 4."""
  k, n, g = 128, 64, 128
  qw, s, _, _, w = make_weights(k, n, g)
  h, gamma, _ = _inputs(2, k, n, "bfloat16")
  out, _, _ = run_frag_norm_kernel(h, qw, s, None, group_size=g, gamma=gamma, ssq=reference.sum_squares(h) * 16,
                                   res=None, block_m=16, block_n=64, block_k=64, split=1, scale_w=1)
  assert_close(out, _expected(h, gamma, None, w, True, False) / 4, "bfloat16")


@pytest.fixture
def wts():
  return make_weights(256, 128, 64, symmetric=False)


def test_op_reference_path_composes_norm_matmul_residual(wts):
  qw, s, qz, _, w = wts
  h, gamma, res = _inputs(5, 256, 128, "bfloat16")
  op = lambda h, ssq, r: jw4a16.w4a16_matmul(h, qw, s, qz, group_size=64, norm_weight=gamma, norm_eps=EPS,  # noqa: E731
                                             norm_ssq=ssq, residual=r)
  out, ssq = jax.jit(op)(h, reference.sum_squares(h), res)
  assert_close(out, _expected(h, gamma, res, w, True, True), "bfloat16")
  np.testing.assert_allclose(np.asarray(ssq), np.asarray(reference.sum_squares(out)), rtol=1e-6)
  out2, _ = op(h, None, res)  # squares computed from h
  assert_close(out2, _expected(h, gamma, res, w, True, True), "bfloat16")
  plain = jw4a16.w4a16_matmul(h, qw, s, qz, group_size=64, norm_weight=gamma, norm_eps=EPS)
  assert_close(plain, _expected(h, gamma, res, w, True, False), "bfloat16")


def test_op_norm_matches_rms_norm_then_matmul(wts):
  from jw4a16.norm import rms_norm_reference  # noqa: PLC0415

  qw, s, qz, _, _ = wts
  h, gamma, _ = _inputs(4, 256, 128, "bfloat16")
  fused = jw4a16.w4a16_matmul(h, qw, s, qz, group_size=64, norm_weight=gamma, norm_eps=EPS)
  apart = jw4a16.w4a16_matmul(rms_norm_reference(h, gamma, EPS), qw, s, qz, group_size=64)
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(apart, np.float32), rtol=2**-7, atol=1e-2)


def test_op_vmap_and_leading_dims(wts):
  qw, s, qz, _, w = wts
  h, gamma, res = _inputs(6, 256, 128, "bfloat16")
  h3, res3 = h.reshape(2, 3, 256), res.reshape(2, 3, 128)
  op = lambda h, r: jw4a16.w4a16_matmul(h, qw, s, qz, group_size=64, norm_weight=gamma, norm_eps=EPS,  # noqa: E731
                                        residual=r)
  ref = _expected(h, gamma, res, w, True, True).reshape(2, 3, 128)
  for out, ssq in (op(h3, res3), jax.jit(jax.vmap(op))(h3, res3)):
    assert ssq.shape == (2, 3, 2)
    assert_close(out, ref, "bfloat16")
  out, _ = jax.vmap(op, in_axes=(0, None))(h3, res3[0])  # an unbatched residual is broadcast
  assert_close(out, _expected(h, gamma, jnp.concatenate([res3[0]] * 2), w, True, True).reshape(2, 3, 128),
               "bfloat16")


def test_op_act_order_permutes_the_norm_weight():
  qw, s, qz, g_idx, w = make_weights(256, 64, 64, act_order=True)
  h, gamma, res = _inputs(3, 256, 64, "bfloat16")
  out, _ = jw4a16.w4a16_matmul(h, qw, s, qz, group_size=64, g_idx=g_idx, norm_weight=gamma, norm_eps=EPS,
                               residual=res)
  assert_close(out, _expected(h, gamma, res, w, True, True), "bfloat16")


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm_weight=jnp.ones((128,), jnp.bfloat16)), r"norm_weight: expected bfloat16 \[K=256\]"),
    (dict(norm_weight=jnp.ones((256,), jnp.float32)), "norm_weight: expected bfloat16"),
    (dict(residual_norm_weight=jnp.ones((128,), jnp.bfloat16)), "residual_norm_weight was given without residual"),
    (dict(residual=jnp.ones((2, 128), jnp.bfloat16), residual_norm_weight=jnp.ones((64,), jnp.bfloat16)),
     r"residual_norm_weight: expected bfloat16 \[N=128\]"),
    (dict(norm_weight=jnp.ones((256,), jnp.bfloat16), norm_ssq=jnp.ones((2, 3), jnp.float32)),
     r"norm_ssq: expected float32 \[2, 4\]"),
    (dict(residual=jnp.ones((2, 64), jnp.bfloat16)), r"residual: expected bfloat16 \[2, 128\]"),
    (dict(residual=jnp.ones((2, 128), jnp.float16)), "residual: expected bfloat16"),
])
def test_op_bad_fused_args(wts, kwargs, match):
  qw, s, qz, _, _ = wts
  with pytest.raises(ValueError, match=match):
    jw4a16.w4a16_matmul(make_x((2, 256)), qw, s, qz, group_size=64, **kwargs)


def test_op_residual_needs_n_multiple_of_64():
  qw, s, qz, _, _ = make_weights(128, 72, 64)
  with pytest.raises(ValueError, match="residual needs N % 64 == 0"):
    jw4a16.w4a16_matmul(make_x((2, 128)), qw, s, qz, group_size=64, residual=jnp.ones((2, 72), jnp.bfloat16))


def test_op_prescaled_norm_and_residual_gamma(wts):
  """residual_norm_weight's third output fed back with norm_ssq alone is the norm of h, and vmap keeps the three
  outputs."""
  qw, s, qz, _, w = wts
  x = make_x((4, 256))
  res = make_x((4, 128), seed=7)
  gamma = jnp.linspace(0.5, 1.5, 128).astype(jnp.bfloat16)
  h, ssq, hg = jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64, residual=res, residual_norm_weight=gamma)
  np.testing.assert_array_equal(np.asarray(hg, np.float32), np.asarray(h * gamma, np.float32))
  qw2, s2, _, _, w2 = make_weights(128, 64, 64, seed=5)
  out = jw4a16.w4a16_matmul(hg, qw2, s2, group_size=64, norm_ssq=ssq, norm_eps=EPS)
  assert_close(out, np.asarray(reference.rms_norm_from_ssq(h, gamma, EPS), np.float64) @ w2, "bfloat16")
  outs = jax.vmap(lambda x, r: jw4a16.w4a16_matmul(x, qw, s, qz, group_size=64, residual=r,
                                                   residual_norm_weight=gamma))(x.reshape(2, 2, 256),
                                                                                res.reshape(2, 2, 128))
  assert [o.shape for o in outs] == [(2, 2, 128), (2, 2, 2), (2, 2, 128)]
  np.testing.assert_array_equal(np.asarray(outs[0], np.float32).reshape(4, 128), np.asarray(h, np.float32))


def test_rms_norm_from_ssq_without_weight_needs_the_squares():
  with pytest.raises(ValueError, match="without a weight, the squares"):
    reference.rms_norm_from_ssq(make_x((2, 64)), None, EPS)


def _h100_small_m_tiles():
  """The distinct frag tiles of the shipped H100 table's bf16 symmetric entries for M = 2 - 8."""
  from jw4a16 import tuning  # noqa: PLC0415

  table = tuning.shipped_table("h100")
  return sorted({(c.block_m, c.block_n, c.block_k, c.split_k, c.scale_w) for key, c in table.items()
                 if key.startswith(("m2_", "m4_", "m8_")) and key.endswith("_bfloat16_sym_frag")})


@pytest.mark.parametrize("tile", _h100_small_m_tiles(), ids=lambda t: "bm{}-bn{}-bk{}-split{}-sw{}".format(*t))
def test_h100_small_m_picks_with_residual(tile):
  """Each tile the H100 table picks for M = 2 - 8 (session 17 took the M = 1 picks there on four shapes) at M = 3
  with the residual epilogue, in the interpreter: K deep enough for every split to have steps."""
  bm, bn, bk, split, scale_w = tile
  k, n, g = max(1024, split * bk), 256, 128
  qw, s, _, _, w = make_weights(k, n, g)
  h, _, res = _inputs(3, k, n, "bfloat16")
  out, _, _ = run_frag_norm_kernel(h, qw, s, None, group_size=g, gamma=None, ssq=None, res=res, block_m=bm,
                                   block_n=bn, block_k=bk, split=split, scale_w=scale_w)
  assert_close(out, _expected(h, None, res, w, False, True), "bfloat16")
