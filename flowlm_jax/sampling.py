"""Masked-diffusion decoding as whole compiled loops: LLaDA and FlowLM any-position refinement.

Rows, their layout and the model passes over them (whole rows, or slices against a key/value cache)
are `decoding_passes.py`; this module holds the decoding rules.

- LLaDA (Nie et al. 2025, "Large Language Diffusion Models", Alg. 4 random / Alg. 5 low-confidence
  remasking, with semi-autoregressive blocks): the answer starts all [MASK]; each step predicts every
  masked position and commits the most confident ones of the current block; committed tokens are final.
- FlowLM: each step re-predicts every answer position and rewrites a few of them according to
  `replacement_strategy`; a row stops on its own (docs/sampling.md has the exact rules).

Both can decode faster (Fast-dLLM, Wu et al. 2025): `parallel_threshold` > 0 also commits every
candidate whose confidence is above it, `parallel_factor` > 0 the most confident n whose confidences pass
a bar that rises with n (parallel_count), and `cache` = prefix | dual reuses keys/values between refreshes.

Each sampler is one `jax.jit` (a fori/while loop inside), batched, with no host work per step.
Randomness: `init_key, step_key = split(key)`; step t draws `gumbel_key, conf_key =
split(fold_in(step_key, t))`, so a run is a pure function of (params, prompts, config, key).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowlm_jax import data, sharding
from flowlm_jax.decoding_passes import CACHES, Rows, check_cacheable, decoding_model
from flowlm_jax.vocab import Vocab

NEG_INF = float(np.finfo(np.float32).min)  # what the model puts on padded vocabulary rows
PROMPT_BUCKET = 8  # prompts are padded to a multiple of this: fewer shapes, fewer compiles
STRATEGIES = ("below_threshold", "most_confident_changes", "fill_then_refine")
# FlowLM's default refresh period of the prompt cache. Refreshed only at the first step (an all-[MASK] answer), the
# prompt's keys/values never see the answer taking shape: on two FlowLM-trained tasks_long models that lost nearly
# every exact answer (0-1 of 70 at 256, against 22-29 uncached); refreshed every 8 steps, 21 and 29 (docs/sampling.md).
FLOWLM_CACHE_REFRESH = 8
BATCH_STREAM = 0x62617463  # fold_in data of generate_batched's per-batch keys ("batc")
# XLA options for the decoding loops on GPU (measured in docs/performance.md: -3% time at `small`):
# the loop body as one CUDA graph (command buffers including WHILE), and no dot merging, whose weight
# concatenations are loop-invariant but were recomputed at every step.
GPU_DECODING_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    "xla_gpu_dot_merger_threshold_mb": 0,
}


# --- static configuration ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LladaSpec:
  """Resolved LLaDA options; hashable, a static argument of the compiled sampler."""
  answer_length: int
  steps: int
  block_length: int
  temperature: float
  remasking: str
  cfg_scale: float
  vocab: Vocab
  cache: str = "none"             # none | prefix | dual (decoding_passes.py)
  cache_refresh: int = 0          # also refresh every this many steps of a block (0: only at its first step)
  parallel_threshold: float = 0.0  # > 0: also commit every [MASK] of the block above this confidence
  parallel_factor: float = 0.0    # > 0: also commit the n most confident [MASK]s that parallel_count allows

  def __post_init__(self):
    _check(self.answer_length > 0 and self.steps > 0, "answer_length and steps must be > 0")
    _check(self.block_length > 0, f"block_length must be > 0 (0 in the config: the whole answer), got {self.block_length}")
    _check(self.cfg_scale >= 0, f"cfg_scale must be >= 0 (0 = no guidance), got {self.cfg_scale}")
    _check_sampling_options(self)
    _check(self.answer_length % self.block_length == 0,
           f"answer_length={self.answer_length} is not a multiple of block_length={self.block_length}")
    _check(self.steps % self.num_blocks == 0,
           f"steps={self.steps} is not divisible by the number of blocks {self.num_blocks}")
    _check(self.remasking in ("low_confidence", "random"), f"unknown remasking {self.remasking!r}")

  @property
  def num_blocks(self) -> int:
    return self.answer_length // self.block_length

  @classmethod
  def from_config(cls, icfg, vocab: Vocab) -> "LladaSpec":
    return cls(answer_length=int(icfg.answer_length), steps=int(icfg.steps),
               block_length=int(icfg.block_length or icfg.answer_length), temperature=float(icfg.temperature),
               remasking=icfg.remasking, cfg_scale=float(icfg.cfg_scale), vocab=vocab, **_fast_options(icfg))


@dataclasses.dataclass(frozen=True)
class FlowSpec:
  """Resolved FlowLM options; hashable, a static argument of the compiled sampler."""
  answer_length: int
  max_steps: int
  fill_steps: int          # fill_then_refine: [MASK]s are committed on LLaDA's schedule over this many steps
  threshold: float
  max_replacements: int
  strategy: str
  temperature: float
  initial_answer: str
  vocab: Vocab
  cache: str = "none"             # prefix and dual alike cache the prompt: every answer column is re-predicted
  cache_refresh: int = 0          # refresh every this many steps (0: every FLOWLM_CACHE_REFRESH steps)
  parallel_threshold: float = 0.0  # > 0: also rewrite every candidate above this confidence, not just k
  parallel_factor: float = 0.0    # > 0: also rewrite the n most confident candidates parallel_count allows

  def __post_init__(self):
    _check(self.answer_length > 0 and self.max_steps > 0 and self.fill_steps > 0,
           "answer_length, max_steps and steps must be > 0")
    _check(0.0 <= self.threshold <= 1.0, f"confidence_threshold must be in [0, 1], got {self.threshold}")
    _check_sampling_options(self)
    _check(self.max_replacements > 0, "max_replacements must be > 0")
    _check(self.strategy in STRATEGIES, f"unknown replacement_strategy {self.strategy!r}")
    _check(self.initial_answer in ("mask", "random"), f"unknown initial_answer {self.initial_answer!r}")

  @classmethod
  def from_config(cls, icfg, vocab: Vocab) -> "FlowSpec":
    return cls(answer_length=int(icfg.answer_length), max_steps=int(icfg.max_steps),
               fill_steps=min(int(icfg.steps), int(icfg.max_steps)), threshold=float(icfg.confidence_threshold),
               max_replacements=int(icfg.max_replacements), strategy=icfg.replacement_strategy,
               temperature=float(icfg.temperature), initial_answer=icfg.initial_answer, vocab=vocab,
               **_fast_options(icfg))


def _fast_options(icfg) -> dict:
  return dict(cache=icfg.cache, cache_refresh=int(icfg.cache_refresh),
              parallel_threshold=float(icfg.parallel_threshold), parallel_factor=float(icfg.parallel_factor))


def _check_sampling_options(spec) -> None:
  """The checks both samplers share (`not x >= 0` also refuses NaN)."""
  _check(spec.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {spec.temperature}")
  _check(spec.cache in CACHES, f"unknown cache {spec.cache!r} (one of {', '.join(CACHES)})")
  _check(spec.cache_refresh >= 0, f"cache_refresh must be >= 0, got {spec.cache_refresh}")
  _check(0.0 <= spec.parallel_threshold <= 1.0, f"parallel_threshold must be in [0, 1], got {spec.parallel_threshold}")
  _check(spec.parallel_factor >= 0.0, f"parallel_factor must be >= 0, got {spec.parallel_factor}")
  _check(not (spec.parallel_threshold and spec.parallel_factor),
         "set parallel_threshold or parallel_factor, not both: they are two rules for the same choice")


def is_parallel(spec) -> bool:
  """Whether a step may commit more than its schedule's count (either parallel rule is on)."""
  return spec.parallel_threshold > 0 or spec.parallel_factor > 0


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(f"inference: {message}")


# --- pieces shared by both samplers -----------------------------------------------------------


def transfer_count(mask_count_B, steps: int, i):
  """Tokens to commit at step i of `steps`: the count split evenly, remainder to the first steps.

  LLaDA's `get_num_transfer_tokens` (linear schedule: equal expected transitions per step); 0 once i >= steps.
  """
  base, remainder = mask_count_B // steps, mask_count_B % steps
  return jnp.where(i < steps, base + (i < remainder), 0).astype(jnp.int32)


def select_top_k(score_BxA, eligible_BxA, k_B):
  """Bool [B, A]: the k_B[b] highest-scoring eligible positions of each row; ties go to the lower index."""
  score = jnp.where(eligible_BxA, score_BxA, -jnp.inf)
  order = jnp.argsort(-score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return eligible_BxA & (rank < k_B[:, None])


def parallel_count(conf_BxA, eligible_BxA, factor: float):
  """[B]: Fast-dLLM's factor rule (Wu et al. 2025, Theorem 1: decoding n tokens at once from their
  marginals picks what decoding them from the joint would when each is wrong with probability
  epsilon and (n + 1) epsilon <= 1): the largest n such that the i-th most confident eligible position
  has confidence >= 1 - factor / (i + 1) for every i <= n. The bar rises with n, so a step that would
  commit many tokens needs each of them surer than a step that commits few. 0 where nothing clears it:
  the "at least one" per step is the sampler's (LLaDA's schedule), as for the threshold."""
  conf = jnp.where(eligible_BxA, conf_BxA, -jnp.inf)
  sorted_BxA = -jnp.sort(-conf, axis=-1)  # most confident first
  n_A = jnp.arange(1, conf.shape[-1] + 1)
  passes_BxA = sorted_BxA >= 1.0 - factor / (n_A + 1)
  return jnp.sum(jnp.cumprod(passes_BxA, axis=-1), axis=-1, dtype=jnp.int32)


def parallel_commit(spec, conf_BxA, eligible_BxA):
  """Bool [B, A]: the eligible positions a parallel rule commits beyond the schedule's count (none when
  both rules are off)."""
  if spec.parallel_threshold > 0:
    return eligible_BxA & (conf_BxA > spec.parallel_threshold)
  if spec.parallel_factor > 0:
    return select_top_k(conf_BxA, eligible_BxA, parallel_count(conf_BxA, eligible_BxA, spec.parallel_factor))
  return jnp.zeros_like(eligible_BxA)


def predict(logits_BxAxV, temperature: float, gumbel_key, vocab: Vocab):
  """(prediction [B, A], its probability [B, A], prob_of: ids [B, A] -> their probabilities).

  [MASK] and [PAD] are never predicted (they are never training targets), so a prediction always fills a
  [MASK]. With temperature > 0 the prediction is Gumbel-max sampled: argmax(logits + T * gumbel), LLaDA's
  `add_gumbel_noise` in log space; probabilities are those of the unperturbed softmax, as in LLaDA.
  Probabilities are read off logsumexp, so no [B, A, V] softmax is kept (large vocabularies).
  """
  # A where() over a [V] mask fuses into the reduction below; a scatter into the logits would copy them.
  banned_V = jnp.zeros(logits_BxAxV.shape[-1], bool).at[jnp.array([vocab.mask_id, vocab.pad_id])].set(True)
  logits = jnp.where(banned_V, NEG_INF, logits_BxAxV)
  scores = logits
  if temperature > 0:
    scores = logits + temperature * jax.random.gumbel(gumbel_key, logits.shape, jnp.float32)
  pred_BxA, log_z_BxA = argmax_and_logsumexp(scores, logits)
  prob_of = lambda ids_BxA: jnp.exp(jnp.take_along_axis(logits, ids_BxA[..., None], axis=-1)[..., 0] - log_z_BxA)
  return pred_BxA, prob_of(pred_BxA), prob_of


def argmax_and_logsumexp(scores_BxAxV, logits_BxAxV):
  """(argmax of scores, logsumexp of logits) over the last axis, in one pass over the vocabulary.

  One variadic reduction carries (best score, its index, running max of the logits, sum of exp(logit -
  running max)) -- the online-softmax recurrence (Milakov & Gimelshein 2018) -- so the [B, A, V] logits
  are read once per step instead of once for the max, once for the sum and once for the argmax.
  Ties go to the lower index, as in `jnp.argmax`. Logits must be finite (banned entries hold NEG_INF).
  """
  index = jax.lax.broadcasted_iota(jnp.int32, logits_BxAxV.shape, logits_BxAxV.ndim - 1)
  ones = jnp.ones_like(logits_BxAxV)  # each element is its own running max: exp(x - x) = 1

  def combine(a, b):
    (score_a, index_a, max_a, sum_a), (score_b, index_b, max_b, sum_b) = a, b
    take_a = (score_a > score_b) | ((score_a == score_b) & (index_a < index_b))
    # Only the sum under the smaller max is rescaled: one exp per combine, not two.
    a_larger = max_a >= max_b
    scale = jnp.exp(-jnp.abs(max_a - max_b))
    new_sum = jnp.where(a_larger, sum_a + sum_b * scale, sum_a * scale + sum_b)
    return (jnp.where(take_a, score_a, score_b), jnp.where(take_a, index_a, index_b),
            jnp.maximum(max_a, max_b), new_sum)

  # The identity is finite (NEG_INF, not -inf) so that combining two identities gives no inf - inf.
  init = (jnp.float32(NEG_INF), jnp.int32(np.iinfo(np.int32).max), jnp.float32(NEG_INF), jnp.float32(0))
  _, argmax, running_max, total = jax.lax.reduce(
      (scores_BxAxV.astype(jnp.float32), index, logits_BxAxV.astype(jnp.float32), ones), init, combine,
      (logits_BxAxV.ndim - 1,))
  return argmax, running_max + jnp.log(total)


def _jit_sampler(fn):
  """`jax.jit` of a sampler, with GPU_DECODING_OPTIONS when it runs on a GPU.

  The backend is looked up at the first call, not at import (importing must not start a backend).
  """
  jitted = {}

  @functools.wraps(fn)
  def call(graphdef, params, *args, **kwargs):
    backend = jax.default_backend()
    if backend not in jitted:
      jitted[backend] = jax.jit(fn, static_argnames=("graphdef", "spec", "padded", "return_trajectory"),
                                compiler_options=GPU_DECODING_OPTIONS if backend == "gpu" else None)
    mesh = sharding.mesh_of(params)  # sharded weights (sampling during training): trace on their mesh
    if mesh is None:
      return jitted[backend](graphdef, params, *args, **kwargs)
    return sharding.traced_on(mesh, jitted[backend])(graphdef, params, *args, **kwargs)

  return call


def _record(trajectory, t, answer_BxA):
  return None if trajectory is None else trajectory.at[t].set(answer_BxA)


def _hold_final(trajectory, t_end, answer_BxA):
  """The trajectory with the entries the loop never reached holding the final answer."""
  if trajectory is None:
    return None
  unreached = jnp.arange(trajectory.shape[0])[:, None, None] > t_end
  return jnp.where(unreached, answer_BxA[None], trajectory)


def _step_keys(step_key, t):
  return jax.random.split(jax.random.fold_in(step_key, t))


# --- LLaDA ------------------------------------------------------------------------------------


def guided_rows(rows: Rows, spec: LladaSpec):
  """(rows the model runs, answer -> their answers, their logits -> the rows' logits).

  Classifier-free guidance runs a second copy of each row whose prompt is [MASK] (padding stays
  padding) and combines `uncond + (cfg_scale + 1) * (cond - uncond)`; without it all three are plain.
  """
  if spec.cfg_scale <= 0:
    return rows, lambda answer_BxA: answer_BxA, lambda logits: logits
  B, P = rows.prompt_BxP.shape
  uncond_BxP = jnp.where(jnp.arange(P) < rows.length_B[:, None], spec.vocab.mask_id, rows.prompt_BxP)
  both = dataclasses.replace(rows, prompt_BxP=jnp.concatenate([rows.prompt_BxP, uncond_BxP]),
                             length_B=jnp.concatenate([rows.length_B, rows.length_B]))

  def combine(logits):
    cond, uncond = logits[:B], logits[B:]
    return uncond + (spec.cfg_scale + 1) * (cond - uncond)

  return both, lambda answer_BxA: jnp.concatenate([answer_BxA, answer_BxA]), combine


def llada_block_logits(rows: Rows, spec: LladaSpec, answer_BxA, cache, block, refresh):
  """(logits [B, block_length, V] of the current block, the cache after this pass).

  Only the current block is projected onto the vocabulary (the others are not eligible this step).
  With a cache, `refresh` runs whole rows and refills it; otherwise the pass runs the block and every
  later column (prefix) or the block alone (dual) against it. A prefix pass has one static shape per
  block, so `lax.switch` picks the block's branch.
  """
  L, A = spec.block_length, spec.answer_length
  first = block * L
  if spec.cache == "none":
    return rows.full(answer_BxA, first, L), cache
  if spec.cache == "dual":
    cached = lambda: rows.from_cache(answer_BxA, cache, first, L, L)
  else:
    branches = [functools.partial(rows.from_cache, answer_BxA, cache, b * L, A - b * L, L)
                for b in range(spec.num_blocks)]
    cached = lambda: jax.lax.switch(block, branches)
  return jax.lax.cond(refresh, lambda: rows.refresh(answer_BxA, first, L), cached)


def llada_commit(spec: LladaSpec, block_BxL, pred_BxL, conf_BxL, score_BxL, i):
  """The block after committing step i's tokens: the schedule's count of the highest-scoring [MASK]s,
  and with a parallel rule at least one, plus what the rule commits (parallel_commit)."""
  eligible_BxL = block_BxL == spec.vocab.mask_id  # every block starts all [MASK]
  B, L = block_BxL.shape
  k_B = transfer_count(jnp.full((B,), L), spec.steps // spec.num_blocks, i)
  if is_parallel(spec):  # Fast-dLLM: whatever the rule allows, never nothing
    k_B = jnp.maximum(k_B, 1)
  commit_BxL = select_top_k(score_BxL, eligible_BxL, k_B) | parallel_commit(spec, conf_BxL, eligible_BxL)
  return jnp.where(commit_BxL, pred_BxL, block_BxL)


@_jit_sampler
def llada_sample(graphdef, params, prompt_BxP, length_B, key, *, spec: LladaSpec, padded: bool,
                 return_trajectory: bool = False):
  """(answer [B, A], passes, full passes, trajectory [steps+1, B, A] or None): LLaDA low-confidence /
  random remasking.

  passes: forward passes made (every row the same: blocks advance together); full passes: those that
  ran whole rows (the others ran a slice against the cache). Trajectory entries past the last pass
  repeat the final answer.
  """
  B, A, L, vocab = prompt_BxP.shape[0], spec.answer_length, spec.block_length, spec.vocab
  steps_per_block = spec.steps // spec.num_blocks
  model, layers = decoding_model(graphdef, params)
  check_cacheable(model, spec.cache)
  _, step_key = jax.random.split(key)
  rows, model_answer, combine = guided_rows(Rows(model, layers, prompt_BxP, length_B, padded), spec)

  def body(carry):
    t, block, i, answer_BxA, cache, full_passes, trajectory = carry
    gumbel_key, conf_key = _step_keys(step_key, t)
    refresh = (i == 0) | ((i % spec.cache_refresh == 0) if spec.cache_refresh else False)
    logits, cache = llada_block_logits(rows, spec, model_answer(answer_BxA), cache, block, refresh)
    pred_BxL, conf_BxL, _ = predict(combine(logits), spec.temperature, gumbel_key, vocab)
    score_BxL = conf_BxL
    if spec.remasking == "random":
      score_BxL = jax.lax.dynamic_slice_in_dim(jax.random.uniform(conf_key, (B, A)), block * L, L, 1)
    block_BxL = jax.lax.dynamic_slice_in_dim(answer_BxA, block * L, L, axis=1)
    block_BxL = llada_commit(spec, block_BxL, pred_BxL, conf_BxL, score_BxL, i)
    answer_BxA = jax.lax.dynamic_update_slice_in_dim(answer_BxA, block_BxL, block * L, axis=1)
    # With parallel decoding a block ends as soon as no row has a [MASK] left in it; the schedule
    # guarantees that by its last step either way.
    finished = i + 1 == steps_per_block
    if is_parallel(spec):
      finished |= ~jnp.any(block_BxL == vocab.mask_id)
    full_passes += refresh if spec.cache != "none" else 1
    return (t + 1, block + finished, jnp.where(finished, 0, i + 1), answer_BxA, cache, full_passes,
            _record(trajectory, t + 1, answer_BxA))

  answer_BxA = jnp.full((B, A), vocab.mask_id, jnp.int32)
  cache = None if spec.cache == "none" else rows.empty_cache(model_answer(answer_BxA))
  trajectory = jnp.zeros((spec.steps + 1, B, A), jnp.int32).at[0].set(answer_BxA) if return_trajectory else None
  carry = (jnp.int32(0), jnp.int32(0), jnp.int32(0), answer_BxA, cache, jnp.int32(0), trajectory)
  t_end, _, _, answer_BxA, _, full_passes, trajectory = jax.lax.while_loop(
      lambda carry: carry[1] < spec.num_blocks, body, carry)
  return answer_BxA, t_end, full_passes, _hold_final(trajectory, t_end, answer_BxA)


# --- FlowLM -----------------------------------------------------------------------------------


def initial_answer(key, shape, spec: FlowSpec):
  """All [MASK], or uniformly random non-special tokens."""
  if spec.initial_answer == "mask":
    return jnp.full(shape, spec.vocab.mask_id, jnp.int32)
  ids = jnp.asarray(spec.vocab.random_token_ids)
  return ids[jax.random.randint(key, shape, 0, ids.shape[0])]


def flowlm_update(spec: FlowSpec, t, answer_BxA, pred_BxA, conf_BxA, prob_of, fill_count_B):
  """(positions to overwrite with the prediction [B, A], row has candidates [B]) for one step."""
  is_mask = answer_BxA == spec.vocab.mask_id
  B = answer_BxA.shape[0]
  max_rep_B = jnp.full((B,), spec.max_replacements, jnp.int32)
  if spec.strategy == "below_threshold":
    # A [MASK] counts as not confident: always a candidate and rewritten before any real token (most
    # confident [MASK] first, LLaDA's order); the slots left go to real tokens, lowest confidence first.
    below = ~is_mask & (conf_BxA < spec.threshold)
    fill = select_top_k(conf_BxA, is_mask, max_rep_B)
    left_B = max_rep_B - jnp.sum(fill, axis=-1, dtype=jnp.int32)
    update = fill | select_top_k(-conf_BxA, below, left_B)
    candidate = is_mask | below
  elif spec.strategy == "most_confident_changes":
    # A [MASK] always differs from its prediction and is a candidate whatever its confidence.
    candidate = is_mask | ((pred_BxA != answer_BxA) & (conf_BxA >= spec.threshold))
    update = select_top_k(conf_BxA, candidate, max_rep_B)
  else:  # fill_then_refine
    fill = select_top_k(conf_BxA, is_mask, transfer_count(fill_count_B, spec.fill_steps, t))
    current_prob_BxA = prob_of(answer_BxA)
    # Only rewrites that change something: a token that is already the prediction stays.
    refinable = ~is_mask & (current_prob_BxA < spec.threshold) & (pred_BxA != answer_BxA)
    update = fill | select_top_k(-current_prob_BxA, refinable, max_rep_B)
    candidate = is_mask | refinable
  update |= parallel_commit(spec, conf_BxA, candidate)  # confidence-aware parallel decoding
  return update, jnp.any(candidate, axis=-1)


@_jit_sampler
def flowlm_sample(graphdef, params, prompt_BxP, length_B, key, *, spec: FlowSpec, padded: bool,
                  return_trajectory: bool = False, initial_BxA=None):
  """(answer [B, A], steps [B], full passes [B], trajectory [max_steps+1, B, A] or None): FlowLM
  any-position decoding.

  steps[b] is the step at which row b was found final (its answer is trajectory[steps[b], b]; it used
  min(steps[b] + 1, max_steps) forward passes, of which `full passes` ran whole rows). Rows beyond the
  loop's end repeat the final answer.
  """
  B, A, vocab = prompt_BxP.shape[0], spec.answer_length, spec.vocab
  init_key, step_key = jax.random.split(key)
  # `initial_BxA`: start from given answers (e.g. partly wrong ones, to measure self-correction).
  answer0_BxA = initial_answer(init_key, (B, A), spec) if initial_BxA is None else initial_BxA.astype(jnp.int32)
  fill_count_B = jnp.sum(answer0_BxA == vocab.mask_id, axis=-1, dtype=jnp.int32)
  model, layers = decoding_model(graphdef, params)
  check_cacheable(model, spec.cache)
  rows = Rows(model, layers, prompt_BxP, length_B, padded)

  def answer_logits(answer_BxA, cache, t):
    """(logits of every answer column, the cache, whether this pass ran whole rows).

    Every answer column is re-predicted at every step, so only the prompt can come from the cache.
    """
    if spec.cache == "none":
      return rows.full(answer_BxA), cache, jnp.bool_(True)
    refresh = t % (spec.cache_refresh or FLOWLM_CACHE_REFRESH) == 0
    logits, cache = jax.lax.cond(refresh, lambda: rows.refresh(answer_BxA, 0, A),
                                 lambda: rows.from_cache(answer_BxA, cache, 0, A, A))
    return logits, cache, refresh

  def body(carry):
    t, answer_BxA, done_B, steps_B, cache, full_B, trajectory = carry
    gumbel_key, _ = _step_keys(step_key, t)
    logits, cache, refresh = answer_logits(answer_BxA, cache, t)
    full_B += refresh & ~done_B
    pred_BxA, conf_BxA, prob_of = predict(logits, spec.temperature, gumbel_key, vocab)
    update_BxA, has_candidates_B = flowlm_update(spec, t, answer_BxA, pred_BxA, conf_BxA, prob_of, fill_count_B)
    # The last allowed step fills whatever [MASK] is left, so no answer ends with one.
    update_BxA |= (t == spec.max_steps - 1) & (answer_BxA == vocab.mask_id)
    new_BxA = jnp.where(update_BxA & ~done_B[:, None], pred_BxA, answer_BxA)
    # Greedy decoding is deterministic: a step that changes nothing would repeat forever.
    unchanged_B = jnp.all(new_BxA == answer_BxA, axis=-1)
    # Only a full pass says a row is final: against the cache's stale prompt "nothing to do" proves nothing, so
    # such a row repeats that step (greedy: the same no-op) until the next periodic refresh checks it. On the
    # schedule, not on demand, so that a row's passes do not depend on what else is in the batch.
    final_B = ~done_B & (~has_candidates_B | (unchanged_B if spec.temperature == 0 else False)) & refresh
    steps_B = jnp.where(final_B, t, steps_B)
    return t + 1, new_BxA, done_B | final_B, steps_B, cache, full_B, _record(trajectory, t + 1, new_BxA)

  def cond(carry):
    t, _, done_B, *_ = carry
    return (t < spec.max_steps) & ~jnp.all(done_B)

  trajectory = None
  if return_trajectory:
    trajectory = jnp.zeros((spec.max_steps + 1, B, A), jnp.int32).at[0].set(answer0_BxA)
  cache = None if spec.cache == "none" else rows.empty_cache(answer0_BxA)
  carry = (jnp.int32(0), answer0_BxA, jnp.zeros((B,), bool), jnp.full((B,), spec.max_steps, jnp.int32), cache,
           jnp.zeros((B,), jnp.int32), trajectory)
  t_end, answer_BxA, _, steps_B, _, full_B, trajectory = jax.lax.while_loop(cond, body, carry)
  return answer_BxA, steps_B, full_B, _hold_final(trajectory, t_end, answer_BxA)


# --- Python API -------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleOutput:
  tokens: np.ndarray      # int32 [B, P + A]: left-padded prompt, then the answer
  answer: np.ndarray      # int32 [B, A]
  steps: np.ndarray       # int32 [B]: LLaDA: the steps made (`steps` unless parallel decoding ended blocks
                          # early); FlowLM: the step each row was found final
  trajectory: np.ndarray | None  # int32 [S + 1, B, A]: the answer after each step (S = steps | max_steps)
  passes: np.ndarray | None = None       # int32 [B]: forward passes each row's answer took
  full_passes: np.ndarray | None = None  # int32 [B]: those that ran whole rows (the rest: cached slices)


def prompt_columns(prompt_ids: list[list[int]], bucket: int = PROMPT_BUCKET) -> int:
  """The prompt width of a batch holding `prompt_ids`: the longest rounded up to a multiple of `bucket` (pass
  it as `generate(prompt_bucket=...)` to give batches of a longer list one shape)."""
  if not prompt_ids:
    raise ValueError("sampling: need at least one prompt")
  return -(-max(len(p) for p in prompt_ids) // bucket) * bucket


def pad_prompts(prompt_ids: list[list[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
  """(prompt [B, P], length [B]): prompts followed by [PAD]s up to P, the longest rounded up to `bucket`."""
  if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
    raise ValueError("sampling: need at least one prompt, and no prompt may be empty")
  P = prompt_columns(prompt_ids, bucket)
  prompt_BxP = np.full((len(prompt_ids), P), pad_id, np.int32)
  for row, ids in enumerate(prompt_ids):
    prompt_BxP[row, :len(ids)] = ids
  return prompt_BxP, np.array([len(p) for p in prompt_ids], np.int32)


def left_padded(prompt_BxP, length_B) -> np.ndarray:
  """The same prompts with their [PAD]s moved in front (the conceptual row layout)."""
  return np.stack([np.roll(row, len(row) - n) for row, n in zip(prompt_BxP, length_B)])


def _to_host(tree):
  """numpy copies of a sampler's outputs on every process. Under a mesh over several processes (the test prompts
  at a pod run's evaluation) an output split over the batch has rows on other hosts: gathered (collectively)."""
  def fetch(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)

  return jax.tree.map(fetch, tree)


def generate(graphdef, params, prompt_ids: list[list[int]], vocab: Vocab, icfg, *, mode: str, key=None,
             return_trajectory: bool = False, prompt_bucket: int = PROMPT_BUCKET, padded: bool | None = None,
             initial_BxA=None) -> SampleOutput:
  """Answers to `prompt_ids` (each ending in [SEP]) decoded the LLaDA or FlowLM way.

  `key` defaults to `jax.random.key(icfg.seed)`. Compiled samplers are cached per (model, spec,
  shapes), so repeated calls with the same config and prompt bucket do not recompile (a bucket as
  long as the longest prompt of several calls gives them all one shape). `padded`: None = whether some
  prompt is shorter than the bucket (rows without [PAD]s skip the attention mask: a second compiled
  program); True = the masked program whatever the prompts, so that calls sharing a bucket share one
  compile (a timed loop, a server); False with a padded prompt is an error. `initial_BxA` (FlowLM only):
  the answers to refine instead of the configured start.
  """
  prompt_BxP, length_B = pad_prompts(prompt_ids, vocab.pad_id, prompt_bucket)
  key = jax.random.key(icfg.seed) if key is None else key
  has_pads = bool(np.any(length_B < prompt_BxP.shape[1]))
  if padded is False and has_pads:
    raise ValueError("sampling: padded=False, but some prompt is shorter than the bucket (its [PAD]s need the mask)")
  padded = has_pads if padded is None else padded
  kwargs = dict(padded=padded, return_trajectory=return_trajectory)
  B = len(prompt_ids)
  if mode == "llada":
    if initial_BxA is not None:
      raise ValueError("sampling: initial answers are a FlowLM start; LLaDA decoding starts from [MASK]")
    spec = LladaSpec.from_config(icfg, vocab)
    answer, steps, full, trajectory = llada_sample(graphdef, params, prompt_BxP, length_B, key, spec=spec, **kwargs)
    answer, steps, full, trajectory = _to_host((answer, steps, full, trajectory))
    steps = passes = np.full((B,), steps, np.int32)
    full = np.full((B,), full, np.int32)
  elif mode == "flowlm":
    spec = FlowSpec.from_config(icfg, vocab)
    if initial_BxA is not None and np.shape(initial_BxA) != (B, spec.answer_length):
      raise ValueError(f"sampling: initial answers of shape {np.shape(initial_BxA)}; the prompts and "
                       f"inference.answer_length need ({B}, {spec.answer_length})")
    answer, steps, full, trajectory = flowlm_sample(graphdef, params, prompt_BxP, length_B, key, spec=spec,
                                                    initial_BxA=initial_BxA, **kwargs)
    answer, steps, full, trajectory = _to_host((answer, steps, full, trajectory))
    passes = np.minimum(steps + 1, spec.max_steps)
  else:
    raise ValueError(f"sampling: unknown mode {mode!r} (llada | flowlm)")
  tokens = np.concatenate([left_padded(prompt_BxP, length_B), answer], axis=1)
  return SampleOutput(tokens=tokens, answer=np.asarray(answer), steps=np.asarray(steps), trajectory=trajectory,
                      passes=np.asarray(passes, np.int32), full_passes=np.asarray(full, np.int32))


def generate_batched(graphdef, params, prompt_ids: list[list[int]], vocab: Vocab, icfg, *, mode: str,
                     batch_size: int, key=None, initial_NxA=None) -> np.ndarray:
  """int32 [N, A]: the answers of `generate` over `prompt_ids` in batches of `batch_size`. Every batch is as
  wide as the longest prompt of all (rounded up to PROMPT_BUCKET) and runs the masked program, so the full
  batches share one compiled sampler, and a smaller last batch one more, whatever their prompts' lengths. One
  long prompt widens every batch (compute, not memory: the batch's peak is the same)."""
  if batch_size < 1:
    raise ValueError(f"sampling: batch_size must be >= 1, got {batch_size}")
  if not prompt_ids:
    return np.zeros((0, icfg.answer_length), np.int32)
  width = prompt_columns(prompt_ids)
  key = jax.random.key(icfg.seed) if key is None else key
  # Each batch draws its own noise (the first the key's, as `generate` would): one key for all would give row r of
  # every batch the same draws, so the same prompt in two batches would get the same sample. A stream of their
  # own: fold_in(key, i) alone is split(key)[i] for small i, which `generate` draws from.
  batches = jax.random.fold_in(key, BATCH_STREAM)
  return np.concatenate([
      generate(graphdef, params, prompt_ids[first:first + batch_size], vocab, icfg, mode=mode,
               key=key if first == 0 else jax.random.fold_in(batches, first), prompt_bucket=width, padded=True,
               initial_BxA=None if initial_NxA is None else initial_NxA[first:first + batch_size]).answer
      for first in range(0, len(prompt_ids), batch_size)])


def decode_answers(tokenizer, vocab: Vocab, answers_NxA, *, chat: bool = False) -> list[str]:
  """Answer token rows as stripped text, each cut where training rows end an answer (`answer_ids`); `chat`: the
  run's rows were chat, so a templated tokenizer's answers end at the template's end-of-turn token."""
  end_id = data.answer_end_id(tokenizer, chat, vocab)
  # Special tokens inside an answer stay in its text ("1 [SEP] 2"): dropped, a stray one let a wrong answer match.
  return [tokenizer.decode(answer_ids(row, vocab, end_id), skip_special_tokens=False).strip()
          for row in np.asarray(answers_NxA)]


def answer_ids(answer_A, vocab: Vocab, end_id: int | None = None) -> list[int]:
  """The answer up to its first [EOS], [PAD] (the training fill) or `end_id` (what training rows write after an
  answer, `data.answer_end_id`: a chat template's end-of-turn token); any other special token in it is kept."""
  ids = []
  for token in np.asarray(answer_A).tolist():
    if token in (vocab.eos_id, vocab.pad_id, end_id):
      break
    ids.append(token)
  return ids


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
  """Ids of a plain-text prompt as training rows hold it; for a chat-trained model, as one user turn."""
  return data.chat_prompt_ids(tokenizer, data.user_turn(prompt)) if chat else data.plain_prompt_ids(tokenizer, prompt)


def generate_texts(graphdef, params, tokenizer, vocab: Vocab, prompts: list[str], icfg, *, mode: str,
                   chat: bool, key=None, batch_size: int | None = None) -> list[str]:
  """Decoded, stripped answers to plain-text prompts (encoded the way training rows were); all in one batch,
  or in batches of `batch_size` (`generate_batched`)."""
  prompt_ids = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
  if batch_size is None:
    answers = generate(graphdef, params, prompt_ids, vocab, icfg, mode=mode, key=key).answer
  else:
    answers = generate_batched(graphdef, params, prompt_ids, vocab, icfg, mode=mode, batch_size=batch_size, key=key)
  return decode_answers(tokenizer, vocab, answers, chat=chat)


def run_config(icfg, **overrides) -> Any:
  """A copy of the inference config with some fields replaced (unknown names are an error)."""
  icfg = icfg.copy_and_resolve_references()
  with icfg.unlocked():
    for name, value in overrides.items():
      if name not in icfg:
        raise KeyError(f"unknown inference option {name!r}")
      icfg[name] = value
  return icfg
