"""Likelihood bounds of a trained model, the way diffusion-LM papers report them, with standard errors.

Three figures, each an upper bound on the negative log-likelihood estimated by Monte Carlo:

- `mask_elbo_draws`: the masked-diffusion ELBO under pure [MASK] noise, for any trained model
  (MDLM, Sahoo et al. 2024, Eq. 10; MD4, Shi et al. 2024, Eq. 5; LLaDA's Eq. 3 with equality):
      -log p(x) <= E_{t ~ U(0,1]} [ (1/t) sum_{i masked at rate t} -log p(x_i | x_t) ].
  `form="count"` draws the number of masked positions l uniformly in 1..N instead and weights by N/l
  (LLaDA, Nie et al. 2025, Eq. 6 / Alg. 3): the same expectation (integrating the binomial over t gives
  1/l), with a bounded weight. Applied to the answer positions of prompt + answer rows it is LLaDA's
  conditional likelihood of an answer given its prompt, which scores multiple-choice candidates.
  `steps=T` restricts t to the grid {1/T, ..., 1}: the discrete-time T-step bound (MDLM Sec. 3.2.3),
  an upper bound on the NLL of a T-step random-order unmasking sampler; for a trained model (loss growing
  with t) it lies above the continuous bound and nears it as T grows, but not for every model.
- `mixed_noise_elbo_draws`: the exact ELBO of FlowLM's own corruption ([MASK] + uniform tokens, GIDD;
  the weights are derived in `losses.gidd_weights`).

Variance: each sequence gets K draws whose t (or l) are stratified over [0, 1) with one random offset per
sequence, (k + v) / K for k < K (the low-discrepancy sampler of MDLM and MD4, applied within a sequence
rather than across the batch so that sequences stay independent and the standard error below is valid).
The 1/t estimator has heavy tails (t near 0 with a masked token); the count form does not.

Every random draw of row n comes from `fold_in(key, n)`, so a row's estimate does not depend on how the
rows are batched. `summarize` turns per-row estimates into nats/token, bits/byte and a perplexity bound,
with standard errors of the ratio estimator (delta method) over sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowlm_jax import losses, masking
from flowlm_jax.vocab import Vocab

FORMS = ("time", "count")
FIGURES = ("mask", "mixed")
LogitsFn = Callable[[jax.Array], jax.Array]  # noisy tokens [R, L] -> float32 logits [R, L, V]


# --- draws --------------------------------------------------------------------------------------


def uniform_draws(key_B: jax.Array, draws: int, antithetic: bool) -> jax.Array:
  """float32[B, K] in [0, 1): per row either (k + v) / K with one v ~ U[0, 1) (stratified), or K iid draws."""
  def one(key):
    if antithetic:
      return stratified(jnp.arange(draws, dtype=jnp.float32), jax.random.uniform(key, ()), draws)
    return jax.random.uniform(key, (draws,))
  return jax.vmap(one)(key_B)


def stratified(k, v, draws: int):
  """(k + v) / K, kept below 1: in float32 the last stratum's sum rounds to 1.0 for v within ~2^-22 of 1, and
  t = 1 - u = 0 would make its weight 1/t infinite (a NaN bound)."""
  return jnp.minimum((k + v) / draws, jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))


def masking_times(u: jax.Array, steps=0) -> jax.Array:
  """t = 1 - u in (0, 1]; with `steps` = T > 0, rounded up onto the grid {1/T, ..., 1} (uniform over it).
  `steps` may be traced (one compiled estimator for every T)."""
  t = 1.0 - u
  grid = jnp.maximum(jnp.ceil(t * steps), 1.0) / jnp.maximum(steps, 1)
  return jnp.where(steps > 0, grid, t)


def masks_at_rate(key_R: jax.Array, corruptible_RxL: jax.Array, t_R: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(masked bool[R, L], weight float32[R]): each corruptible position masked with probability t; weight 1/t."""
  u_RxL = jax.vmap(lambda k: jax.random.uniform(k, corruptible_RxL.shape[1:]))(key_R)
  return corruptible_RxL & (u_RxL < t_R[:, None]), 1.0 / t_R


def masks_of_count(key_R: jax.Array, corruptible_RxL: jax.Array, u_R: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(masked, weight): l = 1 + floor(u N) of the N corruptible positions, chosen uniformly; weight N / l."""
  n_R = jnp.sum(corruptible_RxL, axis=-1, dtype=jnp.int32)
  l_R = jnp.clip(1 + jnp.floor(u_R * n_R).astype(jnp.int32), 1, jnp.maximum(n_R, 1))
  scores = jax.vmap(lambda k: jax.random.uniform(k, corruptible_RxL.shape[1:]))(key_R)
  scores = jnp.where(corruptible_RxL, scores, 2.0)  # never chosen
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  weight = jnp.where(n_R > 0, n_R / l_R, 0.0).astype(jnp.float32)
  return corruptible_RxL & (rank < l_R[:, None]), weight


def _draw_rows(tokens_BxL, corruptible_BxL, key_B, draws: int, antithetic: bool):
  """Rows repeated K times ([B K, L], row-major: row b's draws are adjacent), their u and two keys each."""
  u_R = uniform_draws(jax.vmap(lambda k: jax.random.fold_in(k, 0))(key_B), draws, antithetic).reshape(-1)
  keys_R = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1), draws))(key_B).reshape(-1)
  repeat = lambda x: jnp.repeat(x, draws, axis=0)
  return repeat(tokens_BxL), repeat(corruptible_BxL), u_R, keys_R


def mask_elbo_draws(logits_fn: LogitsFn, tokens_BxL: jax.Array, corruptible_BxL: jax.Array, key_B: jax.Array, *,
                    mask_id: int, draws: int, antithetic: bool = True, form: str = "time",
                    steps=0) -> jax.Array:
  """float32[B, K]: K draws per row of weight * sum of -log p(x_i | x_masked) over its masked positions.

  Each draw is an unbiased estimate of the row's masked-diffusion bound in nats (module doc); the
  corruptible positions are what may be masked and counted (the whole text, or an answer). `steps` (the
  T-step grid) applies to the time form only.
  """
  if form not in FORMS:
    raise ValueError(f"likelihood: unknown form {form!r}; expected one of {FORMS}")
  tokens_RxL, corruptible_RxL, u_R, keys_R = _draw_rows(tokens_BxL, corruptible_BxL, key_B, draws, antithetic)
  if form == "time":
    masked_RxL, weight_R = masks_at_rate(keys_R, corruptible_RxL, masking_times(u_R, steps))
  else:
    masked_RxL, weight_R = masks_of_count(keys_R, corruptible_RxL, u_R)
  noisy_RxL = jnp.where(masked_RxL, mask_id, tokens_RxL)
  nll_RxL, _ = losses.token_nll_and_correct(logits_fn(noisy_RxL), tokens_RxL)
  total_R = jnp.sum(jnp.where(masked_RxL, nll_RxL, 0.0), axis=-1) * weight_R
  return total_R.reshape(tokens_BxL.shape[0], draws)


def mixed_corruption(key_R: jax.Array, tokens_RxL: jax.Array, corruptible_RxL: jax.Array, t_R: jax.Array,
                     noise: losses.MixedNoise) -> jax.Array:
  """int32[R, L]: a draw of z ~ q_t(. | x) of the mixed process (losses.MixedNoise), row r from key r."""
  spec = noise.as_masking()

  def one(key, tokens_L, corruptible_L, t):
    return masking.corrupt_at(key, tokens_L[None], corruptible_L[None], t[None], spec).noisy_tokens[0]

  return jax.vmap(one)(key_R, tokens_RxL, corruptible_RxL, t_R)


def mixed_noise_elbo_draws(logits_fn: LogitsFn, tokens_BxL: jax.Array, corruptible_BxL: jax.Array,
                           key_B: jax.Array, *, noise: losses.MixedNoise, draws: int,
                           antithetic: bool = True) -> jax.Array:
  """float32[B, K]: K draws per row of sum w_t(z, x) (KL + IS) (losses.gidd_token_loss) at z ~ q_t(. | x)."""
  tokens_RxL, corruptible_RxL, u_R, keys_R = _draw_rows(tokens_BxL, corruptible_BxL, key_B, draws, antithetic)
  t_R = masking_times(u_R)
  noisy_RxL = mixed_corruption(keys_R, tokens_RxL, corruptible_RxL, t_R, noise)
  per_token = losses.gidd_token_loss(logits_fn(noisy_RxL), tokens_RxL, noisy_RxL, corruptible_RxL, t_R, noise)
  return jnp.sum(per_token, axis=-1).reshape(tokens_BxL.shape[0], draws)


# --- a trained model's estimators (one compiled function per figure) ----------------------------


def model_logits_fn(graphdef, params, pad_id: int) -> LogitsFn:
  """Logits of whole rows; rows are right-padded with [PAD] (never masked), passed as key lengths."""
  model = nnx.merge(graphdef, params)

  def logits(noisy_RxL):
    kv_lengths_R = jnp.sum(noisy_RxL != pad_id, axis=-1, dtype=jnp.int32)
    return model.logits_from_hidden(model.hidden(noisy_RxL, kv_lengths_B=kv_lengths_R))
  return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "pad_id", "mask_id", "draws", "antithetic", "form"))
def model_mask_elbo_draws(graphdef, params, tokens_BxL, corruptible_BxL, key_B, *, pad_id: int, mask_id: int,
                          draws: int, antithetic: bool, form: str, steps):
  return mask_elbo_draws(model_logits_fn(graphdef, params, pad_id), tokens_BxL, corruptible_BxL, key_B,
                         mask_id=mask_id, draws=draws, antithetic=antithetic, form=form, steps=steps)


@functools.partial(jax.jit, static_argnames=("graphdef", "pad_id", "noise", "draws", "antithetic"))
def model_mixed_noise_elbo_draws(graphdef, params, tokens_BxL, corruptible_BxL, key_B, *, pad_id: int,
                                 noise: losses.MixedNoise, draws: int, antithetic: bool):
  return mixed_noise_elbo_draws(model_logits_fn(graphdef, params, pad_id), tokens_BxL, corruptible_BxL, key_B,
                                noise=noise, draws=draws, antithetic=antithetic)


def flowlm_noise(vocab: Vocab) -> losses.MixedNoise:
  """FlowLM's corruption (30% [MASK], 70% uniform tokens, nothing kept) as a mixed-noise process."""
  mask_prob, random_prob, _ = masking.STRATEGIES["FLOWLM_STRATEGY"]
  return losses.MixedNoise(time_scale=1.0, mask_prob=mask_prob, random_prob=random_prob, mask_id=vocab.mask_id,
                           random_token_ids=tuple(int(i) for i in vocab.random_token_ids))


@dataclasses.dataclass(frozen=True)
class BoundSpec:
  """Which bound to estimate and how (hashable options of `row_draws`)."""
  figure: str = "mask"      # "mask" (pure [MASK] noise) | "mixed" (FlowLM's [MASK] + uniform noise, GIDD)
  draws: int = 8            # K Monte-Carlo draws per sequence
  antithetic: bool = True   # stratified t (or l) over a sequence's draws
  form: str = "time"        # mask figure: "time" (weight 1/t) | "count" (LLaDA Alg. 3, weight N/l)
  steps: int = 0            # mask figure, time form: T > 0 gives the T-step bound

  def __post_init__(self):
    if self.figure not in FIGURES:
      raise ValueError(f"likelihood: unknown figure {self.figure!r}; expected one of {FIGURES}")
    if self.form not in FORMS:
      raise ValueError(f"likelihood: unknown form {self.form!r}; expected one of {FORMS}")
    if self.draws < 1 or self.steps < 0:
      raise ValueError(f"likelihood: draws must be >= 1 and steps >= 0, got draws={self.draws}, steps={self.steps}")
    if self.figure == "mixed" and (self.form != "time" or self.steps):
      raise ValueError("likelihood: the mixed-noise figure is the continuous-time bound (form='time', steps=0)")
    if self.form == "count" and self.steps:
      raise ValueError("likelihood: steps (the T-step bound) applies to form='time' only")


def row_draws(graphdef, params, vocab: Vocab, tokens_NxL: np.ndarray, corruptible_NxL: np.ndarray,
              spec: BoundSpec = BoundSpec(), *, batch_size: int = 64, seed: int = 0,
              noise: losses.MixedNoise | None = None, key_ids: np.ndarray | None = None) -> np.ndarray:
  """float64[N, K]: every row's K draws of `spec`'s bound (nats), `batch_size` model rows per forward pass.

  Row n's draws use `fold_in(key(seed), key_ids[n])` (default n) whatever the batching, so rows given the
  same id get the same draws (common random numbers); the last batch is padded (no recompile).
  `noise` (mixed figure) defaults to FlowLM's corruption.
  """
  tokens_NxL, corruptible_NxL = np.asarray(tokens_NxL, np.int32), np.asarray(corruptible_NxL, bool)
  if tokens_NxL.ndim != 2 or tokens_NxL.shape != corruptible_NxL.shape:
    raise ValueError(f"likelihood: tokens {tokens_NxL.shape} and corruptible {corruptible_NxL.shape} must be "
                     "the same [N, L]")
  rows = max(1, batch_size // spec.draws)
  base = jax.random.key(seed)
  key_ids = np.arange(len(tokens_NxL)) if key_ids is None else np.asarray(key_ids)
  common = dict(pad_id=vocab.pad_id, draws=spec.draws, antithetic=spec.antithetic)
  if spec.figure == "mask":
    estimate = functools.partial(model_mask_elbo_draws, mask_id=vocab.mask_id, form=spec.form,
                                 steps=jnp.int32(spec.steps), **common)
  else:
    estimate = functools.partial(model_mixed_noise_elbo_draws, noise=noise or flowlm_noise(vocab), **common)
  out = []
  for start in range(0, len(tokens_NxL), rows):
    index = np.arange(start, start + rows)
    real = index < len(tokens_NxL)
    index = np.where(real, index, 0)
    keys = jax.vmap(lambda n: jax.random.fold_in(base, n))(jnp.asarray(key_ids[index]))
    corruptible = corruptible_NxL[index] & real[:, None]
    draws = estimate(graphdef, params, jnp.asarray(tokens_NxL[index]), jnp.asarray(corruptible), keys)
    out.append(np.asarray(draws, np.float64)[real])
  return np.concatenate(out) if out else np.zeros((0, spec.draws))


# --- summaries ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bound:
  """An NLL upper bound over a set of sequences; `_se` fields are standard errors over sequences."""
  nats_per_token: float
  nats_per_token_se: float
  perplexity: float          # exp(nats_per_token): a perplexity bound
  bits_per_byte: float | None  # None when the text has no bytes (e.g. only special tokens)
  bits_per_byte_se: float | None
  tokens: int
  bytes: int
  sequences: int
  draws: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def ratio_and_se(numerator_N: np.ndarray, denominator_N: np.ndarray) -> tuple[float, float]:
  """(sum a / sum b, its standard error) over N independent units (delta method; 0 for N < 2)."""
  a, b = np.asarray(numerator_N, np.float64), np.asarray(denominator_N, np.float64)
  ratio = a.sum() / b.sum()
  n = len(a)
  if n < 2:
    return float(ratio), 0.0
  residual = a - ratio * b
  return float(ratio), float(np.sqrt(np.sum(residual ** 2) / (n * (n - 1))) / b.mean())


def summarize(draws_NxK: np.ndarray, tokens_N: np.ndarray, bytes_N: np.ndarray | None = None) -> Bound:
  """A `Bound` from each sequence's draws (nats) and its counted tokens (and text bytes)."""
  draws_NxK = np.asarray(draws_NxK, np.float64)
  nats_N = draws_NxK.mean(axis=1)
  tokens_N = np.asarray(tokens_N)
  if tokens_N.sum() == 0:
    raise ValueError("likelihood: no tokens to score")
  per_token, per_token_se = ratio_and_se(nats_N, tokens_N)
  total_bytes = 0 if bytes_N is None else int(np.sum(bytes_N))
  bpb = bpb_se = None
  if total_bytes:
    bpb, bpb_se = (x / math.log(2) for x in ratio_and_se(nats_N, bytes_N))
  return Bound(nats_per_token=per_token, nats_per_token_se=per_token_se, perplexity=math.exp(per_token),
               bits_per_byte=bpb, bits_per_byte_se=bpb_se, tokens=int(tokens_N.sum()), bytes=total_bytes,
               sequences=len(nats_N), draws=draws_NxK.shape[1])


def text_bytes(tokenizer, vocab: Vocab, tokens_NxL: np.ndarray, corruptible_NxL: np.ndarray) -> np.ndarray:
  """int[N]: UTF-8 bytes of each row's counted text (its corruptible non-special tokens, decoded)."""
  special = vocab.special_mask(np.asarray(tokens_NxL))
  return np.asarray([len(tokenizer.decode(row[keep & ~sp].tolist(), skip_special_tokens=True).encode())
                     for row, keep, sp in zip(np.asarray(tokens_NxL), np.asarray(corruptible_NxL, bool), special)])


def estimate_bound(graphdef, params, tokenizer, vocab: Vocab, tokens_NxL, corruptible_NxL,
                   spec: BoundSpec = BoundSpec(), **kwargs) -> Bound:
  """`summarize(row_draws(...))` with the rows' token and byte counts; kwargs go to `row_draws`."""
  draws = row_draws(graphdef, params, vocab, tokens_NxL, corruptible_NxL, spec, **kwargs)
  corruptible_NxL = np.asarray(corruptible_NxL, bool)
  return summarize(draws, corruptible_NxL.sum(axis=1), text_bytes(tokenizer, vocab, tokens_NxL, corruptible_NxL))
