"""Export a checkpoint as plain files: `python -m flowlm_jax.export WORKDIR --out DIR [--step N]`.

DIR then holds
  model.safetensors   every parameter, float32, named as in the parameters' pure dict (`embed`, `wq`, ...;
                      nested names joined with "."); the layers are stacked on a leading axis as in model.py
  config.json         the run's resolved flowlm_jax config (sections `model`, `dataset`, ..., `inference`)
                      plus `"format": "flowlm_jax"`, `format_version`, `step`, `model_class` and
                      `model_shape` (the model config as built: padded vocab_size, num_real_tokens, head_dim,
                      parameter count, ...), `vocab` (mask/pad/eos/sep ids) and `tokenizer_source`
  tokenizer files     `tokenizer.save_pretrained(DIR)`, [MASK]/[PAD] included

`flowlm_jax.load(DIR)` loads it back (no Orbax, no optimiser state, no `model.pretrained` source) and gives the
same logits as loading the run's checkpoint. Nothing here depends on the mesh the run was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

FORMAT = "flowlm_jax"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# config.json keys that are not config sections
META_KEYS = ("format", "format_version", "step", "model_class", "model_shape", "vocab", "tokenizer_source")
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
  with open(os.path.join(path, CONFIG_FILE)) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}/{CONFIG_FILE} is not a flowlm_jax export (format={meta.get('format')!r})")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{path} was exported with format_version {meta['format_version']}; this flowlm_jax reads "
                     f"up to {FORMAT_VERSION}")
  return meta


def config_sections(meta: dict) -> dict:
  """The flowlm_jax config part of a config.json (what `config.from_dict` takes)."""
  return {k: v for k, v in meta.items() if k not in META_KEYS}


def model_config(meta: dict):
  """The resolved model config (ModelConfig, or another family's) rebuilt from config.json's `model_shape`.

  Self-contained: nothing is read from `model.pretrained` or the hub. A pretrained source is cleared, so
  building the model never loads weights other than the exported ones.
  """
  import importlib

  module_name, _, class_name = meta.get("model_class", "flowlm_jax.model.ModelConfig").rpartition(".")
  if not module_name.startswith("flowlm_jax."):
    raise ValueError(f"config.json: model_class {meta.get('model_class')!r} is not a flowlm_jax model config")
  cls = getattr(importlib.import_module(module_name), class_name)
  fields = {f.name for f in dataclasses.fields(cls)}
  shape = meta["model_shape"]
  unknown = set(shape) - fields - set(DERIVED_SHAPE_KEYS)
  if unknown:
    raise ValueError(f"config.json: model_shape has fields {sorted(unknown)} that {class_name} lacks "
                     "(exported by a newer flowlm_jax?)")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in shape.items() if k in fields}
  if "pretrained" in fields:
    values["pretrained"] = ""
  return cls(**values)


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


def export(workdir: str, out: str, step: int | None = None, *, overwrite: bool = False) -> dict:
  """Writes `out` from the newest (or `step`) checkpoint of `workdir`; returns a summary dict."""
  import jax
  import numpy as np
  from safetensors.numpy import save_file

  from flowlm_jax import api
  from flowlm_jax.logging import redact

  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"export: {out} exists and is not empty (pass --overwrite to write into it)")
  run = api.load(workdir, step=step)
  os.makedirs(out, exist_ok=True)

  tensors = {name: np.ascontiguousarray(np.asarray(jax.device_get(value), dtype=np.float32))
             for name, value in flatten_params(run.params).items()}
  weights = os.path.join(out, WEIGHTS_FILE)
  save_file(tensors, weights, metadata={"format": FORMAT, "step": str(run.step)})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(weights, 0o666 & ~umask)  # safetensors creates it owner-only; make it as shareable as the rest

  model_cfg = run.model.cfg
  config = redact(run.config.to_dict())
  tokenizer_source = config["model"]["tokenizer"]
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "step": run.step,
      "model_class": f"{type(model_cfg).__module__}.{type(model_cfg).__qualname__}",
      "model_shape": {**dataclasses.asdict(model_cfg), "head_dim": model_cfg.head_dim,
                      "num_parameters": int(sum(t.size for t in tensors.values()))},
      "vocab": {**dataclasses.asdict(run.vocab), "special_ids": list(run.vocab.special_ids)},
      "tokenizer_source": tokenizer_source,
      **config,
  }
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  run.tokenizer.save_pretrained(out)

  from flowlm_jax.tokenizer import load_tokenizer, vocab_of
  reloaded = vocab_of(load_tokenizer(out))
  if reloaded != run.vocab:
    raise RuntimeError(f"export: the tokenizer saved in {out} reloads with different special ids "
                       f"({reloaded} vs {run.vocab})")
  return {"out": out, "step": run.step, "num_parameters": meta["model_shape"]["num_parameters"],
          "tensors": len(tensors), "bytes": os.path.getsize(os.path.join(out, WEIGHTS_FILE))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.export", description=__doc__.splitlines()[0])
  p.add_argument("workdir", help="run directory (holds checkpoints/), a checkpoints dir or a step dir")
  p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
  args = p.parse_args(argv)
  from flowlm_jax.checkpoint import CheckpointError  # heavy imports after argument errors

  try:
    summary = export(args.workdir, args.out, args.step, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported step {summary['step']} of {args.workdir} to {summary['out']}: {summary['tensors']} tensors, "
        f"{summary['num_parameters']:,} parameters, {summary['bytes'] / 2**20:.1f} MiB ({WEIGHTS_FILE}, "
        f"{CONFIG_FILE}, tokenizer)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
