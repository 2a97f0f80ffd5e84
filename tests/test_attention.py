"""Decode attention: the jnp reference against plain numpy, the Triton kernel in the interpreter against numpy,
argument checks, and the dispatch (tests/test_gpu.py runs the kernel through jax-triton on a GPU)."""

import ml_dtypes
import numpy as np
import pytest

import jax.numpy as jnp

from jw4a16 import attention, reference
from tests.interpret import run_attention_kernel, run_attention_step_kernel


def naive(q, k, v, index):
  """float64 causal GQA attention: q [B, T, H, D] at positions index.., caches [B, S, KVH, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  kvh = k.shape[2]
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for ti in range(t):
      for hi in range(h):
        g = hi // (h // kvh)
        n = index + ti + 1
        sc = k[bi, :n, g] @ q[bi, ti, hi] / np.sqrt(d)
        p = np.exp(sc - sc.max())
        out[bi, ti, hi] = (p / p.sum()) @ v[bi, :n, g]
  return out


def _rand(shape, dtype, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("t,index", [(1, 0), (1, 11), (4, 3)])
def test_reference_matches_numpy(t, index):
  b, s, kvh, r, d = 2, 16, 2, 3, 8
  q = _rand((b, t, kvh * r, d), np.float32, 0)
  k, v = _rand((b, s, kvh, d), np.float32, 1), _rand((b, s, kvh, d), np.float32, 2)
  v[:, index + t:] = 1e3  # slots past the last position must not count
  got = np.asarray(attention.attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), index))
  np.testing.assert_allclose(got, naive(q, k, v, index), rtol=1e-4, atol=1e-4)


CASES = [  # b, s, kvh, r, d, lengths, split, dtype
    (2, 96, 2, 4, 32, [1, 70], 1, ml_dtypes.bfloat16),  # s not a multiple of BLOCK_S; a length of 1
    (2, 96, 2, 4, 32, [96, 5], 4, ml_dtypes.bfloat16),  # split 4: the second sequence leaves splits empty
    (1, 256, 1, 8, 64, [200], 2, np.float16),
    (1, 64, 4, 1, 16, [64], 8, ml_dtypes.bfloat16),  # R = 1 (multi-head), more splits than blocks
    (3, 130, 2, 5, 32, [130, 64, 65], 2, np.float16),  # R = 5 (rows masked to BLOCK_R = 16)
    (1, 640, 2, 4, 32, [300], 16, ml_dtypes.bfloat16),  # a block to each of 5 splits, 11 empty: 16 combined
    (2, 704, 1, 4, 32, [577, 128], 4, np.float16),  # three blocks a split, the last split one position
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-s{c[1]}-kvh{c[2]}-r{c[3]}-d{c[4]}-split{c[6]}" for c in CASES])
def test_kernel_matches_numpy(case):
  b, s, kvh, r, d, lengths, split, dtype = case
  q = _rand((b, kvh * r, d), dtype, 3)
  k, v = _rand((b, s, kvh, d), dtype, 4), _rand((b, s, kvh, d), dtype, 5)
  for bi, n in enumerate(lengths):
    k[bi, n:], v[bi, n:] = 100, 100  # beyond the length: would swamp the result if read
  got = run_attention_kernel(q, k, v, lengths, split=split)
  want = np.stack([naive(q[bi:bi + 1, None], k[bi:bi + 1], v[bi:bi + 1], n - 1)[0, 0]
                   for bi, n in enumerate(lengths)])
  assert np.isfinite(got).all()
  # P rounded to the cache dtype before P @ V (as flash attention does), the output rounded once
  assert np.abs(got - want).max() < 3e-2, np.abs(got - want).max()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def naive_rope(x, pos, d, theta=10000.0):
  """float64 rotary embedding of heads x [..., D] at position pos (transformers' rotate_half convention)."""
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = np.concatenate([pos * inv, pos * inv])
  x = np.asarray(x, np.float64)
  return x * np.cos(ang) + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1) * np.sin(ang)


STEP_CASES = [  # b, s, kvh, r, d, lengths, split, dtype
    (2, 96, 2, 4, 32, [1, 70], 1, ml_dtypes.bfloat16),  # the new position is the only one / mid-block
    (2, 96, 2, 4, 32, [96, 65], 4, ml_dtypes.bfloat16),  # the last slot of the cache; a split's first position
    (1, 256, 1, 8, 64, [129], 2, np.float16),  # the new position alone in the second split
    (3, 130, 2, 5, 32, [130, 64, 3], 8, ml_dtypes.bfloat16),  # R = 5, empty splits
    (2, 96, 2, 4, 32, [96, 96], 2, ml_dtypes.bfloat16),  # one position for the batch: also run as one launch
    (1, 64, 1, 16, 32, [40], 1, np.float16),  # R = 16: the q rows fill the dot's tile (ROWS = BLOCK_R)
    (1, 640, 2, 4, 32, [300], 16, ml_dtypes.bfloat16),  # a block to each of 5 splits, 11 empty: 16 combined
    (2, 704, 1, 4, 32, [577, 129], 4, np.float16),  # the new position alone in the last split
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", STEP_CASES,
                         ids=[f"b{c[0]}-s{c[1]}-kvh{c[2]}-r{c[3]}-d{c[4]}-split{c[6]}" for c in STEP_CASES])
def test_step_kernel_matches_numpy(case):
  """The step kernel rotates q and the new k, writes the new k and v at length - 1 (nothing else in the caches
  changes) and attends 0 .. length - 1, with that position taken from the projection row, not the stale cache."""
  b, s, kvh, r, d, lengths, split, dtype = case
  h = kvh * r
  qkv = _rand((b, (h + 2 * kvh) * d), dtype, 6)
  k, v = _rand((b, s, kvh, d), dtype, 7), _rand((b, s, kvh, d), dtype, 8)
  for bi, n in enumerate(lengths):
    k[bi, n - 1:], v[bi, n - 1:] = 100, 100  # the stale new slot and beyond: would swamp the result if read
  pos = np.asarray(lengths) - 1
  outs, k_want, v_want = [], k.astype(np.float64), v.astype(np.float64)
  for bi, n in enumerate(lengths):
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos[bi] * inv, pos[bi] * inv])
    cos, sin = np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)
    got, kc, vc = run_attention_step_kernel(qkv[bi:bi + 1], cos, sin, k[bi:bi + 1], v[bi:bi + 1], [n], split=split)
    q_new, k_new, v_new = np.split(qkv[bi].astype(np.float64), [h * d, (h + kvh) * d])
    q_rot = naive_rope(q_new.reshape(h, d), pos[bi], d)
    k_rot = naive_rope(k_new.reshape(kvh, d), pos[bi], d)
    k_want[bi, n - 1], v_want[bi, n - 1] = k_rot, v_new.reshape(kvh, d)
    np.testing.assert_allclose(kc[0].astype(np.float64), k_want[bi], rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(vc[0].astype(np.float64), v_want[bi])
    np.testing.assert_array_equal(np.delete(kc[0], n - 1, axis=0), np.delete(k[bi], n - 1, axis=0))
    want = naive(q_rot[None, None], k_want[bi:bi + 1], v_want[bi:bi + 1], n - 1)[0, 0]
    assert np.isfinite(got).all()
    assert np.abs(got[0] - want).max() < 3e-2, np.abs(got[0] - want).max()
    assert np.linalg.norm(got[0] - want) / np.linalg.norm(want) < 1e-2
    outs.append(got[0])
  if len(set(pos)) == 1:  # the batch in one launch (cos and sin are one position's, as in the model)
    got, _, _ = run_attention_step_kernel(qkv, cos, sin, k, v, lengths, split=split)
    np.testing.assert_allclose(got, np.stack(outs), rtol=0, atol=1e-6)


@pytest.mark.interpret
@pytest.mark.parametrize("parts,split", [(1, 1), (3, 2), (8, 1)])
def test_step_kernel_sums_split_k_slots(parts, split):
  """qkv as float32 split-K slots (w4a16_matmul(..., partials=True)): the kernel's out and caches are bit for bit
  those of the launch on their sum (reference.sum_partials), and the jnp path sums them too."""
  b, s, kvh, r, d, n = 2, 256, 2, 4, 16, 150
  h = kvh * r
  slots = _rand((parts, b, (h + 2 * kvh) * d), np.float32, 12)
  qkv = np.asarray(reference.sum_partials(jnp.asarray(slots), jnp.bfloat16))
  k, v = _rand((b, s, kvh, d), ml_dtypes.bfloat16, 13), _rand((b, s, kvh, d), ml_dtypes.bfloat16, 14)
  ang = (n - 1) / 10000.0 ** (np.arange(0, d, 2) / d)
  cos, sin = (np.concatenate([f(ang), f(ang)]).astype(ml_dtypes.bfloat16) for f in (np.cos, np.sin))
  want = run_attention_step_kernel(qkv, cos, sin, k.copy(), v.copy(), [n, n], split=split)
  got = run_attention_step_kernel(slots, cos, sin, k.copy(), v.copy(), [n, n], split=split)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  ref = attention.attention_step_reference(jnp.asarray(slots), jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(k),
                                           jnp.asarray(v), n - 1)
  ref_sum = attention.attention_step_reference(jnp.asarray(qkv), jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(k),
                                               jnp.asarray(v), n - 1)
  for g, w in zip(ref, ref_sum):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_step_reference_matches_model_path():
  """attention_step's jnp path = the prefill path's pieces (split, rope, cache write, attention) at T = 1."""
  b, s, kvh, r, d, index = 2, 16, 2, 3, 8, 5
  h = kvh * r
  qkv = jnp.asarray(_rand((b, (h + 2 * kvh) * d), np.float32, 9))
  k, v = (jnp.asarray(_rand((b, s, kvh, d), np.float32, i)) for i in (10, 11))
  ang = index / 10000.0 ** (np.arange(0, d, 2) / d)
  cos, sin = (jnp.asarray(np.concatenate([f(ang), f(ang)]), jnp.float32) for f in (np.cos, np.sin))
  out, kc, vc = attention.attention_step(qkv, cos, sin, k, v, index)
  q_rot = naive_rope(np.asarray(qkv[:, :h * d]).reshape(b, h, d), index, d)
  k_rot = naive_rope(np.asarray(qkv[:, h * d:(h + kvh) * d]).reshape(b, kvh, d), index, d)
  np.testing.assert_allclose(np.asarray(kc[:, index]), k_rot, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(vc[:, index]), np.asarray(qkv[:, (h + kvh) * d:]).reshape(b, kvh, d))
  want = naive(q_rot[:, None], np.asarray(kc), np.asarray(vc), index)[:, 0]
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


def test_bad_step_arguments():
  c = jnp.zeros((1, 32, 2, 16), jnp.bfloat16)
  qkv = jnp.zeros((1, (8 + 4) * 16), jnp.bfloat16)
  cs = jnp.zeros((16,), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"qkv: expected \[B=1, \(H \+ 2 \* 2\) \* 16\]"):
    attention.attention_step(qkv[:, :-16], cs, cs, c, c, 0)
  with pytest.raises(ValueError, match=r"qkv: expected"):
    attention.attention_step(jnp.zeros((2, 12 * 16), jnp.bfloat16), cs, cs, c, c, 0)
  with pytest.raises(ValueError, match="qkv: dtype float16 differs"):
    attention.attention_step(qkv.astype(jnp.float16), cs, cs, c, c, 0)
  with pytest.raises(ValueError, match=r"or float32 slots \[P, B, \.\.\.\]"):
    attention.attention_step(jnp.zeros((2, 1, 11 * 16), jnp.float32), cs, cs, c, c, 0)
  with pytest.raises(ValueError, match=r"sin: expected \[D=16\]"):
    attention.attention_step(qkv, cs, cs[:8], c, c, 0)
  with pytest.raises(ValueError, match="v_cache: expected"):
    attention.attention_step(qkv, cs, cs, c, c[:, :8], 0)
  with pytest.raises(ValueError, match=r"k_cache: expected \[B, S, KVH, D\]"):
    attention.attention_step(qkv, cs, cs, c[0], c, 0)
  with pytest.raises(ValueError, match="split=3 must be a power of two"):
    attention.decode_attention_step(qkv, cs, cs, c, c, jnp.ones((1,), jnp.int32), split=3)


def test_step_rows():
  from jw4a16.kernels.decode_attention import step_rows  # noqa: PLC0415

  assert [step_rows(r) for r in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_split_for():
  assert attention.split_for(1, 8, 256, 132) == 1  # 256 positions: one split of four blocks of 64
  assert attention.split_for(1, 8, 2048, 132) == 8  # 66 / 8 -> 9 wanted -> 8
  assert attention.split_for(1, 8, 16384, 132) == 8
  assert attention.split_for(1, 1, 16384, 132) == 32  # 66 wanted, capped at 32
  assert attention.split_for(16, 8, 2048, 132) == 1
  assert attention.split_for(1, 1, 10, 132) == 1


def test_bad_arguments():
  q = jnp.zeros((1, 1, 8, 16), jnp.bfloat16)
  c = jnp.zeros((1, 32, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"q: expected \[B, T, H, D\]"):
    attention.attention(q[0], c, c, 0)
  with pytest.raises(ValueError, match=r"k_cache: expected \[B=1, S, KVH, D=16\]"):
    attention.attention(q, c[..., :8], c, 0)
  with pytest.raises(ValueError, match="v_cache: dtype float16 differs"):
    attention.attention(q, c, c.astype(jnp.float16), 0)
  with pytest.raises(ValueError, match="v_cache: shape"):
    attention.attention(q, c, c[:, :16], 0)
  with pytest.raises(ValueError, match="q: 8 heads are not a multiple of the caches' 3 kv heads"):
    attention.attention(q, jnp.zeros((1, 32, 3, 16), jnp.bfloat16), jnp.zeros((1, 32, 3, 16), jnp.bfloat16), 0)


@pytest.mark.parametrize("split", [3, -2])
def test_bad_split_is_refused(split):
  q = jnp.zeros((1, 8, 16), jnp.bfloat16)
  c = jnp.zeros((1, 32, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match=f"split={split} must be a power of two"):
    attention.decode_attention(q, c, c, jnp.ones((1,), jnp.int32), split=split)


def test_dispatch_reasons(monkeypatch):
  q = jnp.zeros((1, 1, 8, 128), jnp.bfloat16)
  c = jnp.zeros((1, 32, 2, 128), jnp.bfloat16)
  assert "query positions" in attention.kernel_unavailable_reason(jnp.zeros((1, 2, 8, 128), jnp.bfloat16), c)
  assert "dtype float32" in attention.kernel_unavailable_reason(q.astype(jnp.float32), c)
  assert "power of two" in attention.kernel_unavailable_reason(jnp.zeros((1, 1, 8, 96), jnp.bfloat16), c)
  monkeypatch.setenv(attention.DISABLE_ENV, "0")
  assert attention.DISABLE_ENV in attention.kernel_unavailable_reason(q, c)
  monkeypatch.delenv(attention.DISABLE_ENV)
  assert "Triton path cannot run" in attention.kernel_unavailable_reason(q, c)  # CPU: the reference
