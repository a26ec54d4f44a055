"""ModernBERT in Hugging Face layout: config.json and tensors <-> `ModernBertConfig` and our parameters.

Import: `load_params(cfg)` reads `model.safetensors` (or a sharded `model.safetensors.index.json`) from
`model.pretrained` — a local directory, or a hub name fetched into the HF cache when the hub is reachable —
and returns the pure parameter dict of `models.modernbert.ModernBert` (numpy, `cfg.param_dtype`). A tensor
that is missing, unexpected or of the wrong shape is a one-line ValueError naming it. `model_config` builds
the architecture from the directory's config.json (both HF field layouts).

Export: `save_hf(params, cfg, out, tokenizer)` writes `model.safetensors` (float32, HF names), `config.json`
(the source config with the architecture fields set) and the tokenizer, which
`transformers.ModernBertForMaskedLM.from_pretrained(out)` loads. From a training run:
  python -m flowlm_jax.export WORKDIR --out DIR --format=hf [--step N]

Layout: HF keeps one tensor per layer, ours are stacked on a leading `layers` axis; HF fuses q/k/v into
`attn.Wqkv` ([q; k; v] rows, each [heads, head_dim]) and the MLP input and gate into `mlp.Wi` ([input; gate]
rows); torch Linear weights are [out, in], ours [in, out]. Layer 0 has no `attn_norm` (an Identity in HF).
Only names, shapes and files: nothing here knows about runs, checkpoints or the training loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping

import numpy as np

from flowlm_jax.formats import safetensors_dir
from flowlm_jax.models.modernbert import ACTIVATIONS, ModernBert, ModernBertConfig
from flowlm_jax.vocab import Vocab

HF_CONFIG_FILE = "config.json"
WEIGHTS_FILE = safetensors_dir.SINGLE_FILE
INDEX_FILE = safetensors_dir.INDEX_FILE
# The decoder shares the embedding when tied; HF checkpoints may or may not carry the duplicate.
TIED_DECODER = "decoder.weight"


@functools.lru_cache(maxsize=None)
def resolve_pretrained(name: str) -> str:
  """A local directory holding config.json and the weights: `name` itself, or its hub snapshot."""
  if not name:
    raise ValueError("model.pretrained: not set (an HF ModernBERT directory or hub name)")
  path = os.path.abspath(os.path.expanduser(name))
  if os.path.isdir(path):
    return path
  if name.startswith(("/", ".", "~")):
    raise FileNotFoundError(f"model.pretrained: no such directory: {path}")
  try:
    from huggingface_hub import snapshot_download  # only for hub names

    return snapshot_download(name, allow_patterns=[HF_CONFIG_FILE, "model*.safetensors", INDEX_FILE])
  except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: all mean "not available"
    raise FileNotFoundError(f"model.pretrained: {name!r} is not a local directory and cannot be fetched from "
                            f"the hub ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# --- config.json ------------------------------------------------------------------------------


def model_config(model_cfg, vocab: Vocab) -> ModernBertConfig:
  """The architecture of `model.pretrained` (its config.json), with the dtypes etc. of `model_cfg`."""
  directory = resolve_pretrained(model_cfg.pretrained)
  cfg = from_hf_config(read_hf_config(directory), num_real_tokens=vocab.size, pretrained=directory,
                       param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype,
                       remat=model_cfg.remat, attention=model_cfg.attention)
  if vocab.size > cfg.vocab_size:
    raise ValueError(f"model.tokenizer: {vocab.size} tokens, but {directory}'s embedding has only "
                     f"{cfg.vocab_size} rows (use the tokenizer that came with the model)")
  return cfg


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, HF_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model.pretrained: no {HF_CONFIG_FILE} in {directory}")
  hf = safetensors_dir.read_json(path, "model.pretrained")
  if hf.get("model_type") != "modernbert":
    raise ValueError(f"model.pretrained: {path} has model_type {hf.get('model_type')!r}, expected 'modernbert'")
  return hf


def from_hf_config(hf: dict, *, num_real_tokens: int | None = None, **overrides) -> ModernBertConfig:
  """A ModernBertConfig from an HF ModernBERT config dict (old and new field layouts), HF's defaults filled."""
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size") if k not in hf]
  if missing:
    raise ValueError(f"model.pretrained: config.json lacks {', '.join(missing)}")
  n_layers, d_model, n_heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
  if d_model % n_heads or (d_model // n_heads) % 2:
    raise ValueError(f"model.pretrained: hidden_size={d_model} must split into an even head size over "
                     f"num_attention_heads={n_heads}")
  if hf.get("head_dim") not in (None, d_model // n_heads):
    raise ValueError(f"model.pretrained: head_dim={hf['head_dim']} != hidden_size / num_attention_heads "
                     "(unsupported)")
  for key in ("hidden_activation", "classifier_activation"):
    if hf.get(key, "gelu") not in ACTIVATIONS:
      raise ValueError(f"model.pretrained: {key}={hf[key]!r} is not one of {', '.join(ACTIVATIONS)}")
  global_theta, local_theta = _rope_thetas(hf)
  return ModernBertConfig(
      vocab_size=hf["vocab_size"],
      num_real_tokens=hf["vocab_size"] if num_real_tokens is None else num_real_tokens,
      d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=hf["intermediate_size"],
      global_layers=_global_layers(hf, n_layers), local_window=hf.get("local_attention", 128) // 2,
      global_rope_theta=global_theta, local_rope_theta=local_theta,
      norm_eps=hf.get("norm_eps", 1e-5), norm_bias=hf.get("norm_bias", False),
      attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
      classifier_bias=hf.get("classifier_bias", False), decoder_bias=hf.get("decoder_bias", True),
      hidden_activation=hf.get("hidden_activation", "gelu"),
      classifier_activation=hf.get("classifier_activation", "gelu"),
      tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
      hf_config=json.dumps(hf, sort_keys=True), **overrides)


def _global_layers(hf: dict, n_layers: int) -> tuple[bool, ...]:
  """transformers >= 5 writes `layer_types`; hub configs written before have `global_attn_every_n_layers`."""
  types = hf.get("layer_types")
  if types is None:
    every = hf.get("global_attn_every_n_layers", 3)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f"model.pretrained: global_attn_every_n_layers must be a positive integer, got {every!r}")
    return tuple(i % every == 0 for i in range(n_layers))
  unknown = set(types) - {"full_attention", "sliding_attention"}
  if len(types) != n_layers or unknown:
    raise ValueError(f"model.pretrained: layer_types must list {n_layers} of full_attention/sliding_attention")
  return tuple(t == "full_attention" for t in types)


def _rope_thetas(hf: dict) -> tuple[float, float]:
  """(global, local) RoPE bases: `rope_parameters` (transformers >= 5) or `global_/local_rope_theta`."""
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling") or any((p or {}).get("rope_type", "default") != "default" for p in rope.values()):
    raise ValueError("model.pretrained: only the default RoPE is supported (no rope_scaling / rope_type)")
  global_theta = (rope.get("full_attention") or {}).get("rope_theta", hf.get("global_rope_theta", 160_000.0))
  if not isinstance(global_theta, (int, float)) or isinstance(global_theta, bool):
    raise ValueError(f"model.pretrained: the global RoPE base (rope_theta) must be a number, got {global_theta!r}")
  # transformers 4.x: local_rope_theta null means the local layers use the global base
  local_default = global_theta if "local_rope_theta" in hf and hf["local_rope_theta"] is None else 10_000.0
  local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", hf.get("local_rope_theta") or local_default)
  return float(global_theta), float(local_theta)


def hf_config_dict(cfg: ModernBertConfig) -> dict:
  """An HF ModernBERT config dict for `cfg`: the source config.json with the architecture fields set."""
  hf = json.loads(cfg.hf_config) if cfg.hf_config else {}
  hf.update(
      model_type="modernbert", architectures=["ModernBertForMaskedLM"], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      intermediate_size=cfg.d_ff, local_attention=2 * cfg.local_window, norm_eps=cfg.norm_eps,
      norm_bias=cfg.norm_bias, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
      classifier_bias=cfg.classifier_bias, decoder_bias=cfg.decoder_bias,
      hidden_activation=cfg.hidden_activation, classifier_activation=cfg.classifier_activation,
      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
      layer_types=["full_attention" if g else "sliding_attention" for g in cfg.global_layers],
      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
                       "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}})
  # transformers 4.x reads only the older spellings (and falls back to its defaults without them): written with
  # the same values, so both generations build this model; a layer pattern they cannot spell is left out.
  for stale in ("global_attn_every_n_layers", "rope_scaling"):
    hf.pop(stale, None)
  hf.update(global_rope_theta=cfg.global_rope_theta, local_rope_theta=cfg.local_rope_theta)
  every = global_every(cfg.global_layers)
  if every is not None:
    hf["global_attn_every_n_layers"] = every
  return hf


def global_every(global_layers) -> int | None:
  """n where layer i is global exactly when i % n == 0 (transformers 4.x's `global_attn_every_n_layers`), else
  None."""
  later = [i for i, g in enumerate(global_layers) if g and i > 0]
  n = later[0] if later else len(global_layers) or 1
  return n if list(global_layers) == [i % n == 0 for i in range(len(global_layers))] else None


# --- the name and layout table ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor (per layer where `layers` is set) and the parameters of ours it holds."""
  hf: str                                      # HF name; "{i}" stands for the layer index
  ours: tuple[str, ...]                        # our parameters it holds (a fused HF tensor holds several)
  split: Callable[[np.ndarray], tuple]         # HF tensor -> our arrays (one layer's slices when stacked)
  merge: Callable[..., np.ndarray]             # our arrays -> HF tensor
  layers: tuple[int, ...] | None = None        # layers it exists for, stacked on our axis 0; None: not per layer


def _same(name_hf: str, ours: str, layers=None) -> Rule:
  return Rule(name_hf, (ours,), lambda w: (w,), lambda w: w, layers)


def _linear(name_hf: str, ours: str, layers=None) -> Rule:
  """torch Linear weight [out, in] <-> ours [in, out]."""
  return Rule(name_hf, (ours,), lambda w: (w.T,), lambda w: w.T, layers)


def rules(cfg: ModernBertConfig) -> list[Rule]:
  """Every HF tensor of a ModernBertForMaskedLM with `cfg`'s architecture and where it goes."""
  L, D, H, Dh, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
  every, after_first = tuple(range(L)), tuple(range(1, L))
  layer = "model.layers.{i}."
  qkv = Rule(layer + "attn.Wqkv.weight", ("wq", "wk", "wv"),
             lambda w: tuple(w.reshape(3, H, Dh, D).transpose(0, 3, 1, 2)),          # -> 3 x [D, H, Dh]
             lambda q, k, v: np.stack([q, k, v]).transpose(0, 2, 3, 1).reshape(3 * H * Dh, D), every)
  wo = Rule(layer + "attn.Wo.weight", ("wo",),
            lambda w: (w.reshape(D, H, Dh).transpose(1, 2, 0),),                      # -> [H, Dh, D]
            lambda w: w.transpose(2, 0, 1).reshape(D, H * Dh), every)
  wi = Rule(layer + "mlp.Wi.weight", ("w_in", "w_gate"), lambda w: (w[:F].T, w[F:].T),
            lambda a, b: np.concatenate([a.T, b.T]), every)
  table = [
      _same("model.embeddings.tok_embeddings.weight", "embed"),
      _same("model.embeddings.norm.weight", "embed_norm"),
      _same(layer + "attn_norm.weight", "attn_norm", after_first),
      qkv, wo,
      _same(layer + "mlp_norm.weight", "mlp_norm", every),
      wi, _linear(layer + "mlp.Wo.weight", "w_out", every),
      _same("model.final_norm.weight", "final_norm"),
      _linear("head.dense.weight", "head_dense"),
      _same("head.norm.weight", "head_norm"),
  ]
  if not cfg.tie_embeddings:
    table.append(_linear(TIED_DECODER, "unembed"))
  if cfg.decoder_bias:
    table.append(_same("decoder.bias", "decoder_bias"))
  if cfg.classifier_bias:
    table.append(_same("head.dense.bias", "head_dense_bias"))
  if cfg.norm_bias:
    table += [_same("model.embeddings.norm.bias", "embed_norm_bias"),
              _same(layer + "attn_norm.bias", "attn_norm_bias", after_first),
              _same(layer + "mlp_norm.bias", "mlp_norm_bias", every),
              _same("model.final_norm.bias", "final_norm_bias"), _same("head.norm.bias", "head_norm_bias")]
  if cfg.attention_bias:
    table += [Rule(layer + "attn.Wqkv.bias", ("bq", "bk", "bv"), lambda b: tuple(b.reshape(3, H, Dh)),
                   lambda q, k, v: np.stack([q, k, v]).reshape(-1), every),
              _same(layer + "attn.Wo.bias", "bo", every)]
  if cfg.mlp_bias:
    table += [Rule(layer + "mlp.Wi.bias", ("b_in", "b_gate"), lambda b: (b[:F], b[F:]),
                   lambda a, b: np.concatenate([a, b]), every),
              _same(layer + "mlp.Wo.bias", "b_out", every)]
  return table


def _names(rule: Rule) -> list[str]:
  return [rule.hf] if rule.layers is None else [rule.hf.format(i=i) for i in rule.layers]


def _hf_shape(rule: Rule, template: Mapping) -> tuple[int, ...]:
  """The HF tensor's shape implied by our parameter shapes (merge applied to zero-stride placeholders)."""
  per_layer = lambda shape: shape if rule.layers is None else shape[1:]
  parts = [np.broadcast_to(np.zeros((), np.float32), per_layer(tuple(template[n].shape))) for n in rule.ours]
  return tuple(rule.merge(*parts).shape)


# --- import -----------------------------------------------------------------------------------


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg, template: Mapping, source: str) -> dict:
  """Our pure parameter dict (numpy, the template's dtypes) from HF-named tensors; errors name the tensor."""
  table = rules(cfg)
  tensors = _strip_prefix(tensors)
  expected = [name for rule in table for name in _names(rule)]
  missing = [n for n in expected if n not in tensors]
  allowed = set(expected) | ({TIED_DECODER} if cfg.tie_embeddings else set())
  unexpected = sorted(n for n in tensors if n not in allowed)
  if missing:
    raise ValueError(f"{source}: missing {len(missing)} tensor(s) {_few(missing)} for config.json's architecture")
  if unexpected:
    raise ValueError(f"{source}: unexpected {len(unexpected)} tensor(s) {_few(unexpected)} (not a "
                     "ModernBertForMaskedLM of config.json's architecture?)")
  params = {}
  for rule in table:
    want = _hf_shape(rule, template)
    pieces = {name: [] for name in rule.ours}
    for name in _names(rule):
      got = tuple(tensors[name].shape)
      if got != want:
        raise ValueError(f"{source}: tensor {name!r} has shape {got}, config.json implies {want}")
      for ours, piece in zip(rule.ours, rule.split(np.asarray(tensors[name]))):
        pieces[ours].append(piece)
    for ours, parts in pieces.items():
      if rule.layers is None:
        value = parts[0]
      else:  # a one-layer model has no attn_norm at all (layer 0's is an Identity): an empty stack
        value = np.stack(parts) if parts else np.empty(template[ours].shape, template[ours].dtype)
      params[ours] = np.ascontiguousarray(value.astype(template[ours].dtype))
  return params


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  """Checkpoints of the bare ModernBertModel name the encoder without "model."; the head is then missing."""
  if any(n.startswith("model.") for n in tensors):
    return tensors
  return {(n if n.startswith(("head.", "decoder.")) else f"model.{n}"): t for n, t in tensors.items()}


def _few(names: list[str]) -> str:
  return ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of `directory`'s model.safetensors, or of the shards its index lists."""
  ckpt = safetensors_dir.Checkpoint(directory)
  return {name: ckpt.read(name) for name in ckpt.names()}


def abstract_params(cfg) -> dict:
  """{name: ShapeDtypeStruct} of the model `cfg` describes, allocating nothing."""
  from flax import nnx

  model = nnx.eval_shape(lambda: ModernBert(cfg, rngs=nnx.Rngs(params=0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(cfg) -> dict:
  """The pure parameter dict of `cfg.pretrained`'s weights (numpy arrays in `cfg.param_dtype`)."""
  directory = cfg.pretrained
  return params_from_hf(read_safetensors(directory), cfg, abstract_params(cfg), directory)


# --- export -----------------------------------------------------------------------------------


def hf_from_params(params: Mapping, cfg) -> dict[str, np.ndarray]:
  """HF-named float32 tensors from our pure parameter dict (the tied decoder weight is left to HF)."""
  tensors = {}
  for rule in rules(cfg):
    ours = [np.asarray(params[name], dtype=np.float32) for name in rule.ours]
    for n, name in enumerate(_names(rule)):
      parts = ours if rule.layers is None else [p[n] for p in ours]
      tensors[name] = np.ascontiguousarray(rule.merge(*parts))
  return tensors


def save_hf(params: Mapping, cfg, out: str, tokenizer=None) -> dict:
  """Writes `out`/model.safetensors + config.json (+ tokenizer files); returns a summary."""
  from safetensors.numpy import save_file

  os.makedirs(out, exist_ok=True)
  tensors = hf_from_params(params, cfg)
  # transformers refuses safetensors files without a framework tag.
  weights = os.path.join(out, WEIGHTS_FILE)
  save_file(tensors, weights, metadata={"format": "pt"})
  safetensors_dir.shareable(weights)
  hf = hf_config_dict(cfg)
  hf.pop("torch_dtype", None)  # the weights are float32 whatever the source said
  hf["dtype"] = "float32"
  if tokenizer is not None:
    tokenizer.save_pretrained(out)
    hf.update({f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "cls", "sep")
               if getattr(tokenizer, f"{k}_token_id", None) is not None})
  with open(os.path.join(out, HF_CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
    f.write("\n")
  return {"out": out, "tensors": len(tensors), "parameters": int(sum(t.size for t in tensors.values()))}
