import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flowlm_jax import losses, loop, sharding, train
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


def test_gradient_accumulation_matches_one_big_batch_with_the_same_noise(setup):
  """Accumulating over 2 micro-batches averages their gradients: equal to averaging two separate passes."""
  graphdef, abstract = train.abstract_model(setup.model_cfg)
  state = train.init_state(setup.model_cfg, optax.identity(), 0,
                           train.state_shardings(setup.model_cfg, optax.identity(), setup.mesh))
  batch = first_batch(setup)
  cfg2 = train.StepConfig(**{**setup.step_cfg.__dict__, "grad_accum": 2})
  _, step_key = jax.random.split(state.rng)
  keys = jax.random.split(step_key, 2)
  micro = train.split_micro_batches(batch, 2)
  grad_fn = jax.jit(jax.grad(lambda p, b, k: train.batch_loss(graphdef, p, b, k, cfg2)[0]))  # eager is slow
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *[grad_fn(state.params, jax.tree.map(lambda x: x[i], micro), keys[i])
                                                        for i in range(2)])
  sgd = optax.sgd(1.0)
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=sgd, cfg=cfg2))
  new_state, _ = step(train.TrainState(state.params, sgd.init(state.params), state.step, state.rng,
                                       state.nonfinite_count, state.last_nonfinite_step), batch)
  for name in ("wq", "embed", "w_down"):
    np.testing.assert_allclose(state.params[name] - new_state.params[name], expected[name], rtol=1e-4, atol=1e-7)


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
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, first_batch(setup))
  assert not bool(metrics["finite"])
  assert int(state.nonfinite_count) == 1 and int(state.last_nonfinite_step) == 1 and int(state.step) == 1
  for name, value in before.items():
    np.testing.assert_array_equal(np.asarray(state.params[name]), value)


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
