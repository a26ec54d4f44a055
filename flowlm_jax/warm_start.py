"""A new run that starts from the weights of an exported one (`training.init_from`).

For fine-tuning a model trained here on other records, with another objective or another masking option
(clean answer prefixes, docs/sampling.md) without training it again from random weights: the run starts at
step 0 with a fresh optimiser and schedule, and only its parameters come from a directory written by
`python -m flowlm_jax.export`. The directory is read only when a run starts without a checkpoint: a resume
takes its own checkpoint's weights and needs the directory no more (config.MAY_CHANGE_ON_RESUME).
"""

from __future__ import annotations

import dataclasses
import os

from flowlm_jax import loading
from flowlm_jax.errors import first_line
from flowlm_jax.formats import flowlm_export as exported
from flowlm_jax.tokenizer import load_tokenizer

KEY = "training.init_from"
# Model config fields that set only precision, memory, speed, initialisation or provenance: the run's own apply.
MAY_DIFFER = ("init_std", "param_dtype", "compute_dtype", "matmul_dtype", "remat", "attention", "scan_unroll",
              "pretrained", "hf_config")


def check(path: str, model_cfg, template: dict, tokenizer) -> int:
  """The step `path` was exported at; raises one line naming the key where it cannot start this run, whose
  model is `model_cfg` with parameters shaped as `template` (a pure dict of shape structs).

  Reads config.json, the tokenizer files and the weights' header (no tensor): not an export, a newer format,
  another tokenizer, another architecture (family, sizes, RoPE base, norm epsilon, ...) or missing, extra or
  mis-shaped tensors all fail here, before anything compiles.
  """
  path = os.path.abspath(os.path.expanduser(path))
  try:
    if not exported.is_exported(path):
      raise ValueError(f"{path} is not a directory written by `python -m flowlm_jax.export` (config.json with "
                       f"\"format\": \"{exported.FORMAT}\" and {exported.WEIGHTS_FILE})")
    meta = exported.read_config_json(path)
    _check_tokenizer(path, tokenizer)
    _check_architecture(path, loading.model_config(meta), model_cfg)
    exported.read_params(path, template, check_only=True)
    return int(meta["step"])
  except (KeyError, TypeError) as e:  # a config.json without a key an export always writes
    raise ValueError(f"{KEY}: {os.path.join(path, exported.CONFIG_FILE)} is incomplete or damaged "
                     f"({type(e).__name__}: {e})") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{KEY}: {e}") from None


def initial_params(path: str, template: dict, shardings: dict) -> dict:
  """`path`'s parameters as jax Arrays in `shardings` (`template`'s structure) and `template`'s dtypes, each
  process reading only the parts its devices hold."""
  return exported.read_params(os.path.abspath(os.path.expanduser(path)), template, shardings)


def _check_tokenizer(path: str, tokenizer) -> None:
  try:
    source = load_tokenizer(path)
  except Exception as e:  # transformers' own errors, several lines long
    raise ValueError(f"{path}: its tokenizer files do not load ({first_line(e)})") from None
  if source.get_vocab() != tokenizer.get_vocab():
    raise ValueError(f"{path} was trained with another tokenizer than model.tokenizer (set model.tokenizer to "
                     "the one it was trained with, e.g. the export directory itself)")


def _check_architecture(path: str, source, run) -> None:
  if type(source) is not type(run):
    raise ValueError(f"{path} holds a {type(source).__name__} model; this run builds a {type(run).__name__}")
  differ = [f"{f.name}={getattr(source, f.name)!r} (the run's: {getattr(run, f.name)!r})"
            for f in dataclasses.fields(run) if f.name not in MAY_DIFFER and getattr(source, f.name) != getattr(run, f.name)]
  if differ:
    raise ValueError(f"{path} holds another architecture: {', '.join(differ)}; set the run's model.* to match")
