"""The one place that maps `model.family` to a model family: its resolved config and its network.

Everything above the models (train, sampling, loading, bench) builds networks through `model_config` and
`create`; no family module and no format imports this one, so adding a family (a model module, maybe a
format module) means one more entry in FAMILIES.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import ModuleType

import jax
from flax import nnx

from flowlm_jax.formats import llama_hf, modernbert_hf
from flowlm_jax.models import llama, modernbert
from flowlm_jax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class Family:
  config_class: type                     # the resolved (hashable) architecture
  network: type                          # nnx.Module built from it
  config_from: Callable[..., object]     # (run config's `model` section, vocab) -> config_class
  weights: ModuleType | None = None      # the format module whose load_params reads `pretrained` weights
  streams: bool = False                  # its load_params(cfg, shardings) places each tensor in its shards


def _llama_config(model_cfg, vocab: Vocab) -> llama.ModelConfig:
  """`model.pretrained`'s architecture (an HF LLaDA or Dream directory) if set, else the run config's sizes."""
  if getattr(model_cfg, "pretrained", ""):
    return llama_hf.model_config(model_cfg, vocab)
  return llama.ModelConfig.from_config(model_cfg, vocab)


FAMILIES = {
    "llama": Family(llama.ModelConfig, llama.Transformer, _llama_config, weights=llama_hf, streams=True),
    "modernbert": Family(modernbert.ModernBertConfig, modernbert.ModernBert, modernbert_hf.model_config,
                         weights=modernbert_hf),
}
# Exported directories name their config class; these are the paths older versions wrote.
_MOVED = {"flowlm_jax.model.ModelConfig": llama.ModelConfig,
          "flowlm_jax.modernbert.ModernBertConfig": modernbert.ModernBertConfig}


def model_config(model_cfg, vocab: Vocab):
  """The resolved model config of `model.family` (a ModernBertConfig for "modernbert")."""
  family = getattr(model_cfg, "family", "llama")
  if family not in FAMILIES:
    raise ValueError(f"model.family: {family!r} is not one of {', '.join(FAMILIES)}")
  return FAMILIES[family].config_from(model_cfg, vocab)


def _family_of(model_cfg) -> Family:
  for family in FAMILIES.values():
    if isinstance(model_cfg, family.config_class):
      return family
  raise TypeError(f"no model family has the config class {type(model_cfg).__name__}")


def create(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """The network a resolved model config describes."""
  return _family_of(model_cfg).network(model_cfg, rngs=rngs)


def pretrained_params(model_cfg, shardings: dict | None = None) -> dict | None:
  """The pure parameter dict of `model_cfg.pretrained`'s weights, or None: random init.

  `shardings` ({name: Sharding}): a streaming format places each tensor in them as it reads it (jax Arrays);
  the others return numpy arrays for the caller to place.
  """
  family = _family_of(model_cfg)
  if family.weights is None or not getattr(model_cfg, "pretrained", ""):
    return None
  if family.streams:
    return family.weights.load_params(model_cfg, shardings)
  return family.weights.load_params(model_cfg)


def check_pretrained(model_cfg, vocab: Vocab) -> None:
  """For a run about to start from `model.pretrained`: a one-line error now for weights `pretrained_params` could
  not read (missing, damaged or mis-shaped tensors) or a [MASK] that is not the release's, where the format can
  tell from config.json and the files' headers."""
  family = _family_of(model_cfg)
  if family.streams and getattr(model_cfg, "pretrained", ""):
    family.weights.check_release(model_cfg, vocab)


def hf_format(model_cfg) -> ModuleType | None:
  """The format module whose `save_hf` writes this family in its source checkpoint's HF layout."""
  return _family_of(model_cfg).weights


def class_path(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def config_class(path: str) -> type:
  """The family config class an exported config.json names (`module.Class`, as `class_path` wrote it)."""
  if path in _MOVED:
    return _MOVED[path]
  for family in FAMILIES.values():
    if class_path(family.config_class) == path:
      return family.config_class
  raise ValueError(f"config.json: model_class {path!r} is not a flowlm_jax model config")


def count_params(tree) -> int:
  """Parameters of an nnx module, or of a tree of arrays or shape structs (e.g. the params dict)."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
