"""The llama family's Hugging Face checkpoints: LLaDA (`llada_hf.py`) and Dream (`dream_hf.py`) directories.

A layout module names the HF tensors and maps its config.json keys; this one holds what the layouts share:
  - config.json <-> `models.llama.ModelConfig` (`from_hf_config`, `hf_config_dict`), chosen by `model_type`;
  - how a release expects its prompts (`prompt_format_of`): an instruction-tuned one through its chat template;
  - the tensor table (`tensors`): HF keeps one tensor per weight and layer, torch Linear weights as [out, in];
    ours are stacked on a leading `layers` axis, [in, out], with the heads split out ([D, H, Dh] for q);
  - import: `load_params(cfg, shardings)` streams the safetensors one tensor at a time into each device's
    shard, each device reading only its slice of each tensor (`safetensors_dir.load`), and logs the time, the
    bytes read and the process's peak host memory;
  - export: `save_hf(params, cfg, out)` writes the same tensor names, shapes and dtype (config.json's
    `torch_dtype`) and config.json, and copies the source directory's other files (tokenizer, the modeling
    code its `auto_map` names), so the LLaDA / Dream code loads the result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping

from flowlm_jax.formats import dream_hf, llada_hf
from flowlm_jax.formats import safetensors_dir as st
from flowlm_jax.models.llama import ModelConfig, Transformer
from flowlm_jax.tokenizer import end_of_turn_token, has_chat_template
from flowlm_jax.vocab import Vocab

log = logging.getLogger(__name__)

LAYOUTS = {layout.MODEL_TYPE: layout for layout in (llada_hf, dream_hf)}
HF_CONFIG_FILE = "config.json"
WEIGHT_FILES = (st.SINGLE_FILE, st.INDEX_FILE)  # and the shards the index names: never copied on export
DTYPE_KEYS = ("torch_dtype", "dtype")  # config.json's weight dtype (transformers < 5, >= 5)


# --- config.json --------------------------------------------------------------------------------


def read_hf_config(directory: str) -> dict:
  """config.json of a local LLaDA or Dream directory; one-line errors for anything else."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model.pretrained: no such directory: {directory}")
  path = os.path.join(directory, HF_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model.pretrained: no {HF_CONFIG_FILE} in {directory}")
  hf = st.read_json(path, "model.pretrained")
  layout_of(hf, path)
  return hf


def is_checkpoint(path: str) -> bool:
  """True for a directory holding a config.json of a layout this module reads."""
  try:
    with open(os.path.join(path, HF_CONFIG_FILE)) as f:
      return str(json.load(f).get("model_type", "")).lower() in LAYOUTS
  except (OSError, ValueError, AttributeError):
    return False


def layout_of(hf: dict, where: str = HF_CONFIG_FILE):
  """The layout module (llada_hf, dream_hf) of a config.json dict."""
  model_type = str(hf.get("model_type", "")).lower()
  if model_type not in LAYOUTS:
    raise ValueError(f"model.pretrained: {where} has model_type {hf.get('model_type')!r}, expected one of "
                     f"{', '.join(LAYOUTS)}")
  return LAYOUTS[model_type]


def from_hf_config(hf: dict, *, num_real_tokens: int | None = None, **overrides) -> ModelConfig:
  """The ModelConfig of a config.json dict (`overrides`: dtypes, remat, ... and `pretrained`)."""
  layout = layout_of(hf)
  full = layout.complete(_rope_theta_of_parameters(hf))
  for key, supported in layout.REQUIRED.items():
    if full.get(key, supported) != supported:
      raise ValueError(f"model.pretrained: config.json {key}={full[key]!r} is not supported (the port implements "
                       f"{supported!r})")
  missing = [key for key in layout.KEYS.values() if full.get(key) is None]
  if missing:
    raise ValueError(f"model.pretrained: config.json lacks {', '.join(missing)}")
  arch = {ours: full[key] for ours, key in layout.KEYS.items()} | layout.FIXED
  d_model, n_heads = arch["d_model"], arch["n_heads"]
  if d_model % n_heads or (d_model // n_heads) % 2 or n_heads % arch["n_kv_heads"]:
    raise ValueError(f"model.pretrained: {d_model} dims over {n_heads} heads ({arch['n_kv_heads']} key-value "
                     "heads) is not an even head size with whole groups")
  if full.get("head_dim") not in (None, d_model // n_heads):
    raise ValueError(f"model.pretrained: config.json head_dim={full['head_dim']} != hidden size / heads (unsupported)")
  arch["rope_theta"] = float(arch["rope_theta"])
  real = arch["vocab_size"] if num_real_tokens is None else num_real_tokens
  return ModelConfig(num_real_tokens=real, hf_config=json.dumps(hf, sort_keys=True), **arch, **overrides)


def _rope_theta_of_parameters(hf: dict) -> dict:
  """transformers >= 5 writes RoPE as `rope_parameters: {rope_type, rope_theta, ...}` and no top-level
  `rope_theta`: read the base from there (a scaled RoPE, any `rope_type` but default, is not implemented)."""
  rope = hf.get("rope_parameters")
  if rope is None:
    return hf
  if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
    raise ValueError(f"model.pretrained: config.json rope_parameters={rope!r} is not supported (the port implements "
                     "the default RoPE: rope_type 'default' with a rope_theta)")
  if hf.get("rope_theta") not in (None, rope["rope_theta"]):
    raise ValueError(f"model.pretrained: config.json has rope_theta={hf['rope_theta']!r} and rope_parameters' "
                     f"rope_theta={rope['rope_theta']!r}: which one the model was trained with is unclear")
  return hf | {"rope_theta": rope["rope_theta"]}


def hf_config_dict(cfg: ModelConfig) -> dict:
  """The source config.json with `cfg`'s architecture written back in its layout's keys."""
  hf = json.loads(cfg.hf_config)
  layout = layout_of(hf)
  return hf | {key: getattr(cfg, ours) for ours, key in layout.KEYS.items()}


def model_config(model_cfg, vocab: Vocab) -> ModelConfig:
  """The architecture of `model.pretrained` (its config.json), with the run config's dtypes (matmul_dtype
  included: an FP8 fine-tune), remat etc."""
  directory = os.path.abspath(os.path.expanduser(model_cfg.pretrained))
  hf = read_hf_config(directory)
  cfg = from_hf_config(hf, num_real_tokens=vocab.size, pretrained=directory,
                       param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype,
                       matmul_dtype=model_cfg.matmul_dtype, remat=model_cfg.remat, attention=model_cfg.attention,
                       scan_unroll=model_cfg.scan_unroll)
  if vocab.size > cfg.vocab_size:
    raise ValueError(f"model.tokenizer: {vocab.size} tokens, but {directory}'s embedding has only "
                     f"{cfg.vocab_size} rows (use the tokenizer that came with the model)")
  return cfg


def stored_dtype(hf: dict, directory: str | None = None) -> str:
  """The dtype a checkpoint stores its weights in: its config.json's, else (not every release writes it) the one
  most of `directory`'s tensors have in their headers, else float32."""
  named = next((hf[k] for k in DTYPE_KEYS if hf.get(k)), None)
  if named is None and directory and os.path.isdir(directory):
    try:
      named = st.Checkpoint(directory).stored_dtype()
    except (OSError, ValueError):  # the weights were removed (a finished run's export needs only its config.json)
      pass
  return named or "float32"


# --- prompts ------------------------------------------------------------------------------------


def prompt_format_of(directory: str, tokenizer) -> tuple[str, str]:
  """("chat" or "plain", why): how the release in `directory` expects its prompts, for `dataset.prompt_format=auto`.

  A chat template alone does not make an instruction-tuned model: LLaDA-8B-Base ships Instruct's template, but
  without the template's tokens (<|start_header_id|>, <|eot_id|> are not in its vocabulary; Instruct added them,
  ids 126346-126348). So "chat" needs the template AND its end-of-turn marker to be a token of its own. Dream's
  Qwen2.5 vocabulary has ChatML's tokens in the Base release too, which only its name tells apart: a name with
  the word "Base" (LLaDA-8B-Base, Dream-v0-Base-7B) stays plain.
  """
  if not has_chat_template(tokenizer):
    return "plain", "its tokenizer has no chat template"
  name = release_name(directory)
  if "base" in re.split(r"[^a-z0-9]+", name.lower()):
    return "plain", f"its name {name!r} marks a base model"
  end = end_of_turn_token(tokenizer)  # may be [EOS] itself (a release whose EOS is <|eot_id|>): still its own token
  if end is None:
    return "plain", "its chat template's end-of-turn marker is not a token of its vocabulary (a base model's)"
  return "chat", f"its chat template closes a turn with {tokenizer.convert_ids_to_tokens(end)}, a token of its own"


def release_name(directory: str) -> str:
  """A checkpoint's name: its directory's, or NAME for a hub-cache snapshot (models--ORG--NAME/snapshots/SHA)."""
  path = os.path.abspath(os.path.expanduser(directory))
  parent = os.path.dirname(path)
  if os.path.basename(parent) == "snapshots":
    return os.path.basename(os.path.dirname(parent)).split("--")[-1]
  return os.path.basename(path)


# --- tensors ------------------------------------------------------------------------------------


def tensors(cfg: ModelConfig) -> list[st.Tensor]:
  """Every HF tensor of `cfg`'s layout and architecture, and the parameter of ours it holds."""
  names = layout_of(json.loads(cfg.hf_config)).NAMES
  D, H, K, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  table = [
      st.reshaped("embed", names["embed"], (V, D), (V, D)),
      st.reshaped("attn_norm", names["attn_norm"], (D,), (D,), per_layer=True),
      st.linear("wq", names["wq"], (H * Dh, D), (D, H, Dh), per_layer=True),
      st.linear("wk", names["wk"], (K * Dh, D), (D, K, Dh), per_layer=True),
      st.linear("wv", names["wv"], (K * Dh, D), (D, K, Dh), per_layer=True),
      st.linear("wo", names["wo"], (D, H * Dh), (H, Dh, D), per_layer=True),
      st.reshaped("mlp_norm", names["mlp_norm"], (D,), (D,), per_layer=True),
      st.linear("w_gate", names["w_gate"], (F, D), (D, F), per_layer=True),
      st.linear("w_up", names["w_up"], (F, D), (D, F), per_layer=True),
      st.linear("w_down", names["w_down"], (D, F), (F, D), per_layer=True),
      st.reshaped("final_norm", names["final_norm"], (D,), (D,)),
  ]
  if not cfg.tie_embeddings:
    table.append(st.linear("unembed", names["unembed"], (V, D), (D, V)))
  if cfg.qkv_bias:
    table += [st.reshaped("bq", names["bq"], (H * Dh,), (H, Dh), per_layer=True),
              st.reshaped("bk", names["bk"], (K * Dh,), (K, Dh), per_layer=True),
              st.reshaped("bv", names["bv"], (K * Dh,), (K, Dh), per_layer=True)]
  return table


def _tied_duplicate(cfg: ModelConfig) -> tuple[str, ...]:
  """A tied output layer may still be stored (HF writes or skips the duplicate): tolerated, never read."""
  return (layout_of(json.loads(cfg.hf_config)).NAMES["unembed"],) if cfg.tie_embeddings else ()


def abstract_params(cfg: ModelConfig) -> dict:
  """{name: ShapeDtypeStruct} of the model `cfg` describes, allocating nothing."""
  from flax import nnx

  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --- import / export ----------------------------------------------------------------------------


def check_release(cfg: ModelConfig, vocab: Vocab) -> None:
  """What a run starting from the release needs beyond its config.json, checked before its data loads: the
  tokenizer's [MASK] is the one the model was trained with (not an added, untrained row), and the tensors' names
  and shapes (`open_checked`)."""
  mask_id = json.loads(cfg.hf_config).get("mask_token_id")
  if mask_id not in (None, vocab.mask_id):
    raise ValueError(f"model.tokenizer: its [MASK] is id {vocab.mask_id}, but {cfg.pretrained}'s config.json says "
                     f"mask_token_id={mask_id} (use the tokenizer that came with the model: its directory)")
  open_checked(cfg)


def open_checked(cfg: ModelConfig) -> st.Checkpoint:
  """`cfg.pretrained`'s tensors, their names and shapes checked against `cfg` (the files' headers only: cheap)."""
  ckpt = st.Checkpoint(cfg.pretrained)
  st.check(tensors(cfg), ckpt, cfg.n_layers, may_lack=_tied_duplicate(cfg))
  return ckpt


def load_params(cfg: ModelConfig, shardings: Mapping | None = None) -> dict:
  """`cfg.pretrained`'s weights as our pure parameter dict in `cfg.param_dtype`.

  With `shardings` ({name: Sharding}, e.g. train.state_shardings(...).params) each parameter is assembled
  shard by shard on the host and placed on its devices (jax Arrays); without, numpy arrays.
  """
  start = time.perf_counter()
  table, ckpt = tensors(cfg), open_checked(cfg)
  params = st.load(table, ckpt, abstract_params(cfg), shardings)
  log.info("loaded %s from %s: %d tensors, %.2f GB read in %.1f s; peak host memory of this process %.2f GiB",
           "sharded weights" if shardings is not None else "weights", cfg.pretrained, len(table),
           ckpt.bytes_read / 1e9, time.perf_counter() - start, st.peak_host_memory_bytes() / 2**30)
  return params


def save_hf(params: Mapping, cfg: ModelConfig, out: str, tokenizer=None, max_shard_bytes: int = 5 * 10**9) -> dict:
  """Writes `out` in the source checkpoint's layout: same tensor names, shapes and dtype, and config.json.

  The source directory's other files (tokenizer, modeling code, generation config) are copied when it still
  exists; otherwise `tokenizer` (if given) is saved and the modeling code must be added by hand.
  """
  if not cfg.hf_config:
    raise ValueError("export --format=hf: this run did not start from an HF checkpoint (model.pretrained); "
                     "use --format=flowlm")
  import jax.numpy as jnp

  dtype = jnp.dtype(stored_dtype(json.loads(cfg.hf_config), cfg.pretrained))
  summary = st.save(tensors(cfg), cfg.n_layers, params, out, dtype, max_shard_bytes)
  source = cfg.pretrained
  if source and os.path.isdir(source):
    summary["copied"] = _copy_other_files(source, out)
  elif tokenizer is not None:
    tokenizer.save_pretrained(out)
  with open(os.path.join(out, HF_CONFIG_FILE), "w") as f:
    json.dump(hf_config_dict(cfg), f, indent=2)
    f.write("\n")
  return summary


def _copy_other_files(source: str, out: str) -> list[str]:
  """Copies `source`'s files except the weights and config.json (tokenizer, *.py, generation_config.json)."""
  index = os.path.join(source, st.INDEX_FILE)
  shards = set()
  if os.path.isfile(index):
    with open(index) as f:
      shards = set(json.load(f)["weight_map"].values())
  copied = []
  for name in sorted(os.listdir(source)):
    path = os.path.join(source, name)
    if os.path.isfile(path) and name not in {*WEIGHT_FILES, *shards, HF_CONFIG_FILE}:
      shutil.copy(path, os.path.join(out, name))
      copied.append(name)
  return copied
