"""Token-id facts the math needs (mask/pad ids, which ids are special), detached from the tokenizer.

Masking, losses and samplers take a `Vocab` instead of a tokenizer so that they stay pure and jit-able.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Vocab:
  size: int  # len(tokenizer): ids the tokenizer can produce (the model may pad its table beyond this)
  mask_id: int
  pad_id: int
  eos_id: int
  sep_id: int
  special_ids: tuple[int, ...]  # never corrupted, never drawn as random replacements

  def __post_init__(self):
    for name in ("mask_id", "pad_id", "eos_id", "sep_id"):
      value = getattr(self, name)
      if not 0 <= value < self.size:
        raise ValueError(f"vocab.{name}={value} is outside [0, {self.size})")

  @property
  def random_token_ids(self) -> np.ndarray:
    """Ids a random replacement may draw: everything that is not special."""
    allowed = np.ones(self.size, dtype=bool)
    allowed[list(self.special_ids)] = False
    return np.flatnonzero(allowed).astype(np.int32)

  def special_mask(self, tokens: np.ndarray) -> np.ndarray:
    return np.isin(tokens, np.asarray(self.special_ids))
