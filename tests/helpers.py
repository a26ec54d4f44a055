"""Small shared builders for tests: a tiny config and a tiny model."""

from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  for key, value in training.items():
    c.training[key] = value
  return c
