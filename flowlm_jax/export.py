"""Export a checkpoint as plain files: `python -m flowlm_jax.export WORKDIR --out DIR [--step N] [--format F]`.

`--format=flowlm` (default): safetensors + config.json + tokenizer in flowlm_jax's own layout
(`formats/flowlm_export.py`), which `flowlm_jax.load(DIR)` reads back on any machine. `--format=hf`: a run
started from a Hugging Face checkpoint, written back in its layout: ModernBERT (`formats/modernbert_hf.py`,
which `transformers.ModernBertForMaskedLM.from_pretrained(DIR)` loads), LLaDA or Dream (`formats/llama_hf.py`:
the same tensor names, shapes and dtype as the release, and its tokenizer and modeling code copied along).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile

from flowlm_jax.formats import flowlm_export as layout

FORMATS = ("flowlm", "hf")


@contextlib.contextmanager
def staged(out: str):
  """A fresh directory beside `out` to write the export into; only once the block succeeds does it replace `out`
  (whose old files go with it, none left behind). A failure leaves `out` as it was and removes the rest."""
  from flowlm_jax.formats import safetensors_dir

  out = os.path.realpath(out)  # a symlink's target is what gets replaced, not the link
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"export: {out} exists and is not a directory")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
  safetensors_dir.shareable(staging, 0o777)
  replaced = f"{staging}.replaced"
  try:
    yield staging
    if os.path.isdir(out):
      os.rename(out, replaced)  # a crash before the next rename leaves the old export here, not lost
    os.rename(staging, out)
  except BaseException:
    if os.path.isdir(replaced) and not os.path.exists(out):
      os.rename(replaced, out)
    shutil.rmtree(staging, ignore_errors=True)
    raise
  shutil.rmtree(replaced, ignore_errors=True)


def export(workdir: str, out: str, step: int | None = None, *, overwrite: bool = False) -> dict:
  """Writes `out` from the newest (or `step`) checkpoint of `workdir`; returns a summary dict. With `overwrite`
  the new export replaces a non-empty `out` whole, and only once it is complete (`staged`)."""
  from flowlm_jax import loading
  from flowlm_jax.logging import redact
  from flowlm_jax.models import registry
  from flowlm_jax.tokenizer import load_tokenizer, vocab_of

  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise FileExistsError(f"export: {out} exists and is not empty (pass --overwrite to replace it)")
    _check_replaceable(workdir, out)
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
  with staged(out) as staging:
    tensors = layout.write(staging, run.params, meta)
    run.tokenizer.save_pretrained(staging)
    reloaded = vocab_of(load_tokenizer(staging))
    if reloaded != run.vocab:
      raise ValueError(f"export: the run's tokenizer, saved, reloads with different special ids ({reloaded} vs "
                       f"{run.vocab}); {out} is left as it was")
  return {"out": out, "step": run.step, "num_parameters": meta["model_shape"]["num_parameters"],
          "tensors": len(tensors), "bytes": os.path.getsize(os.path.join(out, layout.WEIGHTS_FILE))}


def _check_replaceable(workdir: str, out: str) -> None:
  """--overwrite replaces an earlier export, never the run itself or a directory that holds something else:
  `staged` swaps the whole directory, so `--out=WORKDIR` would delete the run's checkpoints."""
  source, target = os.path.realpath(workdir), os.path.realpath(out)
  if source == target or source.startswith(target + os.sep):
    raise FileExistsError(f"export: --out={out} holds {workdir}, the run being exported; choose another directory")
  if not layout.is_exported(target):
    raise FileExistsError(f"export: {out} is not a whole earlier export ({layout.CONFIG_FILE} with \"format\": "
                          f"\"{layout.FORMAT}\" and {layout.WEIGHTS_FILE}); --overwrite replaces only an export: "
                          "choose an empty or absent --out")


def export_hf(workdir: str, out: str, step: int | None = None) -> dict:
  """The newest (or `step`) checkpoint of a run started from an HF checkpoint, written in its layout to `out`."""
  from flowlm_jax import loading
  from flowlm_jax.models import registry

  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f"export: {out} exists and is not empty")
  run = loading.load(workdir, step=step)
  hf_format = registry.hf_format(run.model.cfg)
  # The source's config.json travels with the run (and with a flowlm export of it), the source itself need not.
  if hf_format is None or not getattr(run.model.cfg, "hf_config", ""):
    raise ValueError(f"export --format=hf: {workdir} did not start from an HF checkpoint (model.pretrained); "
                     "use --format=flowlm")
  from flowlm_jax.tokenizer import load_tokenizer

  with staged(out) as staging:  # per tensor (a layer at a time for LLaDA/Dream): no host copy of the whole model
    summary = hf_format.save_hf(run.params, run.model.cfg, staging, run.tokenizer)
    # The source's tokenizer files come along; a run trained with another model.tokenizer (tokens added) gets its
    # own written over them, so the release's tokenizer describes the embedding rows it ships.
    if load_tokenizer(staging).get_vocab() != run.tokenizer.get_vocab():
      run.tokenizer.save_pretrained(staging)
      summary["tokenizer"] = "the run's (model.tokenizer differs from the source's)"
  return {**summary, "out": out, "step": run.step}


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
  p.add_argument("--overwrite", action="store_true",
                 help="replace an earlier export at --out, once the new one is complete (flowlm format)")
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
