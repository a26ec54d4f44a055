"""Masked-diffusion decoding as whole compiled loops: LLaDA and FlowLM any-position refinement.

A row is conceptually [left-padded prompt (ending in [SEP]) | answer of `answer_length`], with RoPE
positions counted from the first real prompt token, so a row computes what it would alone. The model
is fed the same tokens and positions in the order [answer | prompt | [PAD]s]: a bidirectional
transformer with explicit positions does not care where a token sits in the array, and this order
makes the padding trailing, which `kv_lengths` expresses (cuDNN's fast padded kernel on GPU, no
[B, T] key mask), with the answer in the same columns of every row.

- LLaDA (Nie et al. 2025, "Large Language Diffusion Models", Alg. 4 random / Alg. 5 low-confidence
  remasking, with semi-autoregressive blocks): the answer starts all [MASK]; each step predicts every
  masked position and commits the most confident ones of the current block; committed tokens are final.
- FlowLM: each step re-predicts every answer position and rewrites a few of them according to
  `replacement_strategy`; a row stops on its own (docs/sampling.md has the exact rules).

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
from flax import nnx

from flowlm_jax import data, sharding
from flowlm_jax.models.layers import unstack
from flowlm_jax.vocab import Vocab

NEG_INF = float(np.finfo(np.float32).min)  # what the model puts on padded vocabulary rows
PROMPT_BUCKET = 8  # prompts are padded to a multiple of this: fewer shapes, fewer compiles
STRATEGIES = ("below_threshold", "most_confident_changes", "fill_then_refine")
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

  def __post_init__(self):
    _check(self.answer_length > 0 and self.steps > 0, "answer_length and steps must be > 0")
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
               remasking=icfg.remasking, cfg_scale=float(icfg.cfg_scale), vocab=vocab)


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

  def __post_init__(self):
    _check(self.answer_length > 0 and self.max_steps > 0 and self.fill_steps > 0,
           "answer_length, max_steps and steps must be > 0")
    _check(self.max_replacements > 0, "max_replacements must be > 0")
    _check(self.strategy in STRATEGIES, f"unknown replacement_strategy {self.strategy!r}")
    _check(self.initial_answer in ("mask", "random"), f"unknown initial_answer {self.initial_answer!r}")

  @classmethod
  def from_config(cls, icfg, vocab: Vocab) -> "FlowSpec":
    return cls(answer_length=int(icfg.answer_length), max_steps=int(icfg.max_steps),
               fill_steps=min(int(icfg.steps), int(icfg.max_steps)), threshold=float(icfg.confidence_threshold),
               max_replacements=int(icfg.max_replacements), strategy=icfg.replacement_strategy,
               temperature=float(icfg.temperature), initial_answer=icfg.initial_answer, vocab=vocab)


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


def decoding_model(graphdef, params):
  """(model, its layers unstacked) prepared once, before a decoding loop.

  The forward pass casts each weight where it uses it, and a layer scan slices each layer out of the
  stacked weights; inside a loop both would run again, copying every weight at every step (XLA does not
  hoist them). So the samplers cast to the compute dtype (except what the model reads in float32) and
  unstack the layers once: the same casts the forward pass makes, done earlier.
  """
  model = nnx.merge(graphdef, params)
  dtype, keep = jnp.dtype(model.cfg.compute_dtype), model.FLOAT32_PARAMS

  def cast(path, w):
    floating = jnp.issubdtype(w.dtype, jnp.floating)
    return w.astype(dtype) if floating and path[0].key not in keep else w

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, params))
  return model, unstack(model.layer_inputs())


def answer_logits(model, layers, prompt_BxP, length_B, answer_BxA, padded: bool, first=0,
                  count: int | None = None):
  """float32 logits [B, count, V] of answer columns first..first+count (default: all) for prompts [B, P]
  of `length_B` real tokens, then [PAD]s.

  The row is fed as [answer | prompt | pads] with the positions of [prompt | answer] (module doc). Only
  the requested columns go through the vocabulary projection: the prompt never does, and LLaDA's
  semi-autoregressive blocks need only the current block.
  """
  (B, P), A = prompt_BxP.shape, answer_BxA.shape[1]
  tokens_BxT = jnp.concatenate([answer_BxA, prompt_BxP], axis=1)
  positions_BxT = jnp.concatenate([length_B[:, None] + jnp.arange(A, dtype=jnp.int32),
                                   jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))], axis=1)
  kv_lengths_B = A + length_B if padded else None  # no padding: no mask at all
  hidden = model.hidden(tokens_BxT, positions_BxT=positions_BxT, kv_lengths_B=kv_lengths_B, layers=layers)
  return model.logits_from_hidden(jax.lax.dynamic_slice_in_dim(hidden, first, count or A, axis=1))


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


def _step_keys(step_key, t):
  return jax.random.split(jax.random.fold_in(step_key, t))


# --- LLaDA ------------------------------------------------------------------------------------


@_jit_sampler
def llada_sample(graphdef, params, prompt_BxP, length_B, key, *, spec: LladaSpec, padded: bool,
                 return_trajectory: bool = False):
  """(answer [B, A], trajectory [steps+1, B, A] or None): LLaDA low-confidence / random remasking."""
  B, A, vocab = prompt_BxP.shape[0], spec.answer_length, spec.vocab
  steps_per_block = spec.steps // spec.num_blocks
  model, layers = decoding_model(graphdef, params)
  _, step_key = jax.random.split(key)
  # Classifier-free guidance: the unconditional row sees the prompt as [MASK] (padding stays padding).
  uncond_BxP = jnp.where(jnp.arange(prompt_BxP.shape[1]) < length_B[:, None], vocab.mask_id, prompt_BxP)

  def logits_of(answer_BxA, first):
    """Logits of the current block's columns only (the others are not eligible this step)."""
    logits = functools.partial(answer_logits, model, layers, first=first, count=spec.block_length,
                               padded=padded)
    if spec.cfg_scale <= 0:
      return logits(prompt_BxP, length_B, answer_BxA)
    both = logits(jnp.concatenate([prompt_BxP, uncond_BxP]), jnp.concatenate([length_B, length_B]),
                  jnp.concatenate([answer_BxA, answer_BxA]))
    cond, uncond = both[:B], both[B:]
    return uncond + (spec.cfg_scale + 1) * (cond - uncond)

  def step(t, carry):
    answer_BxA, trajectory = carry
    gumbel_key, conf_key = _step_keys(step_key, t)
    first = (t // steps_per_block) * spec.block_length
    block_BxL = jax.lax.dynamic_slice_in_dim(answer_BxA, first, spec.block_length, axis=1)
    pred_BxL, conf_BxL, _ = predict(logits_of(answer_BxA, first), spec.temperature, gumbel_key, vocab)
    if spec.remasking == "random":
      conf_BxL = jax.lax.dynamic_slice_in_dim(jax.random.uniform(conf_key, (B, A)), first, spec.block_length, 1)
    # Only the current block's [MASK]s are eligible; every block starts all-[MASK].
    k_B = transfer_count(jnp.full((B,), spec.block_length), steps_per_block, t % steps_per_block)
    commit_BxL = select_top_k(conf_BxL, block_BxL == vocab.mask_id, k_B)
    block_BxL = jnp.where(commit_BxL, pred_BxL, block_BxL)
    answer_BxA = jax.lax.dynamic_update_slice_in_dim(answer_BxA, block_BxL, first, axis=1)
    return answer_BxA, _record(trajectory, t + 1, answer_BxA)

  answer_BxA = jnp.full((B, A), vocab.mask_id, jnp.int32)
  trajectory = jnp.zeros((spec.steps + 1, B, A), jnp.int32).at[0].set(answer_BxA) if return_trajectory else None
  return jax.lax.fori_loop(0, spec.steps, step, (answer_BxA, trajectory))


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
  return update, jnp.any(candidate, axis=-1)


@_jit_sampler
def flowlm_sample(graphdef, params, prompt_BxP, length_B, key, *, spec: FlowSpec, padded: bool,
                  return_trajectory: bool = False):
  """(answer [B, A], steps [B], trajectory [max_steps+1, B, A] or None): FlowLM any-position decoding.

  steps[b] is the step at which row b was found final (its answer is trajectory[steps[b], b]; it used
  min(steps[b] + 1, max_steps) forward passes). Rows beyond the loop's end repeat the final answer.
  """
  B, A, vocab = prompt_BxP.shape[0], spec.answer_length, spec.vocab
  init_key, step_key = jax.random.split(key)
  answer0_BxA = initial_answer(init_key, (B, A), spec)
  fill_count_B = jnp.sum(answer0_BxA == vocab.mask_id, axis=-1, dtype=jnp.int32)
  model, layers = decoding_model(graphdef, params)

  def body(carry):
    t, answer_BxA, done_B, steps_B, trajectory = carry
    gumbel_key, _ = _step_keys(step_key, t)
    logits = answer_logits(model, layers, prompt_BxP, length_B, answer_BxA, padded)
    pred_BxA, conf_BxA, prob_of = predict(logits, spec.temperature, gumbel_key, vocab)
    update_BxA, has_candidates_B = flowlm_update(spec, t, answer_BxA, pred_BxA, conf_BxA, prob_of, fill_count_B)
    # The last allowed step fills whatever [MASK] is left, so no answer ends with one.
    update_BxA |= (t == spec.max_steps - 1) & (answer_BxA == vocab.mask_id)
    new_BxA = jnp.where(update_BxA & ~done_B[:, None], pred_BxA, answer_BxA)
    # Greedy decoding is deterministic: a step that changes nothing would repeat forever.
    unchanged_B = jnp.all(new_BxA == answer_BxA, axis=-1)
    stop_B = ~done_B & (~has_candidates_B | (unchanged_B if spec.temperature == 0 else False))
    steps_B = jnp.where(stop_B, t, steps_B)
    return t + 1, new_BxA, done_B | stop_B, steps_B, _record(trajectory, t + 1, new_BxA)

  def cond(carry):
    t, _, done_B, _, _ = carry
    return (t < spec.max_steps) & ~jnp.all(done_B)

  trajectory = None
  if return_trajectory:
    trajectory = jnp.zeros((spec.max_steps + 1, B, A), jnp.int32).at[0].set(answer0_BxA)
  carry = (jnp.int32(0), answer0_BxA, jnp.zeros((B,), bool), jnp.full((B,), spec.max_steps, jnp.int32),
           trajectory)
  t_end, answer_BxA, _, steps_B, trajectory = jax.lax.while_loop(cond, body, carry)
  if return_trajectory:  # rows the loop never reached hold the final answer
    unreached = jnp.arange(spec.max_steps + 1)[:, None, None] > t_end
    trajectory = jnp.where(unreached, answer_BxA[None], trajectory)
  return answer_BxA, steps_B, trajectory


# --- Python API -------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleOutput:
  tokens: np.ndarray      # int32 [B, P + A]: left-padded prompt, then the answer
  answer: np.ndarray      # int32 [B, A]
  steps: np.ndarray       # int32 [B]: LLaDA: `steps`; FlowLM: the step each row was found final
  trajectory: np.ndarray | None  # int32 [S + 1, B, A]: the answer after each step (S = steps | max_steps)


def pad_prompts(prompt_ids: list[list[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
  """(prompt [B, P], length [B]): prompts followed by [PAD]s up to P, the longest rounded up to `bucket`."""
  if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
    raise ValueError("sampling: need at least one prompt, and no prompt may be empty")
  P = -(-max(len(p) for p in prompt_ids) // bucket) * bucket
  prompt_BxP = np.full((len(prompt_ids), P), pad_id, np.int32)
  for row, ids in enumerate(prompt_ids):
    prompt_BxP[row, :len(ids)] = ids
  return prompt_BxP, np.array([len(p) for p in prompt_ids], np.int32)


def left_padded(prompt_BxP, length_B) -> np.ndarray:
  """The same prompts with their [PAD]s moved in front (the conceptual row layout)."""
  return np.stack([np.roll(row, len(row) - n) for row, n in zip(prompt_BxP, length_B)])


def generate(graphdef, params, prompt_ids: list[list[int]], vocab: Vocab, icfg, *, mode: str, key=None,
             return_trajectory: bool = False) -> SampleOutput:
  """Answers to `prompt_ids` (each ending in [SEP]) decoded the LLaDA or FlowLM way.

  `key` defaults to `jax.random.key(icfg.seed)`. Compiled samplers are cached per (model, spec,
  shapes), so repeated calls with the same config and prompt bucket do not recompile.
  """
  prompt_BxP, length_B = pad_prompts(prompt_ids, vocab.pad_id)
  key = jax.random.key(icfg.seed) if key is None else key
  kwargs = dict(padded=bool(np.any(length_B < prompt_BxP.shape[1])), return_trajectory=return_trajectory)
  if mode == "llada":
    spec = LladaSpec.from_config(icfg, vocab)
    answer, trajectory = llada_sample(graphdef, params, prompt_BxP, length_B, key, spec=spec, **kwargs)
    steps = np.full((len(prompt_ids),), spec.steps, np.int32)
  elif mode == "flowlm":
    spec = FlowSpec.from_config(icfg, vocab)
    answer, steps, trajectory = flowlm_sample(graphdef, params, prompt_BxP, length_B, key, spec=spec, **kwargs)
  else:
    raise ValueError(f"sampling: unknown mode {mode!r} (llada | flowlm)")
  answer, steps, trajectory = jax.device_get((answer, steps, trajectory))
  tokens = np.concatenate([left_padded(prompt_BxP, length_B), answer], axis=1)
  return SampleOutput(tokens=tokens, answer=np.asarray(answer),
                      steps=np.asarray(steps), trajectory=trajectory)


def answer_ids(answer_A, vocab: Vocab) -> list[int]:
  """The answer up to its first [EOS] or [PAD] (the training fill), without special tokens."""
  ids = []
  for token in np.asarray(answer_A).tolist():
    if token in (vocab.eos_id, vocab.pad_id):
      break
    if token not in vocab.special_ids:
      ids.append(token)
  return ids


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
  """Ids of a plain-text prompt as training rows hold it; for a chat-trained model, as one user turn."""
  return data.chat_prompt_ids(tokenizer, data.as_user_turn(prompt) if chat else prompt, chat)


def generate_texts(graphdef, params, tokenizer, vocab: Vocab, prompts: list[str], icfg, *, mode: str,
                   chat: bool, key=None) -> list[str]:
  """Decoded, stripped answers to plain-text prompts (encoded the way training rows were)."""
  prompt_ids = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
  out = generate(graphdef, params, prompt_ids, vocab, icfg, mode=mode, key=key)
  return [tokenizer.decode(answer_ids(row, vocab), skip_special_tokens=True).strip() for row in out.answer]


def run_config(icfg, **overrides) -> Any:
  """A copy of the inference config with some fields replaced (unknown names are an error)."""
  icfg = icfg.copy_and_resolve_references()
  with icfg.unlocked():
    for name, value in overrides.items():
      if name not in icfg:
        raise KeyError(f"unknown inference option {name!r}")
      icfg[name] = value
  return icfg
