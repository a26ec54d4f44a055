"""The configuration schema: every knob with its default, size presets, YAML overlays and validation.

`base_config()` is the schema. Preset files in `configs/` start from it, pick a method (LLaDA or
FlowLM) and a size/data variant, and `validate()` checks a resolved config against the schema before
anything heavy runs. Field names follow the original PyTorch FlowLM system where it has them, so its
YAML files (`masking: {strategy: FLOWLM_STRATEGY}`, `training: {batch_size: 64}`, ...) load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections
import yaml

from flowlm_jax.tokenizer import EMBEDDED as EMBEDDED_TOKENIZERS

ConfigDict = ml_collections.ConfigDict

# The sections a config has, in the order `to_yaml` prints them.
SECTIONS = ("model", "dataset", "masking", "training", "dataloader", "evaluation", "inference",
            "logging", "mesh")

DEFAULT_TEST_PROMPTS = ("To be, or not to be", "add 12 30", "reverse d o g", "sort 4 1 3 2")


def base_config() -> ConfigDict:
  """All fields with their defaults. A field not listed here does not exist (validate() rejects it)."""
  c = ConfigDict()

  c.model = m = ConfigDict()
  m.family = "llama"            # "llama": bidirectional LLaMA-style transformer | "modernbert" (pretrained)
  m.pretrained = ""             # HF model to start from, whose config.json is the architecture (the size fields
                                # below are then ignored): llama family, a local LLaDA or Dream directory;
                                # modernbert, a directory or hub name (docs/pretrained.md)
  m.tokenizer = "embedded"      # "embedded" (shipped 8k byte-level BPE), "embedded:bytes", a local dir or a hub name
  m.vocab_size = 0              # embedding rows; 0 = len(tokenizer) rounded up to vocab_multiple
  m.vocab_multiple = 128        # pad the embedding table so matmuls tile well
  m.d_model = 128
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 0              # grouped-query attention; 0 = n_heads (plain multi-head)
  m.d_ff = 384                  # SwiGLU hidden size
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.init_std = 0.02
  m.tie_embeddings = False      # share the embedding with the output projection
  m.qkv_bias = False            # q/k/v projections with biases (Qwen2, hence Dream); model.pretrained sets its own
  m.shift_logits = False        # position p predicted from position p - 1's output (Dream); likewise
  m.param_dtype = "float32"     # master weights
  m.compute_dtype = "bfloat16"  # activations and matmuls
  m.matmul_dtype = "bfloat16"   # "fp8": training runs the layers' projections in FP8 with delayed scaling
                                # (llama family, Hopper GPUs; docs/performance.md "FP8"); "bfloat16": all matmuls
                                # in compute_dtype. Evaluation and sampling always use compute_dtype.
  m.remat = "none"              # "none" | "full" | "save_dots": what the backward pass recomputes
                                # (docs/performance.md compares them)
  m.scan_unroll = 1             # layers per lax.scan iteration (n_layers: no loop; see performance.md)
  m.attention = "auto"          # "auto" (cuDNN flash on GPU, XLA elsewhere) | "xla" | "cudnn"
  m.loss_chunk_size = 0         # >0: cross-entropy over this many positions at a time (no full f32 logits)

  c.dataset = d = ConfigDict()
  d.name = "embedded:shakespeare"  # "embedded:shakespeare", "embedded:sft_tasks", a hub name, or ""
  d.kind = "text"               # "text": pack plain text | "sft": prompt/answer or messages records
  d.train_files = ""            # comma-separated local .txt/.json/.jsonl files (used when name is "")
  d.validation_files = ""       # same; empty = hold out validation_split_ratio of the training data
  d.validation_split_ratio = 0.05
  d.hub_config = ""             # dataset configuration name on the hub
  d.train_split = "train"
  d.validation_split = ""       # hub split name for validation; "" = hold out from train
  d.text_field = "text"
  d.text_sample_by = "paragraph"  # local .txt files: a document per "paragraph" (blank-line separated) or "line"
  d.prompt_field = "prompt"
  d.answer_field = "answer"
  d.messages_field = "messages"  # chat records, e.g. tulu-3-sft-mixture
  d.prompt_format = "auto"      # "plain" | "chat" (the tokenizer's chat template, else "User: … [SEP] Assistant:"); "auto": chat iff records
                                # have messages_field (resolved when data loads, saved with checkpoints)
  d.max_length = 128            # sequence length of a training row
  d.overlong = "truncate"       # SFT records longer than max_length: "truncate" (counted) | "error"
  # SFT: () fills each row to max_length with [EOS] (LLaDA's SFT layout). Answer lengths, e.g. (256, 512): each
  # answer is filled with [EOS] to the smallest that holds it and the row ends there ([PAD] after, unseen), as
  # the sampler's row (prompt + answer_length) does; a model that places tokens by their distance to the row's
  # end (copy, reverse) then sees at inference the layout it was trained on (docs/performance.md).
  d.answer_slots = ()
  d.max_train_examples = 0      # 0 = all
  d.max_validation_examples = 0
  d.cache_dir = ""              # HF datasets cache; "" = library default

  c.masking = k = ConfigDict()
  k.strategy = "LLADA_STRATEGY"  # BERT_STRATEGY | LLADA_STRATEGY | FLOWLM_STRATEGY | ABSORBING_STRATEGY | CUSTOM
  k.mask_prob = 0.9             # used when strategy == "CUSTOM": chosen positions -> [MASK]
  k.random_prob = 0.1           # ... -> a random non-special token
  k.keep_prob = 0.0             # ... -> unchanged (still predicted)
  k.min_ratio = 0.0             # per-sequence ratio r ~ U[min_ratio, max_ratio]
  k.max_ratio = 1.0
  k.eps = 1e-3                  # corruption probability t = (1 - eps) r + eps (LLaDA)
  k.clean_prefix_prob = 0.0     # training: share of rows whose answer starts clean (nearer a semi-
  k.clean_prefix_block = 32     #   autoregressive sampler's states; masking.keep_clean_prefix), in multiples of this
  k.mix_strategy = ""           # training: a second strategy for a share mix_prob of the rows, e.g. LLADA_STRATEGY
  k.mix_prob = 0.0              #   in a FlowLM run, whose answers are then sometimes mostly [MASK], as LLaDA's sampler's

  c.training = t = ConfigDict()
  t.loss = "llada"              # "llada" (1/t-weighted) | "flowlm" (all corrupted positions)
  t.loss_weighting = "none"     # flowlm loss only: "none" (plain MLM cross-entropy) | "inverse_t" | "gidd"
                                # (the exact ELBO of the masking strategy's [MASK] + uniform mix; losses.py)
  t.batch_size = 32             # global sequences per optimiser step
  t.gradient_accumulation_steps = 1
  t.learning_rate = 3e-3
  t.min_learning_rate_ratio = 0.1  # cosine decays to learning_rate * this
  t.lr_schedule = "cosine"      # "cosine" | "linear" | "constant" (all after linear warmup)
  t.warmup_ratio = 0.05
  t.warmup_steps = 0            # >0 overrides warmup_ratio
  t.weight_decay = 0.1          # AdamW; never applied to norms, biases or embeddings
  t.adam_beta1 = 0.9
  t.adam_beta2 = 0.95
  t.adam_eps = 1e-8
  t.gradient_clip_val = 1.0     # global-norm clipping; 0 = off
  t.num_epochs = 1.0
  t.max_steps = 0               # >0 overrides num_epochs
  t.seed = 0
  t.init_from = ""              # a directory written by `python -m flowlm_jax.export` whose weights a new run starts
                                # from (step 0, fresh optimiser); same architecture and tokenizer; a resume ignores it
  t.save_steps = 100            # checkpoint period in steps (and a final save)
  t.save_total_limit = 3        # checkpoints kept
  t.async_checkpointing = True
  t.nonfinite = "skip"          # NaN/inf loss or gradient: "skip" the update (counted) | "stop"
  t.stop_check_every = 10       # multi-process: steps between the processes' agreement on a stop (a signal
                                # reaching one of them); one process checks every step

  c.dataloader = dl = ConfigDict()
  dl.shuffle = True             # reshuffle every epoch with a seed derived from (seed, epoch)
  dl.seed = 0                   # an epoch's rows that do not fill a last global batch are left out of it
                                # (shapes stay static for jit); shuffled, the next epoch leaves out others

  c.evaluation = e = ConfigDict()
  e.eval_steps = 100            # evaluate every this many steps (and at the end); 0 = only at end
  e.eval_batches = 8            # validation batches per evaluation; 0 = the whole split
  e.eval_batch_size = 0         # 0 = training.batch_size
  e.seed = 1234                 # fixed corruption key: every evaluation sees the same noise

  c.inference = i = ConfigDict()
  i.test_prompts = DEFAULT_TEST_PROMPTS  # list-valued fields are tuples, which the command line can set
  i.at_evaluation = True        # sample the test prompts (both modes) with every evaluation and at the end
  i.every_steps = 0             # also sample them every this many steps; 0 = only with evaluations
  i.test_both_modes = True      # run both LLaDA and FlowLM decoding on the test prompts
  i.mode = "flowlm"             # the mode used when only one runs: "llada" | "flowlm"
  i.answer_length = 16
  i.seed = 0
  # LLaDA decoding (Nie et al. 2025, Alg. low-confidence remasking)
  i.steps = 16
  i.block_length = 0            # semi-autoregressive blocks; 0 = one block of answer_length
  i.temperature = 0.0           # Gumbel-noise temperature; 0 = greedy
  i.remasking = "low_confidence"  # "low_confidence" | "random"
  i.cfg_scale = 0.0             # classifier-free guidance; 0 = off
  # FlowLM any-position decoding
  i.confidence_threshold = 0.7
  i.max_replacements = 2
  i.replacement_strategy = "below_threshold"  # | "most_confident_changes" | "fill_then_refine"
  i.max_steps = 32
  i.initial_answer = "mask"     # "mask" | "random"
  # Fast decoding for both (Fast-dLLM, Wu et al. 2025; docs/sampling.md)
  i.cache = "none"              # key/value cache between refreshes: "none" | "prefix" | "dual" (approximate)
  i.cache_refresh = 0           # also refresh the cache every this many steps (0: LLaDA at each block's
                                # first step only, FlowLM every sampling.FLOWLM_CACHE_REFRESH = 8 steps)
  i.parallel_threshold = 0.0    # > 0: also commit every candidate whose confidence is above it; 0 = off
  i.parallel_factor = 0.0       # > 0: also commit the most confident n candidates, n the largest whose i-th
                                # has confidence >= 1 - factor / (i + 1) (Fast-dLLM's factor rule); 0 = off

  c.logging = lg = ConfigDict()
  lg.log_every = 10             # training metrics every this many steps
  lg.progress_bar = True
  lg.samples_print_seconds = 60.0  # console: test-prompt answers at most once per this many seconds (and at
                                # the end); samples.jsonl and wandb get every one
  lg.wandb = w = ConfigDict()
  w.mode = "offline"            # "disabled" | "offline" | "online"
  w.project = "flowlm-jax"
  w.name = ""                   # "" = the workdir's name
  w.entity = ""
  w.tags = ()
  w.log_model = False           # upload checkpoints as wandb model artifacts

  c.mesh = ms = ConfigDict()
  ms.data = -1                  # -1 = all devices not used by the other axes
  ms.fsdp = 1                   # parameters and optimiser state sharded over this axis
  ms.tensor = 1                 # attention heads and MLP hidden split over this axis
  return c


# --- methods: what distinguishes LLaDA from FlowLM ---------------------------------------------

METHODS = {
    # LLaDA, as the original system trains it: 90% [MASK] / 10% random (Nie et al. 2025 mask only:
    # ABSORBING_STRATEGY), ratios 0.15-0.99, 1/t-weighted loss.
    "llada": {"masking.strategy": "LLADA_STRATEGY", "training.loss": "llada", "inference.mode": "llada"},
    # FlowLM: 30% [MASK] / 70% random, every corrupted position in the loss; the original FlowLM used
    # plain masked-LM cross-entropy (no 1/t weight); decoding may rewrite any answer position.
    "flowlm": {"masking.strategy": "FLOWLM_STRATEGY", "training.loss": "flowlm",
               "training.loss_weighting": "none", "inference.mode": "flowlm"},
}


def preset(method: str, variant: str | None) -> ConfigDict:
  """The config of `configs/<method>.py:<variant>`."""
  c = base_config()
  c.masking.min_ratio, c.masking.max_ratio = 0.15, 0.99  # as in the original system
  apply_overrides(c, METHODS[method])
  c.logging.wandb.tags = (method,)
  return apply_variant(c, variant)


# --- size and data variants -------------------------------------------------------------------

SIZES = {
    # name: model shape and max_length
    "demo": dict(d_model=128, n_layers=2, n_heads=4, d_ff=384, max_length=128),
    "small": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_length=1024),
    "1b": dict(d_model=2048, n_layers=22, n_heads=16, d_ff=5632, max_length=2048),
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=12288, max_length=4096,
               vocab_size=126464),
}


PRETRAINED = {
    # name: the HF model (weights and tokenizer) a variant fine-tunes
    "modernbert-large": "answerdotai/ModernBERT-large",
}
# name: the local HF directory (LLaDA's layout) a variant fine-tunes, relative to where launch.py runs
DIFFUSION_LMS = {
    "llada-8b": os.path.join("pretrained", "LLaDA-8B-Base"),  # huggingface.co/GSAI-ML/LLaDA-8B-Base
}
VARIANTS = (*SIZES, "tasks", "tasks_long", *PRETRAINED, *DIFFUSION_LMS)


def apply_variant(c: ConfigDict, variant: str | None) -> ConfigDict:
  """Sets model size and data for a preset variant (`configs/flowlm.py:small`)."""
  variant = variant or "demo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(VARIANTS)}")
  if variant in PRETRAINED:
    return _fine_tune(c, PRETRAINED[variant])
  if variant in DIFFUSION_LMS:
    return _fine_tune_diffusion_lm(c, DIFFUSION_LMS[variant])
  _set_size(c, "demo" if variant in ("tasks", "tasks_long") else variant)
  if variant in ("demo", "tasks"):  # CPU-sized: bf16 is emulated (slow) on CPUs, so compute in float32
    c.model.compute_dtype = "float32"
  if variant == "demo":
    # ~3 minutes on 2 CPU cores. What a model this size learns in that time is bounded by the tokens it
    # sees (measured: same loss at batch 8 x 1200 steps as 16 x 600, for 2 or 4 layers, lr 1e-3..4e-3);
    # with one id per byte it learns spelling and local context within that budget, whereas with the
    # 8k BPE it stayed at the unigram baseline (README, docs/architecture.md).
    c.model.tokenizer = "embedded:bytes"
    c.training.batch_size = 16
    c.training.learning_rate = 2e-3
    c.training.max_steps = 600
    c.inference.test_prompts = ("To be, or not to be", "O Romeo, Romeo,")
  elif variant == "tasks":
    c.model.n_layers = 4
    c.inference.test_prompts = ("add 12 30", "reverse d o g", "sort 4 1 3 2")
    c.training.learning_rate = 1e-3  # 3e-3 learnt context far slower with the 8k vocabulary (measured)
  elif variant == "tasks_long":  # 128-511-token answers for the fast samplers (docs/sampling.md): one GPU
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 256, 6, 4, 768
    c.inference.test_prompts = ("count 10 5 60", "copy " + " ".join("abcdefghijklmnopqrstuvwxyz" * 6))
    c.training.learning_rate = 1e-3
  else:  # large shapes: bf16 compute, big-batch optimiser settings, remat, chunked cross-entropy
    c.training.learning_rate = 3e-4
    c.training.warmup_steps = 2000
    c.model.remat = "save_dots"
    c.model.loss_chunk_size = 256
    c.model.scan_unroll = c.model.n_layers  # a rolled scan copies each layer's saved activations
    if variant == "8b":  # ... but unrolled, XLA holds more layers' gathered weights at once: under fsdp on
      c.model.scan_unroll = 1  # 4 x 80 GB it needed 77 GiB per GPU, rolled 55.6 (docs/scaling.md)
    c.evaluation.eval_steps = 1000
    c.training.save_steps = 1000
  if variant == "tasks":  # the embedded SFT task set: scores samplers by exact match
    c.dataset.name = "embedded:sft_tasks"
    c.dataset.kind = "sft"
    c.dataset.max_length = 24     # prompts take <= 8 tokens: answers get >= 16 slots, as at inference
    c.training.batch_size = 64
    c.training.num_epochs = 6.0   # ~11 min on 2 CPU cores; exact match in README
    c.inference.answer_length = 16
    c.inference.steps = 16
    c.inference.max_steps = 16
  if variant == "tasks_long":  # the long-answer set: exact match and speed of the fast samplers
    c.dataset.name, c.dataset.kind = "embedded:sft_tasks_long", "sft"
    c.dataset.max_length = 1032   # the longest prompt + [SEP] + answer + [EOS]: 1025 tokens
    c.dataset.answer_slots = (256, 512)  # rows end where the sampler's do, at the answer length decoded at
    c.training.batch_size = 32
    c.training.num_epochs = 40.0  # 75 steps an epoch
    c.evaluation.eval_steps = 500
    i = c.inference               # Fast-dLLM's baseline: one token per step, blocks of 32
    i.answer_length = i.steps = i.max_steps = 512
    i.block_length = 32
  return c


def _fine_tune(c: ConfigDict, pretrained: str) -> ConfigDict:
  """Instruction-tunes a pretrained masked LM on tulu-3-sft-mixture (chat records, "User: ... [SEP] Assistant:").

  Fine-tuning settings in the BERT tradition: small peak lr, 6% warmup, cosine to 0, light weight decay.
  """
  c.model.family = "modernbert"
  c.model.pretrained = c.model.tokenizer = pretrained
  c.model.remat = "save_dots"
  c.model.loss_chunk_size = 256  # a 50k vocabulary: no full float32 [B, L, V] logits
  c.dataset.name = "allenai/tulu-3-sft-mixture"
  c.dataset.kind = "sft"
  c.dataset.max_length = 512
  t = c.training
  t.batch_size, t.learning_rate, t.lr_schedule, t.min_learning_rate_ratio = 32, 2e-5, "cosine", 0.0
  t.warmup_ratio, t.warmup_steps, t.weight_decay, t.num_epochs = 0.06, 0, 0.01, 1.0
  c.evaluation.eval_steps = c.training.save_steps = 200
  c.inference.answer_length, c.inference.confidence_threshold, c.inference.max_replacements = 16, 0.7, 2
  return c


def _fine_tune_diffusion_lm(c: ConfigDict, directory: str) -> ConfigDict:
  """SFT of a pretrained masked-diffusion LM (LLaDA-8B-Base) on tulu-3-sft-mixture with the preset's objective.

  LLaDA's own SFT (Nie et al. 2025, sec. 2.3 and app. B.1): length 4096, peak lr 2.5e-5 after 50 warmup
  steps, weight decay 0.1 (its schedule stays flat and decays linearly over the last 10%; here cosine to 10%).
  Memory for 4 x 80 GB GPUs as measured for the `8b` preset, which has the same shapes (docs/scaling.md,
  docs/pretrained.md): FSDP over 4 devices, remat save_dots, a rolled layer scan, chunked cross-entropy,
  global batch 8 (2 sequences of 4096 tokens per GPU).
  """
  _set_size(c, "8b")  # LLaDA-8B's shape; config.json in `directory` is what builds the model
  c.model.pretrained = c.model.tokenizer = directory
  c.model.remat, c.model.scan_unroll, c.model.loss_chunk_size = "save_dots", 1, 256
  c.mesh.fsdp = 4
  c.dataset.name, c.dataset.kind = "allenai/tulu-3-sft-mixture", "sft"
  t = c.training
  t.batch_size, t.learning_rate, t.warmup_steps, t.weight_decay = 8, 2.5e-5, 50, 0.1
  t.lr_schedule, t.min_learning_rate_ratio, t.num_epochs = "cosine", 0.1, 1.0
  c.evaluation.eval_steps = t.save_steps = 1000  # a checkpoint of the train state is ~128 GB
  i = c.inference
  i.answer_length, i.steps, i.block_length, i.max_steps = 64, 64, 32, 64
  return c


def _set_size(c: ConfigDict, name: str) -> None:
  shape = dict(SIZES[name])
  c.dataset.max_length = shape.pop("max_length")
  for key, value in shape.items():
    c.model[key] = value


# --- YAML overlay ---------------------------------------------------------------------------


def apply_yaml(c: ConfigDict, path: str) -> ConfigDict:
  """Overlays the values in a YAML file (only those that differ from the preset).

  Safe loading only; an unknown key is an error naming its dotted path.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config_yaml: no such file: {path}")
  with open(path) as f:
    overlay = yaml.safe_load(f) or {}
  if not isinstance(overlay, dict):
    raise ValueError(f"--config_yaml: {path} must hold a mapping of sections, got {type(overlay).__name__}")
  _merge(c, overlay, prefix="")
  return c


def apply_overrides(c: ConfigDict, flat: dict[str, Any]) -> ConfigDict:
  """Sets dotted keys (`{"training.batch_size": 64}`), e.g. command-line overrides after a YAML overlay."""
  for dotted, value in flat.items():
    nested: Any = value
    for part in reversed(dotted.split(".")):
      nested = {part: nested}
    _merge(c, nested, prefix="")
  return c


def _merge(node: ConfigDict, overlay: dict, prefix: str) -> None:
  for key, value in overlay.items():
    path = f"{prefix}{key}"
    if key not in node:
      raise KeyError(f"unknown config key {path!r} (in YAML overlay)")
    current = node[key]
    if isinstance(current, ConfigDict):
      if not isinstance(value, dict):
        raise TypeError(f"config key {path!r} is a section; YAML gave {type(value).__name__}")
      _merge(current, value, prefix=f"{path}.")
    else:
      value = _coerce(path, current, value)
      try:
        with node.unlocked():
          node[key] = value
      except TypeError:
        raise TypeError(f"config key {path!r} expects {type(current).__name__}, got {type(value).__name__} {value!r}") from None


def _coerce(path: str, default: Any, value: Any) -> Any:
  """YAML reads `1e-4` as a string and `64` as int where a float is expected: convert safely."""
  if isinstance(default, bool) or default is None:
    return value
  if isinstance(value, bool):
    raise TypeError(f"config key {path!r} expects {type(default).__name__}, got bool {value!r}")
  if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
    try:
      return float(value)
    except ValueError:
      raise TypeError(f"config key {path!r} expects a float, got {value!r}") from None
  if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
    return tuple(value)  # YAML and JSON give lists; the schema holds tuples (command-line overridable)
  return value


# --- validation -----------------------------------------------------------------------------


def validate(c: ConfigDict, num_devices: int | None = None) -> ConfigDict:
  """Checks a resolved config; raises ValueError/TypeError/KeyError with one line naming the key."""
  _check_schema(c, base_config(), prefix="")
  _check_values(c)
  if num_devices is not None:
    mesh_shape(c, num_devices)  # raises when the mesh does not fit
    dp = data_parallel_degree(c, num_devices)
    micro = c.training.batch_size // c.training.gradient_accumulation_steps
    if micro % dp:
      raise ValueError(
          f"training.batch_size={c.training.batch_size} / gradient_accumulation_steps="
          f"{c.training.gradient_accumulation_steps} = {micro} is not divisible by the data-parallel "
          f"degree {dp} (mesh.data x mesh.fsdp)")
    eval_bs = c.evaluation.eval_batch_size or c.training.batch_size
    if eval_bs % dp:
      raise ValueError(f"evaluation.eval_batch_size={eval_bs} is not divisible by the data-parallel degree {dp}")
  return c


def _check_schema(c: ConfigDict, schema: ConfigDict, prefix: str) -> None:
  for key in c.keys():
    if key not in schema:
      raise KeyError(f"unknown config key {prefix + key!r}")
  for key in schema.keys():
    path = prefix + key
    if key not in c:
      raise KeyError(f"missing config key {path!r}")
    expected, got = schema[key], c[key]
    if isinstance(expected, ConfigDict):
      if not isinstance(got, ConfigDict):
        raise TypeError(f"config key {path!r} must be a section")
      _check_schema(got, expected, prefix=path + ".")
    elif not _type_ok(expected, got):
      raise TypeError(f"config key {path!r} expects {type(expected).__name__}, got {type(got).__name__} {got!r}")


def _type_ok(default: Any, value: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(default))


# Fields whose value must be one of a fixed set of names.
CHOICES = {
    "model.family": ("llama", "modernbert"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.matmul_dtype": ("bfloat16", "fp8"),
    "model.remat": ("none", "full", "save_dots"),
    "model.attention": ("auto", "xla", "cudnn"),
    "dataset.kind": ("text", "sft"),
    "dataset.overlong": ("truncate", "error"),
    "dataset.prompt_format": ("auto", "plain", "chat"),
    "dataset.text_sample_by": ("paragraph", "line"),
    "training.loss": ("llada", "flowlm"),
    "training.loss_weighting": ("inverse_t", "none", "gidd"),
    "training.lr_schedule": ("cosine", "linear", "constant"),
    "training.nonfinite": ("skip", "stop"),
    "inference.mode": ("llada", "flowlm"),
    "inference.remasking": ("low_confidence", "random"),
    "inference.replacement_strategy": ("below_threshold", "most_confident_changes", "fill_then_refine"),
    "inference.initial_answer": ("mask", "random"),
    "inference.cache": ("none", "prefix", "dual"),
    "logging.wandb.mode": ("disabled", "offline", "online"),
}


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ValueError(f"{key}: {message}")


def _choice(c: ConfigDict, key: str, options: tuple[str, ...]) -> None:
  value = c
  for part in key.split("."):
    value = value[part]
  _require(value in options, key, f"{value!r} is not one of {', '.join(options)}")


def _check_values(c: ConfigDict) -> None:
  from flowlm_jax import masking  # local import: masking pulls jax

  m, d, k, t, e, i = c.model, c.dataset, c.masking, c.training, c.evaluation, c.inference
  for key, options in CHOICES.items():
    _choice(c, key, options)
  for key in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_multiple"):
    _require(m[key] > 0, f"model.{key}", f"must be > 0, got {m[key]}")
  _require(m.d_model % m.n_heads == 0, "model.n_heads", f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}")
  kv = m.n_kv_heads or m.n_heads
  _require(m.n_heads % kv == 0, "model.n_kv_heads", f"n_heads={m.n_heads} is not a multiple of n_kv_heads={kv}")
  _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "head dimension must be even for RoPE")
  _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
  _require(m.loss_chunk_size >= 0, "model.loss_chunk_size", "must be >= 0")
  _require(m.scan_unroll >= 1, "model.scan_unroll", f"must be >= 1, got {m.scan_unroll}")
  if m.family == "modernbert" or m.pretrained:
    _check_pretrained(m)
  _require(m.matmul_dtype != "fp8" or m.family == "llama", "model.matmul_dtype",
           f"fp8 is implemented for the llama family only (random init, LLaDA, Dream); family={m.family!r} "
           "has no FP8 path")
  # flax's e5m2 gradient scale (amax / 57344, ~5e-8) underflows float16 to 0: every step after the first is NaN.
  _require(m.matmul_dtype != "fp8" or m.compute_dtype != "float16", "model.matmul_dtype",
           "fp8 needs model.compute_dtype bfloat16 or float32 (float16 cannot hold the gradient scales)")

  _require(d.max_length > 0, "dataset.max_length", f"must be > 0, got {d.max_length}")
  for key in ("max_train_examples", "max_validation_examples"):
    _require(d[key] >= 0, f"dataset.{key}", f"must be >= 0 (0 = all), got {d[key]}")
  # A tuple flag's single value stays text (it may be a prompt): `--config.dataset.answer_slots=8` arrives as '8'.
  as_text = any(isinstance(n, str) for n in d.answer_slots)
  _require(all(isinstance(n, int) and 0 < n < d.max_length for n in d.answer_slots), "dataset.answer_slots",
           f"must be answer lengths between 1 and max_length - 1 = {d.max_length - 1}, got {tuple(d.answer_slots)}"
           + ("; on the command line give a tuple: --config.dataset.answer_slots='(8,)'" if as_text else ""))
  _require(0.0 <= d.validation_split_ratio < 1.0, "dataset.validation_split_ratio", "must be in [0, 1)")
  _require(bool(d.name or d.train_files), "dataset.name", "set a dataset name or dataset.train_files")
  for key in ("train_files", "validation_files"):
    for path in split_files(d[key]):
      _require(os.path.isfile(path), f"dataset.{key}", f"no such file: {path}")

  _require(k.strategy in (*masking.STRATEGIES, "CUSTOM"), "masking.strategy",
           f"{k.strategy!r} is not one of {', '.join((*masking.STRATEGIES, 'CUSTOM'))}")
  for key in ("min_ratio", "max_ratio", "mask_prob", "random_prob", "keep_prob"):
    _require(0.0 <= k[key] <= 1.0, f"masking.{key}", f"must be in [0, 1], got {k[key]}")
  _require(0.0 <= k.eps < 1.0, "masking.eps", f"must be in [0, 1), got {k.eps}")
  _require(k.min_ratio <= k.max_ratio, "masking.min_ratio", f"min_ratio={k.min_ratio} > max_ratio={k.max_ratio}")
  _require(k.max_ratio > 0 or k.eps > 0, "masking.max_ratio",
           "is 0 and so is masking.eps: t = 0 always, so nothing is ever corrupted")
  _require(0.0 <= k.clean_prefix_prob <= 1.0, "masking.clean_prefix_prob", f"must be in [0, 1], got {k.clean_prefix_prob}")
  _require(k.clean_prefix_block >= 1, "masking.clean_prefix_block", f"must be >= 1, got {k.clean_prefix_block}")
  _require(0.0 <= k.mix_prob <= 1.0, "masking.mix_prob", f"must be in [0, 1], got {k.mix_prob}")
  _require(k.mix_strategy in ("", *masking.STRATEGIES), "masking.mix_strategy",
           f"{k.mix_strategy!r} is not one of {', '.join(masking.STRATEGIES)} (or empty: no mix)")
  _require(k.mix_prob == 0 or k.mix_strategy, "masking.mix_strategy", f"must name a strategy when mix_prob={k.mix_prob}")
  _require(k.mix_prob > 0 or not k.mix_strategy, "masking.mix_prob",
           f"is 0, so mix_strategy={k.mix_strategy!r} would mix nothing: set mix_prob > 0 or leave mix_strategy empty")
  _require(k.mix_prob == 0 or not (t.loss == "flowlm" and t.loss_weighting == "gidd"), "masking.mix_prob",
           "must be 0 with training.loss_weighting=gidd (the exact ELBO of one noise process)")
  if k.strategy == "CUSTOM":
    total = k.mask_prob + k.random_prob + k.keep_prob
    _require(math.isclose(total, 1.0, abs_tol=1e-6), "masking.mask_prob",
             f"mask_prob + random_prob + keep_prob = {total:g}, must sum to 1")
    _require(k.keep_prob < 1.0, "masking.keep_prob", "must be < 1: with keep_prob = 1 nothing is ever corrupted")

  for key in ("batch_size", "gradient_accumulation_steps", "save_steps", "save_total_limit"):
    _require(t[key] > 0, f"training.{key}", f"must be > 0, got {t[key]}")
  _require(t.batch_size % t.gradient_accumulation_steps == 0, "training.gradient_accumulation_steps",
           f"batch_size={t.batch_size} is not divisible by {t.gradient_accumulation_steps}")
  _require(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
  for key in ("warmup_ratio", "min_learning_rate_ratio"):
    _require(0.0 <= t[key] <= 1.0, f"training.{key}", f"must be in [0, 1], got {t[key]}")
  for key in ("adam_beta1", "adam_beta2"):  # 1 makes Adam's bias correction 0/0
    _require(0.0 <= t[key] < 1.0, f"training.{key}", f"must be in [0, 1), got {t[key]}")
  _require(t.adam_eps > 0, "training.adam_eps", f"must be > 0 (a zero gradient would divide 0 by 0), got {t.adam_eps}")
  _require(t.stop_check_every >= 1, "training.stop_check_every", f"must be >= 1, got {t.stop_check_every}")
  for key in ("weight_decay", "gradient_clip_val", "warmup_steps", "max_steps"):
    _require(t[key] >= 0, f"training.{key}", f"must be >= 0, got {t[key]}")
  _require(t.num_epochs > 0 or t.max_steps > 0, "training.num_epochs", "set num_epochs > 0 or max_steps > 0")
  # What the directory holds is checked only where a run starts from it (warm_start.check): a resume needs it not.
  _require(not (t.init_from and m.pretrained), "training.init_from",
           f"set it or model.pretrained ({m.pretrained!r}), not both: a run starts from one set of weights")

  _require(e.eval_steps >= 0 and e.eval_batches >= 0 and e.eval_batch_size >= 0, "evaluation.eval_steps",
           "eval_steps, eval_batches and eval_batch_size must be >= 0")
  for key in ("answer_length", "steps", "max_steps", "max_replacements"):
    _require(i[key] > 0, f"inference.{key}", f"must be > 0, got {i[key]}")
  _require(0.0 <= i.confidence_threshold <= 1.0, "inference.confidence_threshold", "must be in [0, 1]")
  _require(0.0 <= i.parallel_threshold <= 1.0, "inference.parallel_threshold", "must be in [0, 1] (0 = off)")
  _require(i.parallel_factor >= 0.0, "inference.parallel_factor", f"must be >= 0 (0 = off), got {i.parallel_factor}")
  _require(not (i.parallel_threshold and i.parallel_factor), "inference.parallel_factor",
           "set it or inference.parallel_threshold, not both: they are two rules for the same choice")
  _require(i.cache_refresh >= 0, "inference.cache_refresh", f"must be >= 0, got {i.cache_refresh}")
  _require(i.temperature >= 0 and i.cfg_scale >= 0, "inference.temperature", "temperature and cfg_scale must be >= 0")
  _require(i.block_length >= 0, "inference.block_length", f"must be >= 0 (0: the whole answer), got {i.block_length}")
  block = i.block_length or i.answer_length
  _require(i.answer_length % block == 0, "inference.block_length",
           f"answer_length={i.answer_length} is not a multiple of block_length={block}")
  _require(i.steps % (i.answer_length // block) == 0, "inference.steps",
           f"steps={i.steps} is not divisible by the number of blocks {i.answer_length // block}")
  _require(i.every_steps >= 0, "inference.every_steps", "must be >= 0")
  _require(c.logging.samples_print_seconds >= 0, "logging.samples_print_seconds", "must be >= 0")
  _require(all(isinstance(p, str) for p in i.test_prompts), "inference.test_prompts", "must be a list of strings")

  _require(c.logging.log_every > 0, "logging.log_every", "must be > 0")
  for key in ("data", "fsdp", "tensor"):
    _require(c.mesh[key] == -1 or c.mesh[key] > 0, f"mesh.{key}", f"must be -1 or > 0, got {c.mesh[key]}")
  _require([c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) <= 1, "mesh.data", "at most one mesh axis may be -1")


def _check_pretrained(m: ConfigDict) -> None:
  """Pretrained weights (always for ModernBERT), read with the tokenizer they were trained with."""
  _require(bool(m.pretrained), "model.pretrained", "model.family=modernbert needs an HF ModernBERT dir or hub name")
  path = os.path.abspath(os.path.expanduser(m.pretrained))
  # Local directories are checked here; ModernBERT hub names on load. The llama family reads local ones only.
  if m.family == "llama" or os.path.isdir(path) or m.pretrained.startswith(("/", ".", "~")):
    _require(os.path.isdir(path), "model.pretrained", f"no such directory: {path} (an HF checkpoint directory: "
             "config.json, *.safetensors and the tokenizer; docs/pretrained.md says how to get one)")
    _require(os.path.isfile(os.path.join(path, "config.json")), "model.pretrained", f"no config.json in {path}")
  _require(m.tokenizer not in EMBEDDED_TOKENIZERS, "model.tokenizer",
           "a pretrained model needs its own tokenizer (usually the same dir or hub name as model.pretrained)")


def split_files(spec: str) -> list[str]:
  return [p.strip() for p in spec.split(",") if p.strip()]


def mesh_shape(c: ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 filled in; raises when it does not tile num_devices."""
  shape = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh: data x fsdp x tensor = {'x'.join(map(str, shape))} does not match {num_devices} devices")
  return tuple(shape)


def data_parallel_degree(c: ConfigDict, num_devices: int) -> int:
  data, fsdp, _ = mesh_shape(c, num_devices)
  return data * fsdp


def to_yaml(c: ConfigDict) -> str:
  d = c.to_dict()
  ordered = {k: d[k] for k in SECTIONS if k in d} | {k: v for k, v in d.items() if k not in SECTIONS}
  return yaml.safe_dump(ordered, sort_keys=False)


# Fields that existed once: ignored when a config saved with an older checkpoint is read back.
RETIRED_KEYS = ("dataloader.drop_last",)

# What a resumed run may change: how it is logged, evaluated, sampled, placed and saved, and how long it runs.
# Every other key defines the train state or what the run trains on, so a resume with another value is refused.
MAY_CHANGE_ON_RESUME = (
    "evaluation.", "inference.", "logging.", "mesh.", "dataset.cache_dir",
    "training.max_steps", "training.num_epochs", "training.save_steps", "training.save_total_limit",
    "training.async_checkpointing", "training.nonfinite", "training.stop_check_every", "training.gradient_accumulation_steps",
    "model.remat", "model.scan_unroll", "model.attention", "model.loss_chunk_size",  # same math, other memory/speed
    "model.pretrained", "training.init_from",  # only the initial weights: the checkpoint replaces them
)


# Saved beside the config with each checkpoint: the model config the run resolved (`with_resolved_model`). A local
# `model.pretrained` sets the architecture from its config.json, and may move on a resume, so its path is not
# compared; the architecture it resolves to is, except for these fields (paths, and the same math in other memory).
RESOLVED_MODEL = "resolved_model"
RESOLVED_MAY_CHANGE = ("pretrained", "hf_config", "remat", "scan_unroll", "attention")


def with_resolved_model(config_dict: dict, model_cfg) -> dict:
  """`config_dict` plus the resolved model config (a dataclass), as JSON values."""
  return {**config_dict, RESOLVED_MODEL: json.loads(json.dumps(dataclasses.asdict(model_cfg), default=str))}


def from_dict(d: dict) -> ConfigDict:
  """Rebuilds a config saved with a checkpoint (JSON), filling fields added to the schema since."""
  c = base_config()
  d = {section: {k: v for k, v in values.items() if f"{section}.{k}" not in RETIRED_KEYS}
       if isinstance(values, dict) else values for section, values in d.items() if section != RESOLVED_MODEL}
  _merge(c, d, prefix="")
  return c


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"training.batch_size": 32, ...} from a nested config dict."""
  out = {}
  for k, v in d.items():
    out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def resume_differences(saved: dict, new: dict) -> list[str]:
  """`key (saved -> new)` for every key outside MAY_CHANGE_ON_RESUME whose value differs; where none does, every
  field of the resolved model (a checkpoint saved before it was recorded is not compared)."""
  a, b = flatten(from_dict(saved).to_dict()), flatten(from_dict(new).to_dict())
  diffs = [f"{k} ({a[k]!r} -> {b[k]!r})" for k in a if a[k] != b[k] and not k.startswith(MAY_CHANGE_ON_RESUME)]
  saved_model, new_model = saved.get(RESOLVED_MODEL), new.get(RESOLVED_MODEL)
  if not diffs and saved_model and new_model:
    source = f"model.pretrained={new['model']['pretrained']!r} " if new["model"].get("pretrained") else ""
    diffs = [f"{source}resolves to another model: {k} ({saved_model[k]!r} -> {new_model[k]!r})" for k in saved_model
             if k in new_model and k not in RESOLVED_MAY_CHANGE and saved_model[k] != new_model[k]]
  return diffs
