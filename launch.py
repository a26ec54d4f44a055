"""Train a masked-diffusion LM: `python launch.py --config=configs/flowlm.py[:variant] --workdir=DIR`.

Examples:
  python launch.py --config=configs/llada.py --workdir=runs/llada          # demo preset (default)
  python launch.py --config=configs/flowlm.py:small --workdir=runs/small --config.training.batch_size=64
  python launch.py --config=configs/flowlm.py --config_yaml=my_experiment.yaml --workdir=runs/x
  python launch.py --config=configs/flowlm.py --workdir=runs/x --dry_run   # validate, load data, exit

Running the same command again resumes from the newest checkpoint in --workdir.
Multi-host: every process runs the same command; `--coordinator_address/--num_processes/--process_id`
for clusters that jax.distributed cannot detect on its own (TPU pods and SLURM are detected).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from flowlm_jax import cli

cli.register_config_parsers()  # list-valued fields: `--config.inference.test_prompts='("a", "b")'` or repeated
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "flowlm.py")  # from any cwd
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Preset file, optionally `:variant`.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_string("config_yaml", None, "YAML overlay with the values that differ from the preset.")
flags.DEFINE_string("resume", None, "Checkpoint to start a workdir without checkpoints from (a step dir, a checkpoints "
                    "dir or a workdir); a workdir with its own resumes its newest.")
flags.DEFINE_integer("stop_at_step", None, "Save and exit after this step (e.g. a time-limited allocation).")
flags.DEFINE_bool("dry_run", False, "Validate, print the resolved config, load tokenizer and data, then exit.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (automatic on TPU pods / SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without auto-detection).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which jax.distributed takes a "
                     "process for dead and stops the others (multi-host).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:  # absl leaves what is not a flag here; a preset path without --config= would be ignored
    sys.exit(f"error: unexpected argument(s) {' '.join(argv[1:])} (flags are --name=value; the preset is "
             "--config=PATH[:variant])")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  cli.quiet_libraries()

  from flowlm_jax import config as config_lib

  config = FLAGS.config
  try:
    if FLAGS.config_yaml:  # precedence: preset < YAML overlay < command-line overrides
      config = config_lib.apply_yaml(config, FLAGS.config_yaml)
      config_lib.apply_overrides(config, config_flags.get_override_values(FLAGS["config"]))
    config_lib.validate(config)
  except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
    sys.exit(f"config error: {_message(e)}")
  except OSError as e:  # ml_collections reports a preset file that did not load only when the config is read
    cause = e.__cause__ or e
    sys.exit(f"config error: --config={FLAGS['config'].serialize().partition('=')[2]}: "
             f"{' '.join(str(cause).split())}")
  if not FLAGS.dry_run and not FLAGS.workdir:
    sys.exit("error: --workdir is required (or pass --dry_run)")

  import jax
  multi_host = FLAGS.distributed or FLAGS.coordinator_address
  if not multi_host and (FLAGS.num_processes is not None or FLAGS.process_id is not None):
    sys.exit("error: --num_processes/--process_id need --coordinator_address (or --distributed): without it "
             "every process would run alone as process 0 of 1, all writing the same workdir")
  if multi_host:
    n, i = FLAGS.num_processes, FLAGS.process_id
    if n is not None and i is not None and not 0 <= i < n:
      sys.exit(f"error: --process_id={i} is not in [0, --num_processes={n})")
    try:
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=n, process_id=i,
                                 heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    except (ValueError, RuntimeError) as e:  # missing flags, no coordinator: jax's own error, one line of it
      sys.exit(f"error: jax.distributed.initialize: {_message(e)}")

  from flowlm_jax import loop
  from flowlm_jax.checkpoint import CheckpointError

  try:
    if FLAGS.dry_run:
      return dry_run(config, FLAGS.workdir, FLAGS.resume)
    started = time.monotonic()
    result = loop.run(config, FLAGS.workdir, resume=FLAGS.resume, stop_at_step=FLAGS.stop_at_step)
  except (KeyError, TypeError, ValueError, FileNotFoundError, PermissionError, loop.NonFiniteError,
          CheckpointError) as e:
    sys.exit(f"error: {_message(e)}")
  if "halted_at" in result or jax.process_index() != 0:
    return
  if "train" in result:
    print(summary(result, FLAGS.workdir, config, time.monotonic() - started), flush=True)
  elif "eval" in result:  # relaunched after its last step, whose evaluation had failed: it ran now
    print(f"the run in {FLAGS.workdir} had finished its steps; its final evaluation, missing, ran now:\n  eval   "
          + _figures(result["eval"], ("eval_loss", "eval_nll_corrupted", "eval_accuracy")), flush=True)
  else:  # relaunched after its last step: nothing to train
    print(f"nothing to do: the run in {FLAGS.workdir} has finished its steps; raise --config.training.max_steps "
          "(or num_epochs) to train it further", flush=True)


def summary(result: dict, workdir: str, config, seconds: float) -> str:
  """The end of a finished run: its final figures, where the checkpoint is, and what to run next."""
  train, evaluation = result["train"], result.get("eval", {})
  w = shlex.quote(workdir)
  prompt = shlex.quote(config.inference.test_prompts[0] if config.inference.test_prompts else "To be")
  minutes, secs = divmod(round(seconds), 60)
  lines = [f"finished step {train['step']} in {minutes} min {secs} s",
           "  train  " + _figures(train, ("loss", "nll_corrupted", "accuracy"))]
  if evaluation:
    lines.append("  eval   " + _figures(evaluation, ("eval_loss", "eval_nll_corrupted", "eval_accuracy")))
  lines.append(f"  checkpoint  {result['checkpoint']}  (the same command again resumes from it)")
  if result.get("wandb_offline_dir"):
    lines.append(f"  wandb  offline; upload it with: wandb sync {shlex.quote(result['wandb_offline_dir'])}")
  lines += ["next:",
            f"  uv run python -m flowlm_jax.sample --workdir={w} --mode=both {prompt}   # decode prompts both ways",
            f"  uv run python -m flowlm_jax.plot {w} --out={shlex.quote(os.path.join(workdir, 'plots'))}"
            "   # training curves (PNG)"]
  if config.dataset.name == "embedded:sft_tasks":
    lines.append(f"  uv run python -m flowlm_jax.evaluate --workdir={w}   # exact match of both samplers on held-out tasks")
  else:
    lines.append("  uv run python -m flowlm_jax.evaluate --workdir=W   # exact match on the SFT tasks, for W trained "
                 "with --config=configs/flowlm.py:tasks")
  notebook_workdir = shlex.quote(os.path.abspath(workdir))  # the kernel runs in notebooks/: a relative path breaks
  lines.append(f"  FLOWLM_WORKDIR={notebook_workdir} uv run --with jupyterlab jupyter lab notebooks/inspect_checkpoint.ipynb")
  return "\n".join(lines)


def _figures(row: dict, keys) -> str:
  return "  ".join(f"{k} {row[k]:.4f}" for k in keys if k in row) + f"  (step {row['step']})"


def dry_run(config, workdir: str | None = None, resume: str | None = None) -> None:
  from flowlm_jax import config as config_lib, data, loop, train
  from flowlm_jax.logging import redact
  from flowlm_jax.models.registry import count_params

  setup = loop.prepare(config, initialises=loop.starts_from_initial_weights(workdir, resume))
  print(config_lib.to_yaml(config_lib.from_dict(redact(config.to_dict()))))
  print(f"tokenizer: {config.model.tokenizer} ({setup.vocab.size} tokens, [MASK]={setup.vocab.mask_id}, "
        f"[PAD]={setup.vocab.pad_id})")
  print(f"train: {setup.train_split.summary()}  ({setup.iterator.batches_per_epoch} batches/epoch)")
  print(f"validation: {setup.valid_split.summary()}")
  print(f"unigram entropy: {data.unigram_entropy(setup.train_split):.3f} nats/token (train); context-free "
        f"validation NLL: {data.unigram_cross_entropy(setup.train_split, setup.valid_split):.3f}")
  _, abstract = train.abstract_model(setup.model_cfg)
  n_params = count_params(abstract)
  print(f"model: {n_params / 1e6:.2f}M parameters; steps: {setup.total_steps}; mesh: {dict(setup.mesh.shape)}")
  print("dry run: ok")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad `--config.*` override (e.g. a misspelled key) reported in one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    while isinstance(e, BaseException) and e.args:  # ml_collections wraps a KeyError in an AttributeError
      e = e.args[0]
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:  # an error inside the preset's get_config: its last line says it
      text = text.splitlines()[-1]
    sys.exit(f"config error: {' '.join(text.split())}")


def _message(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
