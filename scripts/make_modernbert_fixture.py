"""Writes tests/fixtures/modernbert_tiny/: tiny random ModernBERTs with the logits HF transformers computes.

Run where torch is installed (the project itself never needs torch):
  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
  /tmp/torchenv/bin/python scripts/make_modernbert_fixture.py

Two models, both checked by tests/test_modernbert.py against the stored PyTorch outputs:
- the fixture directory itself: ModernBERT-large's shape of config (no biases but the decoder's, tied
  decoder, exact GELU), written in the hub's pre-transformers-5 config.json layout (global_attn_every_n_layers,
  global/local_rope_theta), with the project's embedded tokenizer (8192 tokens; the embedding has 64 more rows,
  like the real model's padding). hidden 32, 4 layers (global every 2), 4 heads, intermediate 48,
  local_attention 8 (so the window matters at length 32). Weights are stored as float16 to keep the fixture
  under 1 MB; both sides compute in float32 from the same values. This directory is also what the
  fine-tuning test starts from.
- all_biases/: every optional bias and LayerNorm bias on, untied decoder, tanh GELU, SiLU head, an irregular
  layer_types pattern and unusual RoPE bases, in the transformers-5 config layout (save_pretrained).
Parameters are perturbed away from HF's init (norm weights 1, biases 0) so that a misplaced norm or bias shows.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, ModernBertConfig, ModernBertForMaskedLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "modernbert_tiny")
TOKENIZER = os.path.join(REPO, "flowlm_jax", "assets", "tokenizer")
N_TOKENS = 8192  # len(embedded tokenizer); [PAD]=0 [MASK]=1 [EOS]=2 [SEP]=3 [UNK]=4
N_LOGIT_COLUMNS = 128  # stored logits columns per position (all 8256 would be 3 MB)

# The hub's config.json layout (answerdotai/ModernBERT-large, transformers 4.47), shrunk.
MAIN_CONFIG = {
    "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
    "vocab_size": N_TOKENS + 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "global_attn_every_n_layers": 2, "local_attention": 8,
    "global_rope_theta": 160000.0, "local_rope_theta": 10000.0, "max_position_embeddings": 8192,
    "hidden_activation": "gelu", "classifier_activation": "gelu", "norm_eps": 1e-05, "norm_bias": False,
    "attention_bias": False, "mlp_bias": False, "classifier_bias": False, "decoder_bias": True,
    "tie_word_embeddings": True, "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0,
    "classifier_dropout": 0.0, "classifier_pooling": "mean", "initializer_range": 0.02,
    "initializer_cutoff_factor": 2.0, "deterministic_flash_attn": False,
    "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 3, "cls_token_id": 3, "sep_token_id": 3,
    "torch_dtype": "float16", "transformers_version": "4.47.0.dev0",
}

BIAS_CONFIG = dict(
    vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    local_attention=6, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
    hidden_activation="gelu_pytorch_tanh", classifier_activation="silu", norm_eps=1e-6, norm_bias=True,
    attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=True, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=2, bos_token_id=3, cls_token_id=3, sep_token_id=3,
)


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
  """Random weights of a useful size (HF's 0.02 init makes near-uniform logits that hide mistakes)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.copy_(scale * noise)


def inputs(n_rows: int, length: int, vocab: int, seed: int):
  """(input_ids, attention_mask, position_ids): a full row, a right-padded row, a left-padded row.

  The left-padded row counts positions from its first real token, as the project's samplers do.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(n_rows, length))
  ids[:, 3::7] = 1  # some [MASK]s
  mask = np.ones((n_rows, length), np.int64)
  positions = np.broadcast_to(np.arange(length), (n_rows, length)).copy()
  if n_rows > 1:  # right padding
    real = length * 5 // 8
    ids[1, real:], mask[1, real:] = 0, 0
  if n_rows > 2:  # left padding
    pad = length // 4
    ids[2, :pad], mask[2, :pad] = 0, 0
    positions[2] = np.maximum(np.arange(length) - pad, 0)
  return ids, mask, positions


def encoder_output(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    out = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions))
  return out.last_hidden_state.float().numpy()


def logits(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def make_main() -> None:
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(MAIN_CONFIG, f, indent=2)
    f.write("\n")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(TOKENIZER, name), os.path.join(OUT, name))
  torch.manual_seed(0)
  model = ModernBertForMaskedLM(AutoConfig.from_pretrained(OUT, attn_implementation="eager"))
  perturb(model, seed=0, scale=0.3)
  # Stored as float16 (size); round the float32 model the same way so it computes from the stored values.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.half().float())
  state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k != "decoder.weight"}  # tied
  save_file(state, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
  os.chmod(os.path.join(OUT, "model.safetensors"), 0o644)  # safetensors writes owner-only files

  # Reload as a user would: HF must accept the hand-written directory and compute the same numbers.
  model = ModernBertForMaskedLM.from_pretrained(OUT, attn_implementation="eager", dtype=torch.float32).eval()
  ids, mask, positions = inputs(3, 32, N_TOKENS, seed=1)
  full = logits(model, ids, mask, positions)
  rng = np.random.default_rng(2)
  columns = np.sort(np.concatenate([np.arange(8), rng.choice(np.arange(8, N_TOKENS), N_LOGIT_COLUMNS - 8,
                                                                   replace=False)]))
  real = full[..., :N_TOKENS]
  np.savez(os.path.join(OUT, "expected.npz"), input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
           position_ids=positions.astype(np.int32), last_hidden_state=encoder_output(model, ids, mask, positions),
           logit_columns=columns.astype(np.int32), logits=real[..., columns],
           logsumexp=np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1)) + real.max(-1),
           argmax=real.argmax(-1).astype(np.int32))


def make_all_biases() -> None:
  out = os.path.join(OUT, "all_biases")
  torch.manual_seed(1)
  model = ModernBertForMaskedLM(ModernBertConfig(**BIAS_CONFIG, attn_implementation="eager")).eval()
  perturb(model, seed=1, scale=0.4)
  model.save_pretrained(out)  # transformers-5 layout: layer_types, rope_parameters
  os.chmod(os.path.join(out, "model.safetensors"), 0o644)
  model = ModernBertForMaskedLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
  ids, mask, positions = inputs(2, 24, BIAS_CONFIG["vocab_size"], seed=3)
  np.savez(os.path.join(out, "expected.npz"), input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
           position_ids=positions.astype(np.int32), last_hidden_state=encoder_output(model, ids, mask, positions),
           logits=logits(model, ids, mask, positions))


def main() -> None:
  make_main()
  make_all_biases()
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(OUT) for f in files)
  print(f"wrote {OUT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
