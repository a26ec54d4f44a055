"""Train state, optimiser, and the compiled train and eval steps.

Everything here is a pure function of its inputs; `loop.py` drives it. The train step is one `jax.jit`
with explicit in/out shardings and the state donated: corruption (masking.py), forward, loss
(losses.py), gradient accumulation over micro-batches, a skip of non-finite updates, and AdamW.
With model.matmul_dtype "fp8" the state also carries the FP8 scaling state (`TrainState.fp8`,
models/fp8.py), updated by each step from its own absolute maxima and never by the optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flowlm_jax import losses, masking, sharding
from flowlm_jax.models import llama, registry
from flowlm_jax.models.fp8 import combine_micro_batches, uncalibrated
from flowlm_jax.models.llama import ModelConfig

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: Params
  opt_state: Any
  step: jax.Array             # int32: optimiser steps taken (skipped ones included)
  rng: jax.Array              # uint32[2] raw key data: corruption noise of the next step
  nonfinite_count: jax.Array  # int32: updates skipped for a NaN/inf loss or gradient
  last_nonfinite_step: jax.Array  # int32: the step of the latest such skip (-1 = none)
  # FP8 scaling state, {activations|weights|gradients: {name: {scale, amax_history}}} per layer (models/fp8.py);
  # None (no leaves, not saved) unless model.matmul_dtype is "fp8". Not a parameter: no optimiser touches it.
  fp8: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static facts a step closes over."""
  model: ModelConfig
  masking: masking.MaskingSpec
  loss: str
  loss_weighting: str
  grad_accum: int
  loss_chunk_size: int
  pad_id: int


# --- optimiser --------------------------------------------------------------------------------


def learning_rate_schedule(tcfg, total_steps: int) -> optax.Schedule:
  warmup = tcfg.warmup_steps or int(round(tcfg.warmup_ratio * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  peak, floor = tcfg.learning_rate, tcfg.learning_rate * tcfg.min_learning_rate_ratio
  decay_steps = max(total_steps - warmup, 1)
  if tcfg.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=tcfg.min_learning_rate_ratio)
  elif tcfg.lr_schedule == "linear":
    after = optax.linear_schedule(peak, floor, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(model_state) -> Params:
  """Weight decay only on matrices: never on norms, biases or the input embedding."""
  def decays(var):
    axes = var.get_metadata().get("logical_axes") or ()
    is_embedding = tuple(axes) == ("vocab", "embed")
    return not (is_embedding or "norm" in axes or "bias" in axes or var.get_value().ndim < 2)

  return nnx.to_pure_dict(jax.tree.map(decays, model_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def applied_updates(opt_state):
  """How many updates the optimiser has applied: its schedule's count. A skipped step (non-finite, or FP8's first)
  keeps the whole optimiser state, so this lags the train state's step by the skipped steps."""
  counts = [value for path, value in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
            if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"]
  if len(counts) != 1:
    raise ValueError(f"the optimiser state holds {len(counts)} schedule counts, expected one")
  return counts[0]


def make_optimizer(tcfg, total_steps: int, model_state) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(tcfg, total_steps)
  parts = [optax.clip_by_global_norm(tcfg.gradient_clip_val)] if tcfg.gradient_clip_val > 0 else []
  parts.append(optax.adamw(schedule, b1=tcfg.adam_beta1, b2=tcfg.adam_beta2, eps=tcfg.adam_eps,
                           weight_decay=tcfg.weight_decay, mask=decay_mask(model_state)))
  return optax.chain(*parts), schedule


# --- state ------------------------------------------------------------------------------------


def abstract_model(model_cfg: ModelConfig):
  """(graphdef, abstract nnx.State) without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: registry.create(model_cfg, rngs=nnx.Rngs(params=0))))


def state_shardings(model_cfg: ModelConfig, tx, mesh) -> TrainState:
  _, abstract_state = abstract_model(model_cfg)
  params_sh = sharding.param_shardings(abstract_state, mesh)
  opt_sh = sharding.like_params(jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_state)), params_sh, mesh)
  rep = sharding.replicated(mesh)
  return TrainState(params=params_sh, opt_state=opt_sh, step=rep, rng=rep, nonfinite_count=rep,
                    last_nonfinite_step=rep, fp8=jax.tree.map(lambda _: rep, initial_fp8_meta(model_cfg)))


def initial_fp8_meta(model_cfg) -> dict | None:
  """The FP8 scaling state a run starts from (small: kept whole on every device); None without FP8."""
  if getattr(model_cfg, "matmul_dtype", "bfloat16") != "fp8":  # other families validate to bfloat16
    return None
  return llama.initial_fp8_meta(model_cfg)


def init_state(model_cfg: ModelConfig, tx, seed: int, shardings: TrainState,
               params: Params | None = None) -> TrainState:
  """Parameters are created directly in their shards (one jit), so no device ever holds them whole.

  `params` (a pure dict, e.g. training.init_from's weights) replaces the random initialisation and is consumed
  (donated); without it a config with pretrained weights (`model.pretrained`) loads them, except while traced
  for shapes (jax.eval_shape). Loaded weights go straight into their shards (HF LLaDA/Dream directories are
  streamed one tensor at a time) and are donated to the state, so no second copy of them is made.
  """
  loaded = params is None and bool(getattr(model_cfg, "pretrained", "")) and not _tracing()
  if loaded:
    params = registry.pretrained_params(model_cfg, shardings.params)
  if params is not None:
    params = jax.device_put(params, shardings.params)

  def init(params):
    if params is None:
      model = registry.create(model_cfg, rngs=nnx.Rngs(params=seed))
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(
        params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed + 1), nonfinite_count=jnp.zeros((), jnp.int32),
        last_nonfinite_step=jnp.full((), -1, jnp.int32), fp8=initial_fp8_meta(model_cfg))

  return jax.jit(init, out_shardings=shardings, donate_argnums=0 if params is not None else ())(params)


def _tracing() -> bool:
  """True inside a trace (eval_shape, jit): reading weights from disk there would only be thrown away."""
  return isinstance(jnp.zeros(()), jax.core.Tracer)


# --- loss -------------------------------------------------------------------------------------


def own_normaliser(batch, key, cfg: StepConfig) -> jax.Array:
  """The count a batch's loss sum is divided by (losses.loss_normaliser) under the corruption `key` draws:
  corruptible positions for the likelihood bounds, corrupted ones for FlowLM's plain weighting."""
  c = masking.corrupt(key, batch["tokens"], batch["corruptible"], cfg.masking)
  return losses.loss_normaliser(losses.weighting_of(cfg.loss, cfg.loss_weighting), c.corrupted, batch["corruptible"])


def batch_loss(graphdef, params: Params, batch, key, cfg: StepConfig, fp8_meta=None, normaliser=None):
  """(loss, metric sums) of one (micro-)batch under fresh corruption drawn from `key`.

  The loss is the weighted NLL sum over `normaliser` (default: the batch's own, `own_normaliser`); a micro-batch
  gets the whole step's, so that the summed micro-batch losses are the whole batch's per-token mean.
  Training rows are right-padded, so key padding is passed as lengths (cuDNN's fast padded kernel).
  With `loss_chunk_size` the cross-entropy is fused and chunked (losses.fused_weighted_cross_entropy).
  With `fp8_meta` the layers' projections run in FP8, and the "gradient" of `fp8_meta` is its next value.
  """
  tokens, corruptible = batch["tokens"], batch["corruptible"]
  c = masking.corrupt(key, tokens, corruptible, cfg.masking)
  weighting = losses.weighting_of(cfg.loss, cfg.loss_weighting)
  own = losses.loss_normaliser(weighting, c.corrupted, corruptible)  # == own_normaliser(batch, key, cfg)
  denominator = jnp.maximum(own if normaliser is None else normaliser, 1.0)
  if weighting != losses.GIDD:
    weight = losses.loss_weights(cfg.loss, cfg.loss_weighting, c.corrupted, c.t, corruptible, denominator)
  model = nnx.merge(graphdef, params)
  kv_lengths_B = jnp.sum(c.noisy_tokens != cfg.pad_id, axis=-1, dtype=jnp.int32)
  fp8_args = {} if fp8_meta is None else {"fp8_meta": fp8_meta}
  hidden = model.hidden(c.noisy_tokens, kv_lengths_B=kv_lengths_B, **fp8_args)
  bias = model.output_bias() if hasattr(model, "output_bias") else None  # ModernBERT's decoder bias
  if weighting == losses.GIDD:  # the mixed-noise ELBO needs the whole predicted distribution, not one NLL
    total, nll, correct = losses.fused_gidd_loss(
        hidden, model.output_matrix(), tokens, c.noisy_tokens, corruptible, c.t,
        losses.MixedNoise.from_masking(cfg.masking), cfg.model.num_real_tokens, cfg.loss_chunk_size, bias)
    loss = total / denominator
  elif cfg.loss_chunk_size:
    loss, nll, correct = losses.fused_weighted_cross_entropy(
        hidden, model.output_matrix(), tokens, weight, cfg.model.num_real_tokens, cfg.loss_chunk_size, bias)
  else:
    nll, correct = losses.token_nll_and_correct(model.logits_from_hidden(hidden), tokens)
    loss = losses.weighted_nll_sum(nll, weight)
  sums = losses.masking_metric_sums(correct, c.kind, c.corrupted, c.t)
  # Plain cross-entropy per corrupted token: comparable across methods and with the unigram entropy.
  sums["nll/corrupted"] = jnp.sum(jnp.where(c.corrupted, jax.lax.stop_gradient(nll), 0.0))
  sums["count/corruptible"] = jnp.sum(corruptible, dtype=jnp.float32)
  sums["count/loss"] = jnp.maximum(own, 1.0)
  return loss, sums


def split_micro_batches(batch, n: int):
  """[B, ...] -> [n, B/n, ...] with row r in micro-batch r % n: each device keeps its own rows."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


# --- steps ------------------------------------------------------------------------------------


CLEAN_PREFIX_STREAM = 0x636C6E70  # fold_in data for the clean-prefix draw ("clnp"): far from split indices


def training_rows(batch, key, cfg: StepConfig):
  """The rows as training sees them: with `clean_prefix_prob`, some keep a clean answer start (evaluation scores
  the whole answer)."""
  if cfg.masking.clean_prefix_prob <= 0:
    return batch
  # A stream of its own: with partitionable threefry fold_in(key, i) is split(key, n)[i] for small i, which
  # `corrupt` draws from. Off, the noise stream is what it always was.
  prefix_key = jax.random.fold_in(key, CLEAN_PREFIX_STREAM)
  return {**batch, "corruptible": masking.keep_clean_prefix(prefix_key, batch["corruptible"], cfg.masking)}


def train_step(state: TrainState, batch, *, graphdef, tx, cfg: StepConfig):
  """One optimiser step: the gradient of the whole batch's per-token loss, summed over micro-batches that each
  divide by the whole batch's normaliser (a mean of per-micro-batch means would weight the tokens of a
  micro-batch with fewer corrupted or answer tokens more). Every micro-batch quantizes with the step's incoming
  FP8 scaling state (if any); the new state keeps the largest absolute maxima over the micro-batches
  (fp8.combine_micro_batches)."""
  rng, step_key = jax.random.split(state.rng)
  keys = jax.random.split(step_key, cfg.grad_accum)
  micro = jax.vmap(functools.partial(training_rows, cfg=cfg))(split_micro_batches(batch, cfg.grad_accum), keys)
  # Corruption is a pure function of (key, rows): this draws what each micro-batch's loss will draw again.
  normaliser = jnp.sum(jax.vmap(functools.partial(own_normaliser, cfg=cfg))(micro, keys))

  def loss_of(trained, mb, key):
    params, fp8_meta = trained
    return batch_loss(graphdef, params, mb, key, cfg, fp8_meta, normaliser)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def micro_step(mb, key):
    (loss, sums), (grads, fp8_meta) = grad_fn((state.params, state.fp8), mb, key)
    return (grads, loss, sums), fp8_meta

  def accumulate(carry, xs):
    (summed, fp8_meta), (new, new_fp8_meta) = carry, micro_step(*xs)
    return (jax.tree.map(jnp.add, summed, new), combine_micro_batches(fp8_meta, new_fp8_meta)), None

  carry = micro_step(jax.tree.map(lambda x: x[0], micro), keys[0])
  if cfg.grad_accum > 1:
    carry, _ = jax.lax.scan(accumulate, carry, (jax.tree.map(lambda x: x[1:], micro), keys[1:]))
  (grads, loss, sums), new_fp8_meta = carry
  grad_norm = optax.tree.norm(grads)

  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  # A NaN/inf loss, gradient or update (an optimiser can make one from finite gradients) leaves params, optimiser
  # and FP8 scaling state untouched, so checkpoints stay good (an inf in an amax history would pin that scale for
  # AMAX_HISTORY steps).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(updates)
  # A fresh FP8 state (scale 1) flushes most of the step's gradients to zero in e5m2: that step only fills the
  # amax histories; params and optimiser state wait for scales that fit.
  applied = finite if state.fp8 is None else finite & ~uncalibrated(state.fp8)
  keep = lambda ok, new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = TrainState(
      params=keep(applied, new_params, state.params), opt_state=keep(applied, new_opt_state, state.opt_state),
      step=state.step + 1, rng=rng,
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
      last_nonfinite_step=jnp.where(finite, state.last_nonfinite_step, state.step + 1),
      fp8=keep(finite, new_fp8_meta, state.fp8))
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **sums}
  return new_state, metrics


def _all_finite(tree) -> jax.Array:
  """Whether every element is finite (elementwise: a norm of huge but finite values would overflow)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def eval_step(params: Params, batch, key, *, graphdef, cfg: StepConfig):
  """Metric sums of one validation batch. `loss_sum` / `count/loss`, each summed over batches, is the loss
  per token: per corruptible token for the likelihood bounds (LLaDA's 1/t, `inverse_t`, `gidd`), per corrupted
  token for FlowLM's plain weighting (`none`)."""
  loss, sums = batch_loss(graphdef, params, batch, key, cfg)
  sums["loss_sum"] = loss * sums["count/loss"]
  return sums


def compile_steps(graphdef, tx, cfg: StepConfig, shardings: TrainState, mesh):
  """The jitted train and eval steps with explicit shardings; the train state is donated.

  Both are traced on `mesh`, so the model's activation constraints (sharding.attention_spec) apply.
  """
  batch_sh = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train = jax.jit(sharding.traced_on(mesh, functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg)),
                  in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep), donate_argnums=0)
  evaluate = jax.jit(sharding.traced_on(mesh, functools.partial(eval_step, graphdef=graphdef, cfg=cfg)),
                     in_shardings=(shardings.params, batch_sh, rep), out_shardings=rep)
  return train, evaluate
