"""Writes tests/fixtures/llada_tiny/ and tests/fixtures/dream_tiny/: tiny random checkpoints in the released layouts.

Each directory looks like the real Hugging Face checkpoint scaled down (2 layers, hidden 64, 4 heads, 384
embedding rows): the real config.json keys and tensor names, bfloat16 weights, a small byte-level BPE tokenizer
with the model's special tokens and chat template. `expected.npz` holds what an INDEPENDENT numpy implementation
of each architecture computes on it (float64, from the bfloat16 weights), written here from the published model
code's facts rather than from flowlm_jax:

- LLaDA (GSAI-ML/LLaDA-8B, `modeling_llada.py`, OLMo's LLaMA block without a causal mask): RMSNorm with weight
  only; q/k/v/attn_out without bias; rotate-half RoPE (pairs j and j + head_dim/2, angles position *
  theta^(-2j/head_dim)); softmax(q k^T / sqrt(head_dim)) over the real keys; MLP ff_out(silu(ff_proj(h)) *
  up_proj(h)); ln_f; the untied output layer `ff_out`. Stored in two shards with an index, as the release is.
- Dream (Dream-org/Dream-v0-Base-7B, Qwen2.5's network without a causal mask): the same block with Qwen2's
  names, biases on q/k/v (not o_proj), 2 key-value heads shared by 4 query heads (grouped-query attention),
  an untied lm_head. Its raw logits are stored: position i holds the prediction for position i + 1.

Also stored: LLaDA's published `generate` loop (github.com/ML-GSAI/LLaDA, generate.py: low-confidence remasking,
greedy, semi-autoregressive blocks, `get_num_transfer_tokens` schedule) run on each model, for prompts of two
lengths. Dream's run reads the logits the way Dream's own generate does, `[logits[:, :1], logits[:, :-1]]`.
One deliberate difference from the published loop, which flowlm_jax's sampler shares: [MASK] and the ids past
the tokenizer (the embedding's padding rows, and the [PAD] flowlm_jax adds when pad == eos) are never predicted.
The weights' seed is the first from a fixed start whose reference runs decide every step by a margin float32
arithmetic cannot overturn and give answers of several distinct tokens (random tiny models often repeat one).

Run with the project's environment (numpy, safetensors, tokenizers, transformers; no torch):
  uv run python scripts/make_diffusion_fixtures.py
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
CORPUS = os.path.join(REPO, "flowlm_jax", "assets", "shakespeare", "train.txt")
ROWS = 384            # embedding rows (both models); the tokenizer has fewer ids, as the real ones do
BPE_VOCAB = 320       # byte-level BPE ids before the special tokens
SEQ = 24              # reference forward rows: one full, one with its last 9 keys padded
MARGIN = 2e-4         # smallest gap allowed between a reference decision and its runner-up (logits or probabilities)
DISTINCT = 3          # fewest distinct tokens in a reference answer: an answer of one repeated token tests little

LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|mdm_mask|>"]
# LLaMA-3 style turns, rendered as LLaDA-8B-Instruct's template renders them (its tokenizer_config.json): BOS,
# each turn's content trimmed and closed by <|eot_id|>, then the assistant header ALWAYS (that template ignores
# add_generation_prompt). Stored in tokenizer_config.json's `chat_template`, where the release keeps it.
LLADA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
# Qwen2's ChatML turns, as Dream-v0-Instruct-7B's template renders them
DREAM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# --- tokenizers ---------------------------------------------------------------------------------


def make_tokenizer(out: str, specials: list[str], template: str, template_in_config: bool = False, **special_roles):
  """A byte-level BPE with `specials` appended after the merges (high ids, as in the released vocabularies).

  transformers writes the chat template to chat_template.jinja; `template_in_config` moves it into
  tokenizer_config.json's `chat_template`, the older place the LLaDA release uses.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  with open(CORPUS) as f:
    text = f.read(200_000)
  tok.train_from_iterator(text.split("\n\n"), trainer)
  tok.add_special_tokens(specials)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_roles)
  fast.chat_template = template
  fast.save_pretrained(out)
  if template_in_config:
    os.remove(os.path.join(out, "chat_template.jinja"))
    with open(os.path.join(out, "tokenizer_config.json")) as f:
      tokenizer_config = json.load(f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({**tokenizer_config, "chat_template": template}, f, indent=2, sort_keys=True)
      f.write("\n")
  return fast


# --- the reference networks (numpy, float64) ----------------------------------------------------


def rms_norm(x, weight, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half_rope(x_TxHxK, positions_T, theta):
  half = x_TxHxK.shape[-1] // 2
  angles = positions_T[:, None] * theta ** (-np.arange(half) * 2.0 / x_TxHxK.shape[-1])
  cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
  rotated = np.concatenate([-x_TxHxK[..., half:], x_TxHxK[..., :half]], axis=-1)
  return x_TxHxK * cos + rotated * sin


def bidirectional_attention(q_TxHxK, k_SxGxK, v_SxGxK, real_S):
  """softmax(q k^T / sqrt(d)) v over the real keys; query head h uses key-value head h // (H / G)."""
  group = q_TxHxK.shape[1] // k_SxGxK.shape[1]
  k, v = np.repeat(k_SxGxK, group, axis=1), np.repeat(v_SxGxK, group, axis=1)
  scores = np.einsum("thd,shd->hts", q_TxHxK, k) / np.sqrt(q_TxHxK.shape[-1])
  scores = np.where(real_S[None, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("hts,shd->thd", probs, v)


def silu(x):
  return x / (1.0 + np.exp(-x))


def decoder_logits(w: dict, arch: dict, ids_T, real_T=None) -> np.ndarray:
  """[T, V] logits of one row: pre-norm blocks (attention, SwiGLU), final norm, output layer.

  `arch["name"]` maps a role to its tensor name ("{i}" the layer); roles without a name (biases) are absent.
  """
  T = len(ids_T)
  real_T = np.ones(T, bool) if real_T is None else real_T
  positions = np.arange(T, dtype=np.float64)
  H, G, eps, theta = arch["heads"], arch["kv_heads"], arch["eps"], arch["theta"]
  name, get = arch["name"], lambda role, i=0: w[arch["name"][role].format(i=i)]
  linear = lambda x, role, i: x @ get(role, i).T + (get(role + "_bias", i) if role + "_bias" in name else 0.0)
  x = get("embed")[ids_T]
  for i in range(arch["layers"]):
    h = rms_norm(x, get("attn_norm", i), eps)
    q = rotate_half_rope(linear(h, "q", i).reshape(T, H, -1), positions, theta)
    k = rotate_half_rope(linear(h, "k", i).reshape(T, G, -1), positions, theta)
    v = linear(h, "v", i).reshape(T, G, -1)
    x = x + bidirectional_attention(q, k, v, real_T).reshape(T, -1) @ get("o", i).T
    h = rms_norm(x, get("mlp_norm", i), eps)
    x = x + (silu(h @ get("gate", i).T) * (h @ get("up", i).T)) @ get("down", i).T
  return rms_norm(x, get("final_norm"), eps) @ get("head").T


# --- LLaDA's published generate loop -------------------------------------------------------------


def num_transfer_tokens(masked: int, steps: int) -> list[int]:
  """generate.py's get_num_transfer_tokens: the count split evenly, the remainder to the first steps."""
  return [masked // steps + (i < masked % steps) for i in range(steps)]


def llada_generate(logits_of, prompt, *, gen_length, steps, block_length, mask_id, banned):
  """(answer, smallest decision margin): generate.py with temperature 0, cfg 0, low_confidence remasking."""
  P = len(prompt)
  x = np.concatenate([prompt, np.full(gen_length, mask_id)])
  blocks = gen_length // block_length
  steps_per_block = steps // blocks
  margin = np.inf
  for b in range(blocks):
    block_end = P + (b + 1) * block_length
    counts = num_transfer_tokens(int(np.sum(x[P + b * block_length:block_end] == mask_id)), steps_per_block)
    for step in range(steps_per_block):
      masked = x == mask_id
      logits = logits_of(x)
      logits[:, banned] = -np.inf
      x0 = logits.argmax(-1)
      top2 = np.sort(logits, axis=-1)[:, -2:]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      x0_p = probs[np.arange(len(x)), x0]
      x0_p[block_end:] = -np.inf
      confidence = np.where(masked, x0_p, -np.inf)
      order = np.argsort(-confidence, kind="stable")
      chosen = order[:counts[step]]
      x[chosen] = x0[chosen]
      eligible = np.flatnonzero(np.isfinite(confidence))
      margin = min(margin, np.min(top2[eligible, 1] - top2[eligible, 0]))
      if counts[step] < len(eligible):  # the last chosen must beat the first left
        margin = min(margin, confidence[order[counts[step] - 1]] - confidence[order[counts[step]]])
  return x[P:], margin


def shifted(logits_TxV):
  """Dream's generate: position i reads row i - 1; position 0 its own."""
  return np.concatenate([logits_TxV[:1], logits_TxV[:-1]])


# --- writing ----------------------------------------------------------------------------------------


def random_weights(shapes: dict, seed: int) -> dict:
  """Weights of a useful size (norms near 1, projections ~ 1/sqrt(fan-in)) rounded to bfloat16."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    if "norm" in name or name.endswith(("ln_f.weight", "model.norm.weight")):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith(".bias"):
      value = 0.3 * rng.standard_normal(shape)
    elif "wte" in name or "embed_tokens" in name:
      value = rng.standard_normal(shape)
    else:  # linear layers; the output layer a little sharper so that decisions are clear
      scale = 3.0 if name.endswith(("transformer.ff_out.weight", "lm_head.weight")) else 1.0
      value = scale * rng.standard_normal(shape) / np.sqrt(shape[-1])
    out[name] = value.astype(ml_dtypes.bfloat16)
  return out


def save_weights(out: str, weights: dict, shards: int) -> None:
  names = list(weights)
  if shards == 1:
    files = {"model.safetensors": names}
  else:
    cut = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:cut], "model-00002-of-00002.safetensors": names[cut:]}
    index = {"metadata": {"total_size": int(sum(w.nbytes for w in weights.values()))},
             "weight_map": {n: f for f, ns in files.items() for n in ns}}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  for file, ns in files.items():
    save_file({n: weights[n] for n in ns}, os.path.join(out, file), metadata={"format": "pt"})
    os.chmod(os.path.join(out, file), 0o644)


def write_config(out: str, config: dict) -> None:
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")


def references(weights: dict, arch: dict, tokenizer, mask_id: int, read=lambda logits: logits,
               seed: int = 0) -> dict | None:
  """expected.npz's arrays: reference logits of two rows and the generate loop's answers for two prompts;
  None when a decision is too close to call or an answer too repetitive."""
  w64 = {n: v.astype(np.float64) for n, v in weights.items()}
  rng = np.random.default_rng(seed)
  n_tokens = len(tokenizer)
  ordinary = np.setdiff1d(np.arange(n_tokens), tokenizer.all_special_ids)
  ids = rng.choice(ordinary, size=(2, SEQ))
  ids[:, 5::6] = mask_id
  real = np.ones((2, SEQ), bool)
  real[1, 15:] = False
  logits = np.stack([decoder_logits(w64, arch, ids[r], real[r]) for r in range(2)])
  banned = np.concatenate([[mask_id], np.arange(n_tokens, ROWS)])  # never predicted (module docstring)
  logits_of = lambda x: read(decoder_logits(w64, arch, x))
  prompts = [rng.choice(ordinary, size=5), rng.choice(ordinary, size=11)]
  runs = {}
  for block_length in (8, 4):  # one block, then two semi-autoregressive blocks
    answers = []
    for prompt in prompts:
      answer, margin = llada_generate(logits_of, prompt, gen_length=8, steps=8, block_length=block_length,
                                      mask_id=mask_id, banned=banned)
      if margin <= MARGIN or len(set(answer.tolist())) < DISTINCT:
        return None
      answers.append(answer)
    runs[f"answers_block{block_length}"] = np.stack(answers).astype(np.int32)
  return dict(input_ids=ids.astype(np.int32), real=real, logits=logits.astype(np.float32),
              prompt_short=prompts[0].astype(np.int32), prompt_long=prompts[1].astype(np.int32), **runs)


def write_model(out: str, names: dict, shapes: dict, arch: dict, tokenizer, mask_id: int, *, first_seed: int,
                shards: int, read=lambda logits: logits) -> int:
  """Random weights of the first seed from `first_seed` whose references qualify; writes them and expected.npz."""
  for seed in range(first_seed, first_seed + 100):
    weights = random_weights(_per_tensor(names, shapes, arch["layers"]), seed=seed)
    expected = references(weights, arch, tokenizer, mask_id, read=read, seed=seed)
    if expected is not None:
      save_weights(out, weights, shards=shards)
      np.savez_compressed(os.path.join(out, "expected.npz"), **expected)
      return seed
  raise RuntimeError(f"{out}: no seed in 100 gave clear, varied reference answers")


def make_llada() -> None:
  out = os.path.join(FIXTURES, "llada_tiny")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  # No mask_token: LLaDA's config.json names it by id.
  tokenizer = make_tokenizer(out, LLADA_SPECIALS, LLADA_TEMPLATE, template_in_config=True, bos_token="<|startoftext|>",
                             eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLADA_SPECIALS}
  D, L, H, F = 64, 2, 4, 96
  write_config(out, {  # the released config.json's keys (LLaDA-8B: d_model 4096, 32 layers, ...)
      "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
      "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
      "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                   "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
      "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": D,
      "embedding_dropout": 0.0, "embedding_size": ROWS, "eos_token_id": ids["<|endoftext|>"],
      "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
      "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
      "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": ids["<|mdm_mask|>"],
      "max_sequence_length": 4096, "mlp_hidden_size": F, "mlp_ratio": 4, "model_type": "llada",
      "multi_query_attention": None, "n_heads": H, "n_kv_heads": H, "n_layers": L,
      "pad_token_id": ids["<|endoftext|>"], "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
      "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
      "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": ROWS,
      "weight_tying": False})
  block = "model.transformer.blocks.{i}."
  names = {"embed": "model.transformer.wte.weight", "attn_norm": block + "attn_norm.weight",
           "q": block + "q_proj.weight", "k": block + "k_proj.weight", "v": block + "v_proj.weight",
           "o": block + "attn_out.weight", "mlp_norm": block + "ff_norm.weight", "gate": block + "ff_proj.weight",
           "up": block + "up_proj.weight", "down": block + "ff_out.weight",
           "final_norm": "model.transformer.ln_f.weight", "head": "model.transformer.ff_out.weight"}
  shapes = {"embed": (ROWS, D), "attn_norm": (D,), "q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D),
            "mlp_norm": (D,), "gate": (F, D), "up": (F, D), "down": (D, F), "final_norm": (D,), "head": (ROWS, D)}
  arch = dict(name=names, layers=L, heads=H, kv_heads=H, eps=1e-5, theta=500000.0)
  write_model(out, names, shapes, arch, tokenizer, ids["<|mdm_mask|>"], first_seed=1, shards=2)


def make_dream() -> None:
  out = os.path.join(FIXTURES, "dream_tiny")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  tokenizer = make_tokenizer(out, DREAM_SPECIALS, DREAM_TEMPLATE, bos_token="<|beginoftext|>",
                             eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>")
  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in DREAM_SPECIALS}
  D, L, H, G, F = 64, 2, 4, 2, 96
  Dh = D // H
  write_config(out, {  # the released config.json's keys (Dream-v0-Base-7B: hidden 3584, 28 layers, ...)
      "architectures": ["DreamModel"], "attention_dropout": 0.0,
      "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
      "bos_token_id": ids["<|beginoftext|>"], "eos_token_id": ids["<|endoftext|>"], "hidden_act": "silu",
      "hidden_size": D, "initializer_range": 0.02, "intermediate_size": F, "mask_token_id": ids["<|mask|>"],
      "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
      "num_attention_heads": H, "num_hidden_layers": L, "num_key_value_heads": G,
      "pad_token_id": ids["<|endoftext|>"], "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
      "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False, "vocab_size": ROWS})
  layer = "model.layers.{i}."
  names = {"embed": "model.embed_tokens.weight", "attn_norm": layer + "input_layernorm.weight",
           "q": layer + "self_attn.q_proj.weight", "q_bias": layer + "self_attn.q_proj.bias",
           "k": layer + "self_attn.k_proj.weight", "k_bias": layer + "self_attn.k_proj.bias",
           "v": layer + "self_attn.v_proj.weight", "v_bias": layer + "self_attn.v_proj.bias",
           "o": layer + "self_attn.o_proj.weight", "mlp_norm": layer + "post_attention_layernorm.weight",
           "gate": layer + "mlp.gate_proj.weight", "up": layer + "mlp.up_proj.weight",
           "down": layer + "mlp.down_proj.weight", "final_norm": "model.norm.weight", "head": "lm_head.weight"}
  shapes = {"embed": (ROWS, D), "attn_norm": (D,), "q": (H * Dh, D), "q_bias": (H * Dh,), "k": (G * Dh, D),
            "k_bias": (G * Dh,), "v": (G * Dh, D), "v_bias": (G * Dh,), "o": (D, H * Dh), "mlp_norm": (D,),
            "gate": (F, D), "up": (F, D), "down": (D, F), "final_norm": (D,), "head": (ROWS, D)}
  arch = dict(name=names, layers=L, heads=H, kv_heads=G, eps=1e-6, theta=1000000.0)
  write_model(out, names, shapes, arch, tokenizer, ids["<|mask|>"], first_seed=101, shards=1, read=shifted)


def _per_tensor(names: dict, shapes: dict, n_layers: int) -> dict:
  """{HF name: shape} with "{i}" expanded for every layer."""
  return {name.format(i=i): shapes[role] for role, name in names.items()
          for i in (range(n_layers) if "{i}" in name else [0])}


def main() -> None:
  make_llada()
  make_dream()
  for name in ("llada_tiny", "dream_tiny"):
    d = os.path.join(FIXTURES, name)
    print(f"wrote {d}: {sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
