"""Likelihood bounds (likelihood.py): estimators against closed forms, variance reduction, summaries."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowlm_jax import likelihood, losses

V, L, MASK, N = 16, 12, 0, 256
RANDOM_IDS = tuple(range(1, V - 1))  # id V - 1 plays a special token


@functools.lru_cache
def fixed_model_data():
  """A model that predicts the same distribution p everywhere, and N rows that are permutations of one
  sequence, so every row's NLL under the model is the same number: sum_i -log p(x_i)."""
  rng = np.random.default_rng(0)
  log_p = np.concatenate([[-np.inf], np.log(rng.dirichlet(np.full(V - 1, 2.0)))]).astype(np.float32)
  base = rng.integers(1, V, size=L)
  tokens = np.stack([rng.permutation(base) for _ in range(N)]).astype(np.int32)
  return log_p, tokens, float(-log_p[base].sum())


def fixed_logits(log_p):
  return lambda noisy: jnp.broadcast_to(jnp.asarray(np.maximum(log_p, -1e9)), noisy.shape + (V,))


def row_keys(n, seed=0):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def draws_of(logits_fn, tokens, figure="mask", seed=0, **kwargs):
  corruptible = jnp.ones(tokens.shape, bool)
  if figure == "mask":
    fn = functools.partial(likelihood.mask_elbo_draws, logits_fn, mask_id=MASK, **kwargs)
  else:
    noise = losses.MixedNoise(time_scale=1.0, mask_prob=0.3, random_prob=0.7, mask_id=MASK,
                              random_token_ids=RANDOM_IDS)
    fn = functools.partial(likelihood.mixed_noise_elbo_draws, logits_fn, noise=noise, **kwargs)
  return np.asarray(jax.jit(fn)(jnp.asarray(tokens), corruptible, row_keys(len(tokens), seed)))


@pytest.mark.parametrize("figure, options", [
    ("mask", dict(form="time")), ("mask", dict(form="time", steps=8)), ("mask", dict(form="count")),
    ("mixed", {})])
def test_bound_of_a_fixed_distribution_model_is_its_nll_within_the_standard_error(figure, options):
  """For a model that ignores its input every bound is tight in expectation: the forward process started
  from p is reversed exactly, so each bound's expectation is sum_i -log p(x_i) (for [MASK] noise: E[1/t] of a
  position masked at rate t is 1; any T-step grid and the count form keep that)."""
  log_p, tokens, nll = fixed_model_data()
  draws = draws_of(fixed_logits(log_p), tokens, figure, draws=4, **options)
  assert draws.shape == (N, 4)
  bound = likelihood.summarize(draws, np.full(N, L))
  assert bound.nats_per_token_se > 0 and bound.nats_per_token_se < 0.05 * nll / L
  assert abs(bound.nats_per_token - nll / L) < 3 * bound.nats_per_token_se
  assert bound.perplexity == pytest.approx(np.exp(bound.nats_per_token))


@pytest.mark.parametrize("form", likelihood.FORMS)
def test_stratified_draws_lower_the_variance(form):
  """A model whose confidence grows with the visible fraction (so a draw's mean depends on t): over N
  independent replicates of one sequence, the per-sequence estimate varies less with stratified draws."""
  log_p, tokens, _ = fixed_model_data()
  same = np.tile(tokens[0], (N, 1))
  x = jax.nn.one_hot(jnp.asarray(tokens[0]), V)

  def confident_when_visible(noisy):
    visible = jnp.mean(noisy != MASK, axis=-1, keepdims=True)[..., None]
    return 5.0 * visible * x

  variance = {anti: draws_of(confident_when_visible, same, draws=4, antithetic=anti, form=form).mean(1).var()
              for anti in (True, False)}
  assert variance[True] < 0.7 * variance[False]


def test_mixed_corruption_draws_the_marginals_of_the_mixed_process():
  """q_t(z | x) = (1 - s t) [z = x] + s t (p_m [z = MASK] + p_u / R [z random]) at each corruptible position
  (losses.MixedNoise), here with s < 1: a strategy that keeps some chosen tokens runs a slower clock."""
  time_scale = 0.8
  noise = losses.MixedNoise(time_scale=time_scale, mask_prob=0.3, random_prob=0.7, mask_id=MASK,
                            random_token_ids=RANDOM_IDS)
  rows, length = 4, 4096
  t = jnp.asarray([0.1, 0.4, 0.7, 1.0])
  tokens = jnp.full((rows, length), V - 1, jnp.int32)  # a special token: never drawn as noise
  corruptible = jnp.broadcast_to(jnp.arange(length) % 8 != 0, (rows, length))
  z = np.asarray(jax.jit(likelihood.mixed_corruption, static_argnums=4)(row_keys(rows), tokens, corruptible, t, noise))
  ok = np.asarray(corruptible)
  np.testing.assert_array_equal(z[~ok], V - 1)
  z = z[ok].reshape(rows, -1)
  n, tau = z.shape[1], time_scale * np.asarray(t)
  for got, p in ((z == MASK, tau * 0.3), (np.isin(z, RANDOM_IDS), tau * 0.7), (z == V - 1, 1 - tau)):
    assert np.all(np.abs(got.mean(axis=1) - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9)
  drawn = z[np.isin(z, RANDOM_IDS)]
  counts = np.bincount(drawn, minlength=V)[list(RANDOM_IDS)]
  assert counts.min() > 0.8 * drawn.size / len(RANDOM_IDS)


def test_the_last_stratum_stays_below_one_so_its_masking_time_is_positive():
  largest_v = np.float32(1.0) - np.float32(2.0 ** -24)  # within 2^-22 of 1, where the float32 sum rounds up
  u = likelihood.stratified(jnp.arange(4, dtype=jnp.float32), largest_v, 4)
  assert float((3 + largest_v) / np.float32(4)) == 1.0  # what float32 rounds the plain sum to
  t = np.asarray(likelihood.masking_times(u))
  assert np.all(t > 0) and np.all(np.isfinite(1.0 / t)), t


def test_uniform_draws_put_one_draw_in_each_stratum():
  u = np.asarray(likelihood.uniform_draws(row_keys(50), 5, antithetic=True))
  assert u.shape == (50, 5) and np.all((u >= 0) & (u < 1))
  np.testing.assert_array_equal(np.floor(u * 5), np.tile(np.arange(5), (50, 1)))
  iid = np.asarray(likelihood.uniform_draws(row_keys(50), 5, antithetic=False))
  assert np.any(np.floor(np.sort(iid, axis=1) * 5) != np.arange(5))


def test_step_grid_times_are_uniform_over_the_grid():
  t = np.asarray(likelihood.masking_times(jnp.linspace(0, 1, 8000, endpoint=False), steps=4))
  values, counts = np.unique(t, return_counts=True)
  np.testing.assert_allclose(values, [0.25, 0.5, 0.75, 1.0])
  assert np.all(counts == 2000)


def test_count_masks_hold_exactly_l_corruptible_positions_weighted_n_over_l():
  corruptible = jnp.asarray(np.random.default_rng(1).random((64, L)) < 0.6)
  u = jnp.linspace(0, 1, 64, endpoint=False)
  masked, weight = likelihood.masks_of_count(row_keys(64), corruptible, u)
  n = np.asarray(corruptible).sum(1)
  l = np.minimum(1 + np.floor(np.asarray(u) * n), np.maximum(n, 1))
  assert not np.any(np.asarray(masked) & ~np.asarray(corruptible))
  np.testing.assert_array_equal(np.asarray(masked).sum(1), np.where(n > 0, l, 0))
  np.testing.assert_allclose(weight, np.where(n > 0, n / l, 0.0), rtol=1e-6)


def test_summary_is_the_ratio_of_sums_with_a_delta_method_error():
  rng = np.random.default_rng(2)
  draws = rng.exponential(size=(40, 3)) * 10
  tokens, nbytes = rng.integers(5, 15, size=40), rng.integers(10, 30, size=40)
  bound = likelihood.summarize(draws, tokens, nbytes)
  nats = draws.mean(1)
  assert bound.nats_per_token == pytest.approx(nats.sum() / tokens.sum())
  assert bound.bits_per_byte == pytest.approx(nats.sum() / nbytes.sum() / np.log(2))
  # jackknife standard error of the ratio: close to the delta method's for 40 units
  leave_out = [(nats.sum() - nats[i]) / (tokens.sum() - tokens[i]) for i in range(40)]
  jackknife = np.sqrt(39 / 40 * np.sum((np.asarray(leave_out) - np.mean(leave_out)) ** 2))
  assert bound.nats_per_token_se == pytest.approx(jackknife, rel=0.1)
  assert (bound.tokens, bound.bytes, bound.sequences, bound.draws) == (tokens.sum(), nbytes.sum(), 40, 3)


def test_bad_options_fail_with_one_line():
  with pytest.raises(ValueError, match="figure"):
    likelihood.BoundSpec(figure="gidd")
  with pytest.raises(ValueError, match="steps"):
    likelihood.BoundSpec(form="count", steps=4)
  with pytest.raises(ValueError, match="form"):
    likelihood.mask_elbo_draws(None, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), row_keys(1), mask_id=0,
                               draws=1, form="exact")
  with pytest.raises(ValueError, match="continuous"):
    likelihood.BoundSpec(figure="mixed", steps=4)


def test_a_rows_draws_do_not_depend_on_the_batching(vocab, tokenizer):
  from helpers import tiny_config
  from flowlm_jax.models import registry

  config = tiny_config("flowlm")
  model = registry.create(registry.model_config(config.model, vocab), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(3)
  tokens = rng.choice(vocab.random_token_ids, size=(5, 10)).astype(np.int32)
  tokens[:, -2:] = vocab.pad_id
  corruptible = tokens != vocab.pad_id
  spec = likelihood.BoundSpec(draws=2)
  small = likelihood.row_draws(graphdef, params, vocab, tokens, corruptible, spec, batch_size=4)
  large = likelihood.row_draws(graphdef, params, vocab, tokens, corruptible, spec, batch_size=16)
  np.testing.assert_allclose(small, large, rtol=1e-5)
  mixed = likelihood.row_draws(graphdef, params, vocab, tokens, corruptible,
                               likelihood.BoundSpec(figure="mixed", draws=2), batch_size=4)
  for draws in (small, mixed):
    assert draws.shape == (5, 2) and np.all(np.isfinite(draws)) and np.all(draws >= 0) and draws.mean() > 1
  bound = likelihood.estimate_bound(graphdef, params, tokenizer, vocab, tokens, corruptible, spec, batch_size=4)
  assert bound.tokens == 40 and bound.bytes > 0 and bound.bits_per_byte > 0
