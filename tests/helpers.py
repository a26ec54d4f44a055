"""Small shared builders for tests: a tiny config and a tiny model."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def jit_compiles(caplog, name: str):
  """Yields a list that, after the block, holds the log records of each `jax.jit(name)` compile inside it
  (jax.log_compiles logs one per compile, persistent-cache hits included)."""
  import jax

  caplog.clear()
  compiles = []
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    yield compiles
  compiles.extend(r for r in caplog.records if f"Compiling jit({name})" in r.getMessage())


def load_preset(name: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location(f"preset_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def tiny_config(preset: str = "flowlm", variant: str | None = None, **training):
  """The demo preset shrunk to run a few steps in seconds."""
  c = load_preset(preset, variant)
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 2, 64
  c.dataset.max_length = 32 if variant != "tasks" else c.dataset.max_length
  c.dataset.max_train_examples = 400
  c.dataset.max_validation_examples = 40
  c.training.batch_size = 8
  c.training.max_steps = 6
  c.training.save_steps = 3
  c.training.async_checkpointing = False
  c.evaluation.eval_steps = 0
  c.evaluation.eval_batches = 2
  c.logging.log_every = 1
  c.logging.progress_bar = False
  c.logging.wandb.mode = "disabled"
  c.inference.at_evaluation = False  # sampling compiles both samplers: the tests that need it turn it on
  for key, value in training.items():
    c.training[key] = value
  return c


def diff_yaml(preset: str, variant: str | None, config, path: str) -> str:
  """Writes the values where `config` differs from the preset as a YAML overlay for launch.py."""
  import yaml

  base = load_preset(preset, variant).to_dict()
  def diff(a, b):
    out = {}
    for k, v in b.items():
      if isinstance(v, dict):
        sub = diff(a[k], v)
        if sub:
          out[k] = sub
      elif a[k] != v:
        out[k] = v
    return out
  with open(path, "w") as f:
    yaml.safe_dump(diff(base, config.to_dict()), f)
  return path


def launch(*args: str, timeout: int = 300, env: dict | None = None):
  """Runs launch.py in a subprocess; returns the CompletedProcess (text output)."""
  import subprocess
  import sys

  full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
              "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def launch_in_process(*args: str, env: dict | None = None):
  """launch.py's flag parsing and `main` in this process, as `launch` would run them in a subprocess.

  For behaviours a fresh interpreter proves nothing extra about (config errors, one-line failures, short
  runs): saves an interpreter start and the jax/transformers imports. Resume, signals and multi-process
  runs keep a real subprocess. Returns a CompletedProcess: exit code, stdout, stderr (log records included).
  """
  import contextlib
  import importlib.util
  import io
  import logging
  import subprocess
  import sys
  from unittest import mock

  module = sys.modules.get("launch_cli")
  if module is None:  # imported once: absl flags can be defined only once per process
    spec = importlib.util.spec_from_file_location("launch_cli", os.path.join(REPO, "launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["launch_cli"] = module
  module.FLAGS.unparse_flags()
  for name in [n for n in module.FLAGS if n.startswith("config.")]:  # each parse defines its overrides anew
    delattr(module.FLAGS, name)
  argv = ["launch.py", *args]
  out, err = io.StringIO(), io.StringIO()
  handler = logging.StreamHandler(err)
  handler.setLevel(logging.WARNING)
  logging.getLogger().addHandler(handler)
  code = 0
  try:
    # ml_collections reads the `--config.*` overrides from sys.argv, not from the argv it is given.
    with contextlib.chdir(REPO), mock.patch.dict(os.environ, env or {}), mock.patch.object(sys, "argv", argv), \
        contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        module.main(module._parse_flags(argv))  # what is not a flag, as absl's app.run hands it on
      except SystemExit as e:  # sys.exit("message") prints the message and exits 1
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
          print(e.code, file=err)
  finally:
    logging.getLogger().removeHandler(handler)
  return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def metrics_rows(workdir: str, key: str = "loss") -> dict[int, dict]:
  import json

  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        rows[row["step"]] = row
  return rows


def tree_hashes(directory) -> dict[str, str]:
  """{relative path: sha256} of every file below `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def parse_launch_flags(*args: str):
  """launch.py's `--config` flag parsed in-process on a fresh flag set: (config, {dotted key: override})."""
  from absl import flags
  from ml_collections import config_flags

  from flowlm_jax import cli

  cli.register_config_parsers()  # as launch.py does
  argv = ["launch.py", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "flowlm.py"), flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config, config_flags.get_override_values(fv["config"])
