"""flowlm_jax's own export layout (written by `python -m flowlm_jax.export WORKDIR --out DIR`).

DIR holds
  model.safetensors   every parameter, float32, named as in the parameters' pure dict (`embed`, `wq`, ...;
                      nested names joined with "."); the layers are stacked on a leading axis as in models/
  config.json         the run's resolved flowlm_jax config (sections `model`, `dataset`, ..., `inference`)
                      plus `"format": "flowlm_jax"`, `format_version`, `step`, `model_class` and
                      `model_shape` (the model config as built: padded vocab_size, num_real_tokens, head_dim,
                      parameter count, ...), `vocab` (mask/pad/eos/sep ids) and `tokenizer_source`
  tokenizer files     `tokenizer.save_pretrained(DIR)`, [MASK]/[PAD] included

`flowlm_jax.load(DIR)` (loading.py) loads it back (no Orbax, no optimiser state, no `model.pretrained` source)
and gives the same logits as loading the run's checkpoint, and `training.init_from` starts a new run from its
weights (warm_start.py). Nothing here depends on the mesh the run was trained on. This module only names, checks,
reads and writes the files.
"""

from __future__ import annotations

import json
import os
from typing import Any

FORMAT = "flowlm_jax"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# config.json keys that are not config sections
META_KEYS = ("format", "format_version", "step", "model_class", "model_shape", "vocab", "tokenizer_source")
REQUIRED_KEYS = ("step", "model_shape")  # what a reader needs; the others have defaults for older exports
DERIVED_SHAPE_KEYS = ("head_dim", "num_parameters")  # in model_shape for readers; not constructor fields


def is_exported(path: str) -> bool:
  """True for a directory written by `export` (config.json with "format": "flowlm_jax" and weights)."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not (os.path.isfile(config_path) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))):
    return False
  try:
    with open(config_path) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def read_config_json(path: str) -> dict:
  from flowlm_jax.formats import safetensors_dir

  meta = safetensors_dir.read_json(os.path.join(path, CONFIG_FILE))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}/{CONFIG_FILE} is not a flowlm_jax export (format={meta.get('format')!r})")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{path} was exported with format_version {meta['format_version']}; this flowlm_jax reads "
                     f"up to {FORMAT_VERSION}")
  missing = [key for key in REQUIRED_KEYS if key not in meta]
  if missing:  # checked before any weight is read, for every reader (loading, training.init_from)
    raise ValueError(f"{path}/{CONFIG_FILE} is incomplete or damaged (KeyError: {missing[0]!r})")
  return meta


def config_sections(meta: dict) -> dict:
  """The flowlm_jax config part of a config.json (what `config.from_dict` takes)."""
  return {k: v for k, v in meta.items() if k not in META_KEYS}


def _name(key: Any) -> str:
  return str(key)


def flatten_params(params: dict, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} from a nested pure dict (insertion order kept)."""
  flat = {}
  for key, value in params.items():
    name = f"{prefix}{_name(key)}"
    if isinstance(value, dict):
      flat.update(flatten_params(value, prefix=f"{name}."))
    else:
      flat[name] = value
  return flat


def unflatten_like(flat: dict[str, Any], template: dict, source: str = "") -> dict:
  """`template`'s nested structure filled from `flat` by name; missing, extra or reshaped names fail in one line."""
  expected = flatten_params(template)
  missing = [n for n in expected if n not in flat]
  extra = [n for n in flat if n not in expected]
  if missing or extra:
    raise ValueError(f"{source}: parameter names do not match the configured model "
                     f"(missing {missing[:5]}, unexpected {extra[:5]})")
  for name, want in expected.items():
    got = tuple(flat[name].shape)
    if got != tuple(want.shape):
      raise ValueError(f"{source}: parameter {name!r} has shape {got}, the configured model expects {tuple(want.shape)}")

  def build(node, prefix):
    return {k: build(v, f"{prefix}{_name(k)}.") if isinstance(v, dict) else flat[f"{prefix}{_name(k)}"]
            for k, v in node.items()}
  return build(template, "")


def read_params(path: str, template: dict, shardings: dict | None = None, *,
                check_only: bool = False) -> dict | None:
  """`path`'s weights in `template`'s nested structure and parameter dtypes.

  Without `shardings` numpy arrays; with them (the same structure of jax Shardings) jax Arrays placed shard by
  shard, each process reading only the parts its devices hold (formats/safetensors_dir.py). Names and shapes
  are checked against `template` (a pure dict of shape structs) from the file's header first, so a mismatch
  fails in one line before any tensor is read; `check_only` stops there (None).
  """
  import types

  from flowlm_jax.formats import safetensors_dir

  ckpt = safetensors_dir.Checkpoint(path)  # the header only
  source = os.path.join(path, WEIGHTS_FILE)
  unflatten_like({n: types.SimpleNamespace(shape=ckpt.shape(n)) for n in ckpt.names()}, template, source)
  if check_only:
    return None
  flat_template = flatten_params(template)
  table = [safetensors_dir.reshaped(name, name, want.shape, want.shape) for name, want in flat_template.items()]
  flat = safetensors_dir.load(table, ckpt, flat_template, None if shardings is None else flatten_params(shardings))
  # Stored as float32, read into the model's parameter dtype (exact for bfloat16/float16 masters).
  return unflatten_like(flat, template, source)


def write(out: str, params: dict, meta: dict) -> dict[str, Any]:
  """Writes `out`/model.safetensors (every parameter as float32) and config.json (`meta`); returns the tensors."""
  import jax
  import numpy as np
  from safetensors.numpy import save_file

  from flowlm_jax.formats import safetensors_dir

  os.makedirs(out, exist_ok=True)
  tensors = {name: np.ascontiguousarray(np.asarray(jax.device_get(value), dtype=np.float32))
             for name, value in flatten_params(params).items()}
  weights = os.path.join(out, WEIGHTS_FILE)
  save_file(tensors, weights, metadata={"format": FORMAT, "step": str(meta["step"])})
  safetensors_dir.shareable(weights)
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return tensors
