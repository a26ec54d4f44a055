"""Export a checkpoint as plain files: `python -m flowlm_jax.export WORKDIR --out DIR [--step N] [--format F]`.

`--format=flowlm` (default): safetensors + config.json + tokenizer in flowlm_jax's own layout
(`formats/flowlm_export.py`), which `flowlm_jax.load(DIR)` reads back on any machine. `--format=hf`: a run
started from a Hugging Face checkpoint, written back in its layout: ModernBERT (`formats/modernbert_hf.py`,
which `transformers.ModernBertForMaskedLM.from_pretrained(DIR)` loads), LLaDA or Dream (`formats/llama_hf.py`:
the same tensor names, shapes and dtype as the release, and its tokenizer and modeling code copied along).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from flowlm_jax.formats import flowlm_export as layout

FORMATS = ("flowlm", "hf")


def export(workdir: str, out: str, step: int | None = None, *, overwrite: bool = False) -> dict:
  """Writes `out` from the newest (or `step`) checkpoint of `workdir`; returns a summary dict."""
  from flowlm_jax import loading
  from flowlm_jax.logging import redact
  from flowlm_jax.models import registry
  from flowlm_jax.tokenizer import load_tokenizer, vocab_of

  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"export: {out} exists and is not empty (pass --overwrite to write into it)")
  run = loading.load(workdir, step=step)
  model_cfg = run.model.cfg
  config = redact(run.config.to_dict())
  meta = {
      "format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "step": run.step,
      "model_class": registry.class_path(type(model_cfg)),
      "model_shape": {**dataclasses.asdict(model_cfg), "head_dim": model_cfg.head_dim,
                      "num_parameters": registry.count_params(run.params)},
      "vocab": {**dataclasses.asdict(run.vocab), "special_ids": list(run.vocab.special_ids)},
      "tokenizer_source": config["model"]["tokenizer"],
      **config,
  }
  tensors = layout.write(out, run.params, meta)
  run.tokenizer.save_pretrained(out)

  reloaded = vocab_of(load_tokenizer(out))
  if reloaded != run.vocab:
    raise RuntimeError(f"export: the tokenizer saved in {out} reloads with different special ids "
                       f"({reloaded} vs {run.vocab})")
  return {"out": out, "step": run.step, "num_parameters": meta["model_shape"]["num_parameters"],
          "tensors": len(tensors), "bytes": os.path.getsize(os.path.join(out, layout.WEIGHTS_FILE))}


def export_hf(workdir: str, out: str, step: int | None = None) -> dict:
  """The newest (or `step`) checkpoint of a run started from an HF checkpoint, written in its layout to `out`."""
  from flowlm_jax import loading
  from flowlm_jax.models import registry

  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f"export: {out} exists and is not empty")
  run = loading.load(workdir, step=step)
  hf_format = registry.hf_format(run.model.cfg)
  if hf_format is None or not getattr(run.model.cfg, "pretrained", ""):
    raise ValueError(f"export --format=hf: {workdir} did not start from an HF checkpoint (model.pretrained is "
                     "not set); use --format=flowlm")
  # Per tensor (a layer at a time for LLaDA/Dream): no host copy of the whole model.
  summary = hf_format.save_hf(run.params, run.model.cfg, out, run.tokenizer)
  return {**summary, "step": run.step}


def main(argv=None) -> int:
  from flowlm_jax import cli
  cli.quiet_libraries()  # before transformers loads: no irrelevant banner
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.export", description=__doc__.splitlines()[0])
  p.add_argument("workdir", help="run directory (holds checkpoints/), a checkpoints dir or a step dir")
  p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--format", choices=FORMATS, default="flowlm",
                 help="flowlm: this project's layout (flowlm_jax.load); hf: the layout of the HF checkpoint the run "
                      "started from (ModernBERT, LLaDA, Dream)")
  p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (flowlm format)")
  args = p.parse_args(argv)
  from flowlm_jax.checkpoint import CheckpointError  # heavy imports after argument errors

  try:
    if args.format == "hf":
      s = export_hf(args.workdir, args.out, args.step)
    else:
      s = export(args.workdir, args.out, args.step, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.format == "hf":
    print(f"exported step {s['step']} of {args.workdir} to {s['out']}: {s['tensors']} tensors, "
          f"{s['parameters']:,} parameters (Hugging Face layout)")
  else:
    print(f"exported step {s['step']} of {args.workdir} to {s['out']}: {s['tensors']} tensors, "
          f"{s['num_parameters']:,} parameters, {s['bytes'] / 2**20:.1f} MiB ({layout.WEIGHTS_FILE}, "
          f"{layout.CONFIG_FILE}, tokenizer)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
