"""The Llama model on real llm-compressor checkpoints against Hugging Face transformers (reference logits and
greedy tokens saved by scripts/make_fixtures.py, which ran transformers on the same directories)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jw4a16.models import llama

ROOT = pathlib.Path(__file__).parent.parent
DIRS = [ROOT / "jw4a16/assets/tiny-llama-w4a16", ROOT / "tests/fixtures/llama-w4a16-asym",
        ROOT / "tests/fixtures/llama-w4a16-actorder"]


@pytest.fixture(scope="module", params=DIRS, ids=lambda d: d.name)
def loaded(request):
  return llama.load(request.param, progress=False), json.loads((request.param / "fixture.json").read_text()), \
      np.load(request.param / "reference_logits.npy")


def test_logits_match_transformers(loaded):
  m, fx, ref = loaded
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


def test_no_recompile_per_token(loaded):
  m, fx, _ = loaded
  m.generate(np.array([fx["input_ids"]], np.int32), 4)
  before = m._step._cache_size()  # noqa: SLF001
  m.generate(np.array([fx["input_ids"]], np.int32), 20)
  assert m._step._cache_size() == before  # noqa: SLF001
