"""Forward corruption process of masked diffusion: pick positions with probability t, then corrupt them.

LLaDA (Nie et al. 2025, "Large Language Diffusion Models", Sec. 2.1 and Alg. 1) masks every token independently
with probability t ~ U[0, 1]. We generalise that in two ways the config can switch on:
  * t is drawn from U[min_ratio, max_ratio] (LLaDA: [0, 1]) and lifted off zero with LLaDA's `eps` trick,
    p = (1 - eps) * r + eps, so no sequence is trained with (almost) nothing to predict;
  * a chosen position is not always replaced by [MASK]: like BERT it may get a random token or stay as it is.
    FlowLM trains the model to fix any position, so most chosen positions get a random token;
  * optionally a share of the rows takes a second strategy's kinds (`mix_strategy`, `mix_prob`), e.g. LLaDA's
    mostly-[MASK] corruption in a FlowLM run, so that the model also sees answers that are mostly [MASK] (about
    0.9 t of them), nearer the all-[MASK] answer LLaDA's sampler starts from than FlowLM's 0.3 t.

Everything here is pure and jit-able: the `MaskingSpec` is plain Python data that is closed over, e.g.
`jax.jit(functools.partial(corrupt, spec=spec))`, and the randomness comes only from the key passed in.
`corrupt` draws t per sequence and calls `corrupt_at`, which corrupts at given t (the likelihood bounds
draw their own t and use it too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flowlm_jax.vocab import Vocab

# (mask, random, unchanged) probabilities for a position chosen for corruption.
STRATEGIES: dict[str, tuple[float, float, float]] = {
  "BERT_STRATEGY": (0.8, 0.1, 0.1),  # Devlin et al. 2019
  "LLADA_STRATEGY": (0.9, 0.1, 0.0),
  "FLOWLM_STRATEGY": (0.3, 0.7, 0.0),
  # Absorbing-state masked diffusion as LLaDA's paper (Nie et al. 2025, Sec. 2.1) and MDLM (Sahoo et al. 2024)
  # write it: every chosen token becomes [MASK]. As a mix (masking.mix_strategy) it shows a FlowLM run answers
  # that are [MASK] wherever chosen, the LLaDA sampler's start when t is near 1.
  "ABSORBING_STRATEGY": (1.0, 0.0, 0.0),
}
CUSTOM_STRATEGY = "CUSTOM"  # take masking.mask_prob / random_prob / keep_prob from the config

# What happened to each position; int8 to keep the [B, L] array small.
KIND_NONE = 0  # not chosen: no loss here
KIND_MASK = 1
KIND_RANDOM = 2
KIND_UNCHANGED = 3

_PROB_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """Resolved masking config plus the vocab facts corruption needs; hashable, safe to close over in jit."""

  mask_prob: float
  random_prob: float
  keep_prob: float
  min_ratio: float
  max_ratio: float
  eps: float
  mask_id: int
  # A tuple (not an array) so the frozen dataclass stays hashable and comparable.
  random_token_ids: tuple[int, ...]
  # Training only (keep_clean_prefix): the share of rows whose first corruptible positions stay clean, and the
  # multiple of positions such a prefix comes in.
  clean_prefix_prob: float = 0.0
  clean_prefix_block: int = 32
  # The share of rows whose chosen positions take `mix_kinds` = (mask, random, unchanged) instead.
  mix_prob: float = 0.0
  mix_kinds: tuple[float, float, float] = (1.0, 0.0, 0.0)

  def __post_init__(self):
    object.__setattr__(self, "random_token_ids", tuple(int(i) for i in np.asarray(self.random_token_ids).ravel()))
    object.__setattr__(self, "mix_kinds", tuple(float(p) for p in self.mix_kinds))
    for name, probs in (("mask_prob + masking.random_prob + masking.keep_prob", self.kinds),
                        ("mix_strategy's probabilities", self.mix_kinds)):
      if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1.0) > _PROB_TOLERANCE:
        raise ValueError(f"masking.{name} must be non-negative and sum to 1, got "
                         f"{' + '.join(str(p) for p in probs)} = {sum(probs)}")
    if not 0.0 <= self.mix_prob <= 1.0:
      raise ValueError(f"masking.mix_prob must lie in [0, 1], got {self.mix_prob}")
    if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
      raise ValueError(
        f"need 0 <= masking.min_ratio <= masking.max_ratio <= 1, got min_ratio={self.min_ratio}, "
        f"max_ratio={self.max_ratio}"
      )
    if not 0.0 <= self.eps < 1.0:
      raise ValueError(f"masking.eps must lie in [0, 1), got {self.eps}")
    if self.draws_random_tokens and not self.random_token_ids:
      raise ValueError("masking draws random tokens but the vocab has no non-special ids to draw from")
    if self.mask_id in self.random_token_ids:
      raise ValueError(f"mask_id={self.mask_id} is among the random replacement ids; list it in vocab.special_ids")
    if not (0.0 <= self.clean_prefix_prob <= 1.0 and self.clean_prefix_block >= 1):
      raise ValueError(f"need 0 <= masking.clean_prefix_prob <= 1 and masking.clean_prefix_block >= 1, got "
                       f"{self.clean_prefix_prob} and {self.clean_prefix_block}")

  @property
  def kinds(self) -> tuple[float, float, float]:
    """(mask, random, unchanged) probabilities of a chosen position in a row without the mix."""
    return (self.mask_prob, self.random_prob, self.keep_prob)

  @property
  def draws_random_tokens(self) -> bool:
    return self.random_prob > 0 or (self.mix_prob > 0 and self.mix_kinds[1] > 0)

  @classmethod
  def from_config(cls, masking_cfg: Any, vocab: Vocab) -> MaskingSpec:
    """`masking_cfg`: the `masking` ConfigDict section, or any object with the same attributes."""
    mask_prob, random_prob, keep_prob = resolve_strategy(masking_cfg)
    mix_strategy = getattr(masking_cfg, "mix_strategy", "")
    mix_prob = float(getattr(masking_cfg, "mix_prob", cls.mix_prob))
    if mix_prob > 0 and mix_strategy not in STRATEGIES:
      raise ValueError(f"masking.mix_prob={mix_prob} needs masking.mix_strategy, one of {list(STRATEGIES)}; "
                       f"got {mix_strategy!r}")
    return cls(
      mask_prob=mask_prob,
      random_prob=random_prob,
      keep_prob=keep_prob,
      min_ratio=float(masking_cfg.min_ratio),
      max_ratio=float(masking_cfg.max_ratio),
      eps=float(masking_cfg.eps),
      mask_id=vocab.mask_id,
      random_token_ids=tuple(vocab.random_token_ids.tolist()),
      # A section without these keys (built by hand) gets the dataclass's defaults, written once above.
      clean_prefix_prob=float(getattr(masking_cfg, "clean_prefix_prob", cls.clean_prefix_prob)),
      clean_prefix_block=int(getattr(masking_cfg, "clean_prefix_block", cls.clean_prefix_block)),
      mix_prob=mix_prob,
      mix_kinds=STRATEGIES[mix_strategy] if mix_prob > 0 else cls.mix_kinds,
    )


def resolve_strategy(masking_cfg: Any) -> tuple[float, float, float]:
  """(mask, random, unchanged) probabilities named by `masking.strategy`."""
  strategy = masking_cfg.strategy
  if strategy == CUSTOM_STRATEGY:
    return float(masking_cfg.mask_prob), float(masking_cfg.random_prob), float(masking_cfg.keep_prob)
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown masking.strategy={strategy!r}; expected one of {[*STRATEGIES, CUSTOM_STRATEGY]}")
  return STRATEGIES[strategy]


class Corruption(NamedTuple):
  noisy_tokens: jax.Array  # int32[B, L]: the model's input
  corrupted: jax.Array  # bool[B, L]: positions chosen for corruption, whatever they got; these carry the loss
  t: jax.Array  # float32[B]: per-sequence probability that a corruptible position is chosen
  kind: jax.Array  # int8[B, L]: KIND_NONE / KIND_MASK / KIND_RANDOM / KIND_UNCHANGED


def sample_t(key: jax.Array, batch_size: int, spec: MaskingSpec) -> jax.Array:
  """float32[B]: r ~ U[min_ratio, max_ratio], t = (1 - eps) * r + eps (LLaDA's eps keeps t away from 0)."""
  r_B = jax.random.uniform(key, (batch_size,), jnp.float32, minval=spec.min_ratio, maxval=spec.max_ratio)
  return (1.0 - spec.eps) * r_B + spec.eps


MIX_ROW_STREAM = 0x6D697872  # fold_in data for the rows that take the mix strategy ("mixr"): far from split indices


def _kind_thresholds(kinds: tuple[float, float, float]) -> tuple[float, float]:
  """Where a uniform draw stops meaning MASK and RANDOM; normalised so that rounding in a sum never leaks."""
  total = sum(kinds)
  return kinds[0] / total, (kinds[0] + kinds[1]) / total


def sample_kinds(key: jax.Array, corrupted_BxL: jax.Array, spec: MaskingSpec) -> jax.Array:
  """int8[B, L]: for chosen positions, MASK / RANDOM / UNCHANGED with the strategy's probabilities (in a share
  `spec.mix_prob` of the rows, the mix strategy's)."""
  mask_below, random_below = _kind_thresholds(spec.kinds)
  if spec.mix_prob > 0:  # static: without a mix the draws are what they always were
    # A stream of its own (fold_in with a far constant, as train.CLEAN_PREFIX_STREAM), not a split of `key`.
    mixed_B = jax.random.uniform(jax.random.fold_in(key, MIX_ROW_STREAM), corrupted_BxL.shape[:1]) < spec.mix_prob
    mix_mask_below, mix_random_below = _kind_thresholds(spec.mix_kinds)
    mask_below = jnp.where(mixed_B, mix_mask_below, mask_below)[:, None]
    random_below = jnp.where(mixed_B, mix_random_below, random_below)[:, None]
  u_BxL = jax.random.uniform(key, corrupted_BxL.shape, jnp.float32)
  kind_BxL = jnp.where(u_BxL < mask_below, KIND_MASK, jnp.where(u_BxL < random_below, KIND_RANDOM, KIND_UNCHANGED))
  return jnp.where(corrupted_BxL, kind_BxL, KIND_NONE).astype(jnp.int8)


def sample_random_tokens(key: jax.Array, shape: tuple[int, ...], spec: MaskingSpec) -> jax.Array:
  """int32[shape]: ids drawn uniformly from spec.random_token_ids (never special ids)."""
  ids_N = jnp.asarray(np.asarray(spec.random_token_ids, dtype=np.int32))
  return ids_N[jax.random.randint(key, shape, 0, ids_N.shape[0])]


def _streams(key: jax.Array) -> jax.Array:
  """The four keys one corruption draws from: t, which positions, which kind, which random token.

  One split shared by `corrupt` and `corrupt_at`, so that `corrupt_at(key, ..., corrupt(key, ...).t)`
  reproduces `corrupt(key, ...)` (the training noise stream is the same whichever function draws it).
  """
  return jax.random.split(key, 4)


def corrupt(key: jax.Array, tokens_BxL: jax.Array, corruptible_BxL: jax.Array, spec: MaskingSpec) -> Corruption:
  """Corrupt each corruptible position independently with a per-sequence probability t ~ `sample_t`."""
  t_B = sample_t(_streams(key)[0], tokens_BxL.shape[0], spec)
  return corrupt_at(key, tokens_BxL, corruptible_BxL, t_B, spec)


def corrupt_at(key: jax.Array, tokens_BxL: jax.Array, corruptible_BxL: jax.Array, t_B: jax.Array,
               spec: MaskingSpec) -> Corruption:
  """Corrupt each corruptible position independently with the given per-sequence probability t_B; only the
  strategy's (mask, random, unchanged) probabilities of `spec` apply (its t range is `sample_t`'s).

  `corruptible_BxL` is False where a position must stay intact (specials, padding, the prompt in SFT); such
  positions are never chosen. A random replacement may happen to draw the original token: it still counts as
  KIND_RANDOM and stays `corrupted`, so the kind tells what the process did, not whether the token differs.
  """
  _, choose_key, kind_key, random_key = _streams(key)
  batch_size, seq_len = tokens_BxL.shape
  t_B = jnp.asarray(t_B, jnp.float32)
  chosen_BxL = jax.random.uniform(choose_key, (batch_size, seq_len), jnp.float32) < t_B[:, None]
  corrupted_BxL = chosen_BxL & corruptible_BxL.astype(bool)
  kind_BxL = sample_kinds(kind_key, corrupted_BxL, spec)

  noisy_BxL = tokens_BxL.astype(jnp.int32)
  noisy_BxL = jnp.where(kind_BxL == KIND_MASK, jnp.int32(spec.mask_id), noisy_BxL)
  if spec.draws_random_tokens:  # static: skip the draw (and the id table) when no strategy uses it
    random_BxL = sample_random_tokens(random_key, (batch_size, seq_len), spec)
    noisy_BxL = jnp.where(kind_BxL == KIND_RANDOM, random_BxL, noisy_BxL)
  return Corruption(noisy_tokens=noisy_BxL, corrupted=corrupted_BxL, t=t_B, kind=kind_BxL)


def keep_clean_prefix(key: jax.Array, corruptible_BxL: jax.Array, spec: MaskingSpec) -> jax.Array:
  """bool[B, L]: `corruptible_BxL` with, in a share `spec.clean_prefix_prob` of the rows, the first k corruptible
  positions taken out (they stay clean and carry no loss); k is a multiple of `spec.clean_prefix_block` drawn
  uniformly below the row's corruptible count, so at least one position is left.

  A semi-autoregressive sampler conditions each block on finished blocks before it and [MASK]s after it, states
  that i.i.d. corruption of the whole answer almost never produces. Rows with a clean prefix come closer: a
  clean start, the rest corrupted at the row's rate t (the sampler's later blocks are all [MASK]; block
  diffusion, Arriola et al. 2025 and Wu et al. 2025's Fast-dLLM v2, also noises block by block under
  block-causal attention). With the loss normalised per corruptible token, such a row's loss is the
  likelihood bound of the rest of the answer given its start.
  """
  corruptible = corruptible_BxL.astype(bool)
  count_B = jnp.sum(corruptible, axis=-1, dtype=jnp.int32)
  rank_BxL = jnp.cumsum(corruptible, axis=-1, dtype=jnp.int32) - 1  # index among the row's corruptible positions
  block = spec.clean_prefix_block
  row_key, length_key = jax.random.split(key)
  blocks_B = jnp.maximum((count_B + block - 1) // block, 1)  # the prefix ends before the last block starts
  prefix_B = jax.random.randint(length_key, count_B.shape, 0, blocks_B) * block
  prefix_B = jnp.where(jax.random.uniform(row_key, count_B.shape) < spec.clean_prefix_prob, prefix_B, 0)
  return corruptible & (rank_BxL >= prefix_B[:, None])
