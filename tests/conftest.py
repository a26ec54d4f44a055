import os; os.environ.setdefault("WANDB_MODE", "disabled"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E401,E702

import pytest


@pytest.fixture(scope="session")
def tokenizer():
  """The embedded tokenizer (loaded once: importing transformers takes seconds)."""
  from flowlm_jax.tokenizer import load_tokenizer

  return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def vocab(tokenizer):
  from flowlm_jax.tokenizer import vocab_of

  return vocab_of(tokenizer)


@pytest.fixture(scope="session")
def tiny_overlay(tmp_path_factory):
  """YAML overlay turning the flowlm demo preset into a 6-step tiny run (for launch.py subprocesses)."""
  from helpers import diff_yaml, tiny_config

  c = tiny_config("flowlm")
  c.training.max_steps = 6
  c.training.save_steps = 2
  return diff_yaml("flowlm", None, c, str(tmp_path_factory.mktemp("overlay") / "tiny.yaml"))


@pytest.fixture(scope="session")
def reference_run(tiny_overlay, tmp_path_factory):
  """An uninterrupted tiny run: the baseline that resumed runs must reproduce exactly."""
  from helpers import launch

  workdir = str(tmp_path_factory.mktemp("reference") / "w")
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir
