import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from flowlm_jax import data, losses, loop, masking, sharding, train
from helpers import tiny_config


@pytest.fixture(scope="module")
def setup():
  return loop.prepare(tiny_config("llada", learning_rate=3e-3))


def build(setup, **step_overrides):
  graphdef, abstract = train.abstract_model(setup.model_cfg)
  tx, schedule = train.make_optimizer(setup.config.training, 50, abstract)
  shardings = train.state_shardings(setup.model_cfg, tx, setup.mesh)
  cfg = setup.step_cfg if not step_overrides else train.StepConfig(**{**setup.step_cfg.__dict__, **step_overrides})
  step, evaluate = train.compile_steps(graphdef, tx, cfg, shardings, setup.mesh)
  state = train.init_state(setup.model_cfg, tx, 0, shardings)
  return graphdef, tx, schedule, step, evaluate, state


def first_batch(setup):
  return jax.tree.map(jnp.asarray, {"tokens": setup.train_split.tokens[:8], "corruptible": setup.train_split.corruptible[:8]})


def test_compiled_step_lowers_the_loss_on_a_fixed_batch(setup):
  graphdef, _, _, step, evaluate, state = build(setup)
  batch = first_batch(setup)
  key = jax.random.PRNGKey(7)
  before = evaluate(state.params, batch, key)
  for _ in range(15):
    state, metrics = step(state, batch)
  after = evaluate(state.params, batch, key)
  assert int(state.step) == 15
  assert float(after["loss_sum"]) < 0.9 * float(before["loss_sum"])


@pytest.mark.parametrize("loss, weighting", [("llada", "inverse_t"), ("flowlm", "none")])
@pytest.mark.parametrize("answer_lengths", [(16,) * 8, (16, 2) * 4], ids=["equal", "unequal"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch_per_token_loss(setup, loss, weighting,
                                                                                   answer_lengths):
  """With a corruption that draws nothing (every corruptible position [MASK], t = 1), accumulating 2 micro-batches
  must give the gradient of the whole batch's mean NLL per corruptible (= corrupted) token, computed here directly
  from the model's logits, also when the micro-batches hold different token counts (rows r % 2: 16 against 2
  tokens), where a mean of the micro-batch means would weight the short rows' tokens 8x."""
  graphdef, _ = train.abstract_model(setup.model_cfg)
  state = train.init_state(setup.model_cfg, optax.identity(), 0,
                           train.state_shardings(setup.model_cfg, optax.identity(), setup.mesh))
  vocab = setup.vocab
  tokens = jax.random.choice(jax.random.PRNGKey(3), jnp.asarray(vocab.random_token_ids), (8, 16)).astype(jnp.int32)
  corruptible = jnp.arange(16)[None, :] >= 16 - jnp.asarray(answer_lengths)[:, None]  # answers end the rows
  batch = {"tokens": tokens, "corruptible": corruptible}
  all_masked = dataclasses.replace(setup.step_cfg.masking, mask_prob=1.0, random_prob=0.0, keep_prob=0.0,
                                   min_ratio=1.0, max_ratio=1.0, eps=0.0)
  cfg = train.StepConfig(**{**setup.step_cfg.__dict__, "grad_accum": 2, "masking": all_masked, "loss": loss,
                            "loss_weighting": weighting})

  def full_batch_loss(params):
    model = nnx.merge(graphdef, params)
    logits = model(jnp.where(corruptible, vocab.mask_id, tokens))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(corruptible, nll, 0.0)) / jnp.sum(corruptible)

  want_loss, expected = jax.jit(jax.value_and_grad(full_batch_loss))(state.params)
  sgd = optax.sgd(1.0)
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=sgd, cfg=cfg))
  new_state, metrics = step(train.TrainState(state.params, sgd.init(state.params), state.step, state.rng,
                                             state.nonfinite_count, state.last_nonfinite_step), batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
  for name in ("wq", "embed", "w_down", "final_norm"):
    np.testing.assert_allclose(state.params[name] - new_state.params[name], expected[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss, weighting", [("llada", "inverse_t"), ("flowlm", "none")])
def test_accumulated_loss_is_the_whole_batch_per_token_mean_under_random_corruption(setup, loss, weighting):
  """With real corruption and clean prefixes, the step's loss is the micro-batches' loss sums over their counts
  summed, each micro-batch drawing its noise as the scan does: the normaliser counted before the scan (vmapped)
  is the one the micro-batches' own draws give."""
  graphdef, _ = train.abstract_model(setup.model_cfg)
  state = train.init_state(setup.model_cfg, optax.identity(), 0,
                           train.state_shardings(setup.model_cfg, optax.identity(), setup.mesh))
  batch = first_batch(setup)
  prefixes = dataclasses.replace(setup.step_cfg.masking, clean_prefix_prob=0.7, clean_prefix_block=2)
  cfg = train.StepConfig(**{**setup.step_cfg.__dict__, "grad_accum": 4, "masking": prefixes, "loss": loss,
                            "loss_weighting": weighting})
  sgd = optax.sgd(0.0)
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=sgd, cfg=cfg))
  _, metrics = step(train.TrainState(state.params, sgd.init(state.params), state.step, state.rng,
                                     state.nonfinite_count, state.last_nonfinite_step), batch)
  keys = jax.random.split(jax.random.split(state.rng)[1], 4)
  micro = train.split_micro_batches(batch, 4)
  loss_sum = count = 0.0
  for k in range(4):
    mb = train.training_rows(jax.tree.map(lambda x: x[k], micro), keys[k], cfg)
    mb_loss, sums = jax.jit(lambda p, b, key: train.batch_loss(graphdef, p, b, key, cfg))(state.params, mb, keys[k])
    loss_sum, count = loss_sum + float(mb_loss) * float(sums["count/loss"]), count + float(sums["count/loss"])
  np.testing.assert_allclose(float(metrics["loss"]), loss_sum / count, rtol=1e-5)


def test_micro_batches_partition_the_batch():
  batch = {"tokens": jnp.arange(12).reshape(6, 2)}
  micro = train.split_micro_batches(batch, 3)["tokens"]
  assert micro.shape == (3, 2, 2)
  np.testing.assert_array_equal(np.sort(np.asarray(micro).reshape(-1)), np.arange(12))
  np.testing.assert_array_equal(micro[1], np.asarray([[2, 3], [8, 9]]))  # rows 1 and 4: r % 3 == 1


def test_nonfinite_update_is_skipped_and_counted(setup):
  _, _, _, step, _, state = build(setup)
  params = dict(state.params)
  params["final_norm"] = params["final_norm"].at[0].set(jnp.nan)
  state = train.TrainState(params, state.opt_state, state.step, state.rng, state.nonfinite_count, state.last_nonfinite_step)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))  # copies: the step donates the state
  state, metrics = step(state, first_batch(setup))
  assert not bool(metrics["finite"])
  assert int(state.nonfinite_count) == 1 and int(state.last_nonfinite_step) == 1 and int(state.step) == 1
  after = (state.params, state.opt_state)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):  # incl. Adam's count, mu, nu
    np.testing.assert_array_equal(np.asarray(got), want)


def test_nonfinite_optimiser_update_from_finite_gradients_is_skipped_and_counted(setup):
  """Adam with eps=0 turns a zero gradient into 0/0: the guard looks at the update too, not only the gradient."""
  graphdef, abstract = train.abstract_model(setup.model_cfg)
  tx, _ = train.make_optimizer(setup.config.training, 50, abstract)
  tx = optax.chain(tx, optax.stateless(lambda updates, params: jax.tree.map(lambda u: u * jnp.nan, updates)))
  shardings = train.state_shardings(setup.model_cfg, tx, setup.mesh)
  step, _ = train.compile_steps(graphdef, tx, setup.step_cfg, shardings, setup.mesh)
  state = train.init_state(setup.model_cfg, tx, 0, shardings)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, first_batch(setup))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"]) and int(state.nonfinite_count) == 1
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("preset", ["flowlm", "llada"])
def test_eval_loss_is_the_per_token_mean_over_the_whole_evaluation(preset):
  """FlowLM: mean NLL per corrupted token; LLaDA: NLL / t summed over corrupted tokens, per corruptible token.
  Computed here from the model's logits over every evaluation batch at once (batches differ in their
  corrupted/corruptible ratio, so a mean of per-batch means would differ)."""
  s = loop.prepare(tiny_config(preset))
  graphdef, abstract = train.abstract_model(s.model_cfg)
  tx, _ = train.make_optimizer(s.config.training, 10, abstract)
  shardings = train.state_shardings(s.model_cfg, tx, s.mesh)
  _, eval_step = train.compile_steps(graphdef, tx, s.step_cfg, shardings, s.mesh)
  params = train.init_state(s.model_cfg, tx, 0, shardings).params
  params["unembed"] = params["unembed"] * 50  # sharp logits: per-token losses (and batch means) vary widely
  row = loop.evaluate(eval_step, params, s, step=0)

  model, key = nnx.merge(graphdef, params), jax.random.PRNGKey(s.config.evaluation.seed)
  numerator = denominator = 0.0
  for i, b in enumerate(data.eval_batches(s.valid_split, s.config.training.batch_size, s.config.evaluation.eval_batches)):
    c = masking.corrupt(jax.random.fold_in(key, i), jnp.asarray(b["tokens"]), jnp.asarray(b["corruptible"]),
                        s.step_cfg.masking)
    logits = model(c.noisy_tokens, kv_lengths_B=jnp.sum(c.noisy_tokens != s.vocab.pad_id, axis=-1))
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), b["tokens"][..., None], axis=-1)[..., 0]
    corrupted, t = np.asarray(c.corrupted), np.asarray(c.t)
    if preset == "flowlm":
      numerator, denominator = numerator + nll[corrupted].sum(), denominator + corrupted.sum()
    else:
      numerator += (nll / t[:, None])[corrupted].sum()
      denominator += b["corruptible"].sum()
  np.testing.assert_allclose(row["eval_loss"], numerator / denominator, rtol=1e-5)


def test_weight_decay_skips_norms_and_the_embedding(setup):
  _, abstract = train.abstract_model(setup.model_cfg)
  mask = train.decay_mask(abstract)
  assert not mask["embed"] and not mask["attn_norm"] and not mask["mlp_norm"] and not mask["final_norm"]
  assert mask["wq"] and mask["w_gate"] and mask["unembed"]


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  c = tiny_config()
  c.training.learning_rate, c.training.warmup_steps, c.training.min_learning_rate_ratio = 1.0, 10, 0.1
  schedule = train.learning_rate_schedule(c.training, 110)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 0.1, rtol=1e-5)


def test_fused_chunked_cross_entropy_equals_full_logits_in_value_and_gradient():
  key = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(key[0], (2, 10, 16))
  w = jax.random.normal(key[1], (16, 40))
  targets = jax.random.randint(key[2], (2, 10), 0, 37)
  weight = jax.random.uniform(key[3], (2, 10)) * (jnp.arange(10) % 3 != 0)  # some positions carry no loss

  def full(h, w):
    logits = jnp.where(jnp.arange(40) < 37, jnp.einsum("bld,dv->blv", h, w), jnp.finfo(jnp.float32).min)
    nll, correct = losses.token_nll_and_correct(logits, targets)
    return losses.weighted_nll_sum(nll, weight), (nll, correct)

  def fused(h, w):
    loss, nll, correct = losses.fused_weighted_cross_entropy(h, w, targets, weight, 37, 4)  # 10 = 4+4+2 (padded)
    return loss, (nll, correct)

  (a, (na, ca)), ga = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, w)
  (b, (nb, cb)), gb = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, w)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(na, nb, rtol=1e-5)
  np.testing.assert_array_equal(ca, cb)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_chunked_loss_config_trains_like_the_full_one(setup):
  _, _, _, step_full, _, state_a = build(setup)
  _, _, _, step_chunk, _, state_b = build(setup, loss_chunk_size=8)
  batch = first_batch(setup)
  for _ in range(2):
    state_a, ma = step_full(state_a, batch)
    state_b, mb = step_chunk(state_b, batch)
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-4)
  np.testing.assert_allclose(state_a.params["wq"], state_b.params["wq"], rtol=1e-4, atol=1e-6)


def test_clean_prefix_rows_train_on_the_rest_of_the_answer_and_evaluation_scores_it_whole(setup):
  """masking.clean_prefix_prob = 1 with prefixes of any length: a training step's rows keep on average half
  their answer clean (count/corruptible ~ (n + 1) / 2n of the whole), while the evaluation step, which scores
  the whole answer, is the same with the option on or off."""
  prefixed = dataclasses.replace(setup.step_cfg.masking, clean_prefix_prob=1.0, clean_prefix_block=1)
  rows = 256  # enough that half the answer tokens is many spreads away from all of them
  batch = jax.tree.map(jnp.asarray, {"tokens": setup.train_split.tokens[:rows],
                                     "corruptible": setup.train_split.corruptible[:rows]})
  whole = float(jnp.sum(batch["corruptible"]))
  _, _, _, step, evaluate, state = build(setup)
  _, _, _, prefix_step, prefix_evaluate, prefix_state = build(setup, masking=prefixed)  # the same initial state
  key = jax.random.PRNGKey(5)
  for name, value in evaluate(state.params, batch, key).items():
    np.testing.assert_allclose(prefix_evaluate(prefix_state.params, batch, key)[name], value, rtol=1e-6)
  _, metrics = step(state, batch)  # (the steps donate their states)
  _, prefix_metrics = prefix_step(prefix_state, batch)
  assert float(metrics["count/corruptible"]) == whole
  n = np.asarray(batch["corruptible"]).sum(1)
  expected = float(np.sum((n + 1) / 2))
  spread = float(np.sqrt(np.sum((n ** 2 - 1) / 12)))  # the sd of the sum of uniform prefix lengths
  assert abs(float(prefix_metrics["count/corruptible"]) - expected) < 5 * spread
