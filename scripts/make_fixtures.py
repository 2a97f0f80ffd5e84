"""Makes the tiny real W4A16 checkpoints in tests/fixtures/ (and the README's embedded default) with the real
libraries: a randomly initialized LlamaForCausalLM, a byte-level BPE tokenizer trained here with `tokenizers`,
and llm-compressor's GPTQModifier, saved with save_compressed=True (compressed-tensors pack-quantized).  Also
writes, for each, logits and 16 greedy tokens from Hugging Face transformers (which decompresses the directory
with compressed-tensors) as the reference for the tests.

  python -m venv /tmp/lc && /tmp/lc/bin/pip install torch==2.13.0 && /tmp/lc/bin/pip install llmcompressor
  /tmp/lc/bin/python scripts/make_fixtures.py     # from the repository root
  /tmp/lc/bin/python scripts/make_fixtures.py . tests/fixtures/llama-w4a16-lmhead   # only the directories named

Runs on CPU in a few minutes.  Versions used are recorded in each directory's fixture.json.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "int4 weights make large language models small enough to serve on one GPU.",
    "JAX traces Python functions into XLA programs that run on CPUs, GPUs and TPUs.",
    "Triton kernels are written in Python and compiled for NVIDIA and AMD GPUs.",
    "A group of 128 weights shares one scale and one zero point.",
    "Once upon a time there was a little model that wanted to be fast.",
] * 8
# Greedy decoding in bf16 can meet exact ties between the top two logits (one bf16 ulp at |logit| ~ 4 is 0.03),
# and a tie is broken by rounding noise, not by the model.  The fixture keeps the first prompt whose 16 greedy
# steps all have a top-2 margin of at least MIN_MARGIN under transformers, so the test compares implementations.
PROMPTS = ["Once upon a time", "The quick brown fox", "int4 weights make", "A group of 128", "JAX traces Python",
           "Triton kernels are", "Once upon a time there", "The lazy dog"]
MIN_MARGIN = 0.125

# directory (relative to the repository root) -> scheme.  The symmetric one is also the README's embedded default.
SCHEMES = {
    "jw4a16/assets/tiny-llama-w4a16": dict(symmetric=True, actorder=None),
    "tests/fixtures/llama-w4a16-asym": dict(symmetric=False, actorder=None),
    # compressed-tensors >= 0.19 removed actorder="group" (weight_g_idx); "weight" reorders columns during GPTQ
    # and stores the result in plain order.  g_idx checkpoints are covered by tests/checkpoint_writers.py.
    "tests/fixtures/llama-w4a16-actorder": dict(symmetric=True, actorder="weight"),
    # every Linear quantized, the lm_head included (ignore: []), as torchao's int4 quantize_ does by default
    "tests/fixtures/llama-w4a16-lmhead": dict(symmetric=True, actorder=None, lm_head=True),
}


def tokenizer(path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(path)
  return fast


def main(root, only=()):
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: PLC0415
  from datasets import Dataset  # noqa: PLC0415
  from llmcompressor import oneshot  # noqa: PLC0415
  from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: PLC0415
  from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

  import compressed_tensors  # noqa: PLC0415
  import llmcompressor  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  root = pathlib.Path(root)
  base = root / "tests" / "fixtures" / "_base"
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
                    eos_token_id=1, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  model = LlamaForCausalLM(cfg).to(torch.float32)
  with torch.no_grad():  # larger random weights so logits are not flat
    for p in model.parameters():
      if p.dim() == 2:
        p.normal_(0, 0.08)
  model = model.to(torch.bfloat16)
  tok = tokenizer(base)
  model.save_pretrained(base)
  ds = Dataset.from_dict({"text": CORPUS}).map(lambda e: tok(e["text"], truncation=True, max_length=64),
                                               remove_columns=["text"])
  unknown = set(only) - set(SCHEMES)
  if unknown:
    raise SystemExit(f"unknown fixture directories {sorted(unknown)}; known: {sorted(SCHEMES)}")
  for name, opts in SCHEMES.items():
    if only and name not in only:
      continue
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=opts["symmetric"], strategy="group",
                               group_size=128, actorder=opts["actorder"])
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    lm_head = opts.get("lm_head", False)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=[] if lm_head else ["lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=64, num_calibration_samples=len(CORPUS))
    model.save_pretrained(target, save_compressed=True)
    tok.save_pretrained(target)
    # the reference: transformers loads the compressed directory (compressed-tensors decompresses it)
    ref = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.bfloat16)
    best = None
    for prompt in PROMPTS:
      ids = tok(prompt, return_tensors="pt").input_ids
      with torch.no_grad():
        gen = ref.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=1, eos_token_id=None)
        full = ref(gen).logits.float()[0, ids.shape[1] - 1:-1]
      top2 = torch.topk(full, 2, dim=-1).values
      margin = float((top2[:, 0] - top2[:, 1]).min())
      if best is None or margin > best[0]:
        best = (margin, prompt, ids, gen)
      if margin >= MIN_MARGIN:
        break
    margin, prompt, ids, gen = best
    with torch.no_grad():
      logits = ref(ids).logits.float().numpy()
    np.save(target / "reference_logits.npy", logits)
    # compressed-tensors' own decompression of every quantized Linear, for the exact-dequantization tests
    from safetensors.torch import save_file  # noqa: PLC0415

    dense = {f"{name}.weight": mod.weight.detach().contiguous() for name, mod in ref.named_modules()
             if isinstance(mod, torch.nn.Linear) and (lm_head or name != "lm_head")}
    save_file(dense, target / "reference_weights.safetensors")
    (target / "fixture.json").write_text(json.dumps(dict(
        prompt=prompt, input_ids=ids[0].tolist(), greedy_tokens=gen[0, ids.shape[1]:].tolist(),
        min_greedy_margin=margin,
        made_by="scripts/make_fixtures.py", versions=dict(llmcompressor=llmcompressor.__version__,
                                                          compressed_tensors=compressed_tensors.__version__,
                                                          transformers=transformers.__version__,
                                                          torch=torch.__version__)), indent=1))
    print(name, "ok", sorted(p.name for p in target.iterdir()))
  shutil.rmtree(base)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else ".", tuple(sys.argv[2:]))
