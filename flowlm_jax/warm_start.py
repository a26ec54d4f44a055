"""A new run that starts from the weights of an exported one (`training.init_from`).

For fine-tuning a model trained here on other records, with another objective or another masking option
(clean answer prefixes, docs/sampling.md) without training it again from random weights: the run starts at
step 0 with a fresh optimiser and schedule, and only its parameters come from a directory written by
`python -m flowlm_jax.export`. A run resuming from its own checkpoint ignores the option: the checkpoint
holds newer weights (config.MAY_CHANGE_ON_RESUME).
"""

from __future__ import annotations

import os

from flowlm_jax.formats import flowlm_export as exported
from flowlm_jax.tokenizer import load_tokenizer

KEY = "training.init_from"


def check(path: str, template: dict, tokenizer) -> None:
  """Raises one line naming the key when `path` cannot start this run: not an export, another tokenizer or
  another architecture.

  Reads config.json, the tokenizer files and the weights' header only (no tensor), before any compile.
  """
  path = os.path.abspath(os.path.expanduser(path))
  try:
    if not exported.is_exported(path):
      raise ValueError(f"{path} is not a directory written by `python -m flowlm_jax.export` (config.json with "
                       f"\"format\": \"{exported.FORMAT}\" and {exported.WEIGHTS_FILE})")
    exported.read_config_json(path)  # a newer format_version than this code reads
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
      raise ValueError(f"{path} was trained with another tokenizer than model.tokenizer (set model.tokenizer to "
                       "the one it was trained with, e.g. the export directory itself)")
    exported.read_params(path, template, check_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"{KEY}: {e}") from None


def initial_params(path: str, template: dict) -> tuple[dict, int]:
  """(`path`'s parameters in `template`'s structure and dtypes, as numpy arrays; the step it was exported at)."""
  path = os.path.abspath(os.path.expanduser(path))
  step = int(exported.read_config_json(path)["step"])
  return exported.read_params(path, template), step
