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
