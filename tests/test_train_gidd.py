"""Training with `training.loss_weighting=gidd`: the mixed-noise ELBO as the train step's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowlm_jax import loop, losses, masking, train
from flowlm_jax.models import registry
from helpers import tiny_config


@pytest.fixture(scope="module")
def setup():
  c = tiny_config("flowlm", learning_rate=3e-3)
  c.training.loss_weighting = "gidd"
  return loop.prepare(c)


def test_batch_loss_is_the_mixed_noise_elbo_per_corruptible_token(setup):
  """The step's loss equals sum(w (KL + IS)) / corruptible count, computed from the model's logits under the
  same corruption; chunking the output layer changes nothing."""
  cfg = setup.step_cfg
  graphdef, _ = train.abstract_model(setup.model_cfg)
  params = nnx.to_pure_dict(nnx.state(registry.create(setup.model_cfg, rngs=nnx.Rngs(params=0)), nnx.Param))
  batch = {"tokens": jnp.asarray(setup.train_split.tokens[:4]),
           "corruptible": jnp.asarray(setup.train_split.corruptible[:4])}
  key = jax.random.key(5)
  noise = losses.MixedNoise.from_masking(cfg.masking)

  @jax.jit
  def direct(params, batch, key):
    model = nnx.merge(graphdef, params)
    c = masking.corrupt(key, batch["tokens"], batch["corruptible"], cfg.masking)
    logits = model.logits_from_hidden(model.hidden(c.noisy_tokens))
    per_token = losses.gidd_token_loss(logits, batch["tokens"], c.noisy_tokens, batch["corruptible"], c.t, noise)
    return jnp.sum(per_token) / jnp.sum(batch["corruptible"])

  expected = direct(params, batch, key)
  for chunk in (0, 8):
    step_cfg = train.StepConfig(**{**cfg.__dict__, "loss_chunk_size": chunk})
    loss, sums = jax.jit(lambda p, b, k: train.batch_loss(graphdef, p, b, k, step_cfg))(params, batch, key)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(sums["count/loss"]) == float(jnp.sum(batch["corruptible"]))


@pytest.mark.slow
def test_compiled_step_lowers_the_mixed_noise_loss(setup):
  graphdef, abstract = train.abstract_model(setup.model_cfg)
  tx, _ = train.make_optimizer(setup.config.training, 50, abstract)
  shardings = train.state_shardings(setup.model_cfg, tx, setup.mesh)
  step, evaluate = train.compile_steps(graphdef, tx, setup.step_cfg, shardings, setup.mesh)
  state = train.init_state(setup.model_cfg, tx, 0, shardings)
  batch = {"tokens": jnp.asarray(setup.train_split.tokens[:8]),
           "corruptible": jnp.asarray(setup.train_split.corruptible[:8])}
  key = jax.random.key(7)
  before = float(evaluate(state.params, batch, key)["loss_sum"])
  for _ in range(15):
    state, metrics = step(state, batch)
    assert bool(metrics["finite"])
  assert float(evaluate(state.params, batch, key)["loss_sum"]) < 0.9 * before
