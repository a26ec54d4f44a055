import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowlm_jax import losses, masking

B, L, V = 4, 32, 50


def make_batch(seed=0):
  """Random logits/targets and a corruption pattern with non-corruptible positions and distinct t's."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=4.0, size=(B, L, V)).astype(np.float32)
  targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
  corruptible = rng.random((B, L)) < 0.8
  t = rng.uniform(0.05, 1.0, size=B).astype(np.float32)
  corrupted = corruptible & (rng.random((B, L)) < t[:, None])
  kind = np.where(corrupted, rng.integers(1, 4, size=(B, L)), masking.KIND_NONE).astype(np.int8)
  return logits, targets, corrupted, t, corruptible, kind


def numpy_nll_and_correct(logits, targets):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return nll, logits.argmax(axis=-1) == targets


def numpy_loss(nll, corrupted, t, corruptible, weighting):
  if weighting == "inverse_t":
    return (nll / t[:, None])[corrupted].sum() / max(corruptible.sum(), 1)
  return nll[corrupted].sum() / max(corrupted.sum(), 1)


def test_token_nll_and_correct_match_numpy():
  logits, targets, *_ = make_batch()
  nll, correct = losses.token_nll_and_correct(jnp.asarray(logits), jnp.asarray(targets))
  ref_nll, ref_correct = numpy_nll_and_correct(logits, targets)
  assert nll.dtype == jnp.float32 and correct.dtype == jnp.bool_
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(correct, ref_correct)


def test_token_nll_is_stable_for_huge_logits():
  logits, targets, *_ = make_batch()
  nll, _ = losses.token_nll_and_correct(jnp.asarray(logits + 1e4), jnp.asarray(targets))
  assert np.all(np.isfinite(nll))
  np.testing.assert_allclose(nll, numpy_nll_and_correct(logits, targets)[0], rtol=1e-2, atol=1e-2)


def test_token_nll_upcasts_bfloat16_logits():
  logits, targets, *_ = make_batch()
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  nll, _ = losses.token_nll_and_correct(logits_bf16, jnp.asarray(targets))
  assert nll.dtype == jnp.float32
  ref_nll, _ = numpy_nll_and_correct(np.asarray(logits_bf16.astype(jnp.float32)), targets)
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
def test_diffusion_loss_matches_numpy(weighting):
  logits, targets, corrupted, t, corruptible, _ = make_batch()
  nll = numpy_nll_and_correct(logits, targets)[0]
  loss = losses.diffusion_loss(jnp.asarray(nll, jnp.float32), corrupted, t, corruptible, weighting)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, numpy_loss(nll, corrupted, t, corruptible, weighting), rtol=1e-5)


def test_llada_and_flowlm_losses_match_numpy():
  logits, targets, corrupted, t, corruptible, _ = make_batch(seed=1)
  nll = numpy_nll_and_correct(logits, targets)[0]
  nll_f32 = jnp.asarray(nll, jnp.float32)
  np.testing.assert_allclose(
    losses.llada_loss(nll_f32, corrupted, t, corruptible),
    numpy_loss(nll, corrupted, t, corruptible, "inverse_t"),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    losses.flowlm_loss(nll_f32, corrupted, t, corruptible),
    numpy_loss(nll, corrupted, t, corruptible, "none"),
    rtol=1e-5,
  )


def test_inverse_t_is_unweighted_loss_over_t_when_everything_is_corrupted_at_one_t():
  nll = jnp.asarray(np.random.default_rng(2).exponential(size=(B, L)), jnp.float32)
  everything = jnp.ones((B, L), bool)
  t = jnp.full((B,), 0.25)
  unweighted = losses.diffusion_loss(nll, everything, t, everything, "none")
  inverse_t = losses.diffusion_loss(nll, everything, t, everything, "inverse_t")
  np.testing.assert_allclose(inverse_t, unweighted / 0.25, rtol=1e-6)


def test_inverse_t_normalises_by_corruptible_not_corrupted_count():
  nll = jnp.ones((1, 4), jnp.float32)
  corrupted = jnp.asarray([[True, False, False, False]])
  corruptible = jnp.asarray([[True, True, False, False]])
  t = jnp.asarray([0.5])
  # One corrupted position with nll 1 at t = 0.5, over two corruptible positions.
  np.testing.assert_allclose(losses.diffusion_loss(nll, corrupted, t, corruptible, "inverse_t"), 1.0)
  np.testing.assert_allclose(losses.diffusion_loss(nll, corrupted, t, corruptible, "none"), 1.0)


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
def test_batch_without_corrupted_positions_gives_zero_loss(weighting):
  nll = jnp.ones((B, L), jnp.float32)
  nothing = jnp.zeros((B, L), bool)
  for corruptible in (nothing, jnp.ones((B, L), bool)):
    loss = losses.diffusion_loss(nll, nothing, jnp.zeros((B,)), corruptible, weighting)
    assert np.isfinite(loss) and loss == 0.0


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
def test_gradient_is_finite_with_zero_t_and_inf_nll_off_corrupted_positions(weighting):
  nll = jnp.asarray([[1.0, jnp.inf], [2.0, 3.0]])
  corrupted = jnp.asarray([[True, False], [False, False]])
  t = jnp.asarray([0.5, 0.0])  # second sequence: t = 0, nothing corrupted
  grad = jax.grad(losses.diffusion_loss)(nll, corrupted, t, jnp.ones((2, 2), bool), weighting)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[~np.asarray(corrupted)] == 0.0)


def test_unknown_weighting_raises():
  with pytest.raises(ValueError, match="weighting"):
    losses.diffusion_loss(jnp.ones((1, 1)), jnp.ones((1, 1), bool), jnp.ones((1,)), jnp.ones((1, 1), bool), "t2")
  with pytest.raises(ValueError, match="weighting"):
    losses.loss_fn("flowlm", "t2")


def test_loss_fn_applies_weighting_to_flowlm_only():
  logits, targets, corrupted, t, corruptible, _ = make_batch()
  nll = jnp.asarray(numpy_nll_and_correct(logits, targets)[0], jnp.float32)
  args = (nll, corrupted, t, corruptible)
  assert losses.loss_fn("llada") is losses.llada_loss
  assert losses.loss_fn("llada", "none") is losses.llada_loss
  assert losses.loss_fn("flowlm") is losses.flowlm_loss
  assert losses.loss_fn("flowlm", "inverse_t")(*args) == losses.llada_loss(*args)
  assert losses.loss_fn("flowlm", "none")(*args) == losses.diffusion_loss(*args, "none")


def test_loss_fn_rejects_unknown_loss_name():
  with pytest.raises(ValueError, match="training.loss"):
    losses.loss_fn("mdlm")


def numpy_metric_sums(correct, kind, corrupted, t):
  bucket = np.select([t <= 0.25, t <= 0.5, t <= 0.75], [0, 1, 2], default=3)
  groups = {
    "corrupted": corrupted,
    "mask": corrupted & (kind == masking.KIND_MASK),
    "random": corrupted & (kind == masking.KIND_RANDOM),
    "unchanged": corrupted & (kind == masking.KIND_UNCHANGED),
    **{name: corrupted & (bucket == i)[:, None] for i, name in enumerate(losses.RATIO_BUCKETS)},
  }
  sums = {}
  for name, group in groups.items():
    sums[f"correct/{name}"] = float((group & correct).sum())
    sums[f"count/{name}"] = float(group.sum())
  return sums


def test_metric_sums_match_numpy_counting():
  logits, targets, corrupted, t, _, kind = make_batch()
  t = np.asarray([0.1, 0.25, 0.6, 0.9], np.float32)  # one sequence per bucket, 0.25 on the closed edge
  correct = numpy_nll_and_correct(logits, targets)[1]
  sums = jax.jit(losses.masking_metric_sums)(correct, kind, corrupted, t)
  assert all(v.shape == () and v.dtype == jnp.float32 for v in sums.values())
  assert {k: float(v) for k, v in sums.items()} == numpy_metric_sums(correct, kind, corrupted, t)


def test_finalize_metrics_divides_sums_and_skips_empty_groups():
  sums = {
    "correct/corrupted": 3.0,
    "count/corrupted": 4.0,
    "correct/mask": 3.0,
    "count/mask": 4.0,
    "correct/random": 0.0,
    "count/random": 0.0,
  }
  assert losses.finalize_metrics(sums) == {"accuracy": 0.75, "accuracy_mask": 0.75}


def test_metric_sums_add_over_micro_batches():
  logits, targets, corrupted, t, _, kind = make_batch()
  correct = numpy_nll_and_correct(logits, targets)[1]
  whole = losses.masking_metric_sums(correct, kind, corrupted, t)
  halves = [losses.masking_metric_sums(correct[s], kind[s], corrupted[s], t[s]) for s in (slice(0, 2), slice(2, B))]
  summed = jax.tree.map(lambda a, b: a + b, *halves)
  assert losses.finalize_metrics(summed) == pytest.approx(losses.finalize_metrics(whole))
  assert losses.finalize_metrics(whole)["accuracy"] == pytest.approx(correct[corrupted].mean())


# --- the mixed [MASK] + uniform ELBO (GIDD) -----------------------------------------------------

MASK = 0
RANDOM_IDS = (1, 2, 3, 4)  # id 5 plays [EOS]: a target that uniform noise never draws


def mixed_noise(mask_prob=0.3, random_prob=0.7, keep_prob=0.0):
  spec = masking.MaskingSpec(mask_prob=mask_prob, random_prob=random_prob, keep_prob=keep_prob, min_ratio=0.0,
                             max_ratio=1.0, eps=0.0, mask_id=MASK, random_token_ids=RANDOM_IDS)
  return losses.MixedNoise.from_masking(spec)


def test_mixed_noise_and_its_masking_strategy_are_inverse():
  spec = masking.MaskingSpec(mask_prob=0.5, random_prob=0.3, keep_prob=0.2, min_ratio=0.0, max_ratio=1.0, eps=0.0,
                             mask_id=MASK, random_token_ids=RANDOM_IDS)
  noise = losses.MixedNoise.from_masking(spec)
  back = noise.as_masking()
  probs = lambda s: (s.mask_prob, s.random_prob, s.keep_prob)
  assert probs(back) == pytest.approx(probs(spec)) and (back.mask_id, back.random_token_ids) == (MASK, RANDOM_IDS)
  again = losses.MixedNoise.from_masking(back)
  assert (again.time_scale, again.mask_prob, again.random_prob) == pytest.approx((0.8, 0.625, 0.375))


def test_loss_weighting_choices_in_config_are_the_losses():
  from flowlm_jax import config
  assert config.CHOICES["training.loss_weighting"] == losses.LOSS_WEIGHTINGS


@pytest.mark.parametrize("keep_prob", [0.0, 0.2])
def test_gidd_weights_match_a_hand_computation_in_each_state(keep_prob):
  mask_prob, random_prob, t, R = 0.3 * (1 - keep_prob), 0.7 * (1 - keep_prob), 0.4, len(RANDOM_IDS)
  noise = mixed_noise(mask_prob, random_prob, keep_prob)
  targets = jnp.asarray([[2, 2, 2, 5, 2, 2]])
  noisy = jnp.asarray([[MASK, 3, 2, 5, 2, 5]])  # [MASK], wrong, right, right but [EOS], not corruptible, unreachable
  corruptible = jnp.asarray([[True, True, True, True, False, True]])
  w = losses.gidd_weights(noisy, targets, corruptible, jnp.asarray([t]), noise)[0]
  s = 1 - keep_prob  # the clock: tau = s t; pi = 0.3 [MASK] + 0.7 uniform over the 4 random ids
  tau = s * t
  q_right = (1 - tau) + tau * 0.7 / R
  expected = [s * 0.3 / ((1 - tau) * tau * 0.3),            # pi(MASK) / ((1 - tau) q(MASK | x))
              s * (0.7 / R) / ((1 - tau) * tau * 0.7 / R),  # pi(z) / ((1 - tau) q(z | x)), z wrong
              s * (0.7 / R) / ((1 - tau) * q_right),        # pi(x) / ((1 - tau) q(x | x))
              0.0, 0.0, 0.0]
  np.testing.assert_allclose(w, expected, rtol=1e-5)
  assert expected[0] == pytest.approx(1 / (t * (1 - tau)))  # [MASK] and wrong tokens: 1 / (t (1 - tau))


def brute_force_gidd_divergence(log_p, x, z, t, noise, V):
  """KL(q_t(.|x) || q_t(.|p)) + IS(z) from the full marginal vectors, in float64."""
  tau = noise.time_scale * t
  pi = np.zeros(V)
  pi[MASK] = noise.mask_prob
  pi[list(RANDOM_IDS)] = noise.random_prob / len(RANDOM_IDS)
  p = np.exp(log_p.astype(np.float64))
  p[MASK] = 0.0
  p /= p.sum()
  q_x = (1 - tau) * np.eye(V)[x] + tau * pi
  q_p = (1 - tau) * p + tau * pi
  kl = sum(q_x[v] * np.log(q_x[v] / q_p[v]) for v in range(V) if q_x[v] > 0)
  r = q_x[z] / q_p[z]
  return kl + r - np.log(r) - 1


@pytest.mark.parametrize("mix", [(0.3, 0.7), (1.0, 0.0), (0.0, 1.0)])
def test_gidd_divergences_match_the_full_marginals(mix):
  V = 7
  noise = mixed_noise(*mix)
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=2.0, size=(3, 4, V)).astype(np.float32)
  targets = np.asarray([[2, 5, 1, 4]] * 3)
  states = {"mask": [MASK] * 4, "wrong": [3, 1, 2, 1], "right": [2, 5, 1, 4]}
  t = np.asarray([0.05, 0.5, 0.97], np.float32)
  for name, z in states.items():
    if (name == "mask" and not mix[0]) or (name == "wrong" and not mix[1]):
      continue  # a state this mix never produces
    noisy = np.asarray([z] * 3)
    got = losses.gidd_divergences(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(noisy), jnp.asarray(t), noise)
    weight = losses.gidd_weights(jnp.asarray(noisy), jnp.asarray(targets), jnp.ones((3, 4), bool), jnp.asarray(t),
                                 noise)
    for b in range(3):
      for i in range(4):
        if weight[b, i] == 0:
          continue  # a right token uniform noise never draws: unused, and its IS term is set to 0
        want = brute_force_gidd_divergence(logits[b, i], targets[b, i], noisy[b, i], t[b], noise, V)
        np.testing.assert_allclose(got[b, i], want, rtol=2e-4, atol=1e-6, err_msg=f"{name} b={b} i={i}")


def test_gidd_loss_with_pure_mask_noise_is_the_inverse_t_loss():
  logits, targets, corrupted, t, corruptible, _ = make_batch(seed=3)
  noise = losses.MixedNoise(time_scale=1.0, mask_prob=1.0, random_prob=0.0, mask_id=V - 1, random_token_ids=())
  logits[..., V - 1] = -1e9  # the model never predicts [MASK] (the mixed-noise loss bans it too)
  targets = np.minimum(targets, V - 2)
  noisy = np.where(corrupted, V - 1, targets)
  per_token = losses.gidd_token_loss(jnp.asarray(logits), targets, noisy, corruptible, t, noise)
  nll = numpy_nll_and_correct(logits, targets)[0]
  np.testing.assert_allclose(per_token, np.where(corrupted, nll / t[:, None], 0.0), rtol=1e-4, atol=1e-5)


def test_gidd_elbo_is_tight_for_the_exact_reverse_process_and_an_upper_bound_otherwise():
  """One position, data uniform over two tokens. Integrating w (KL + IS) over t (midpoint rule) and the states z
  gives the ELBO. The model whose plugged-in reverse rates are the true ones (here: x_theta = the data
  distribution, whatever z is) makes it -log p(x) = log 2; the posterior p(x | z) as x_theta gives more."""
  noise, V, n = mixed_noise(0.3, 0.7), 6, 4000
  data = (1, 2)  # x is 1 or 2, equally likely; ids 3 and 4 are random ids outside the data
  t = (np.arange(n) + 0.5) / n
  c = t * 0.7 / len(RANDOM_IDS)

  def elbo(x, model):
    total = np.zeros(n)
    for z in (MASK, *RANDOM_IDS):
      like = {y: np.where(z == y, 1 - t, 0.0) + (t * 0.3 if z == MASK else c) for y in data}  # q_t(z | y)
      p = model(like)
      probs = np.stack([p[y] / (p[1] + p[2]) if y in data else np.zeros(n) for y in range(V)], -1)
      logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)[:, None, :]
      loss = losses.gidd_token_loss(jnp.asarray(logits), jnp.full((n, 1), x), jnp.full((n, 1), z),
                                    jnp.ones((n, 1), bool), jnp.asarray(t, jnp.float32), noise)
      total += like[x] * np.asarray(loss[:, 0], np.float64)
    return total.mean()

  for x in data:
    assert elbo(x, lambda like: {y: np.ones(n) for y in data}) == pytest.approx(np.log(2), rel=1e-4)
    assert elbo(x, lambda like: like) > np.log(2) + 0.1


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_chunked_gidd_loss_equals_the_full_logits_in_value_and_gradient(chunk_size):
  """fused_gidd_loss (gradients in the forward pass), 12 positions at once or in chunks of 5
  (the last one padded), against gidd_token_loss on whole logits; two vocabulary rows are padding and the
  output layer has a bias."""
  rng = np.random.default_rng(4)
  D, Vs, real = 6, 8, 6
  hidden = jnp.asarray(rng.normal(size=(2, 12, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, Vs)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(Vs,)), jnp.float32)
  targets = jnp.asarray(rng.integers(1, 6, size=(2, 12)))
  noisy = jnp.where(rng.random((2, 12)) < 0.5, rng.integers(0, 5, size=(2, 12)), targets)
  corruptible = jnp.asarray(rng.random((2, 12)) < 0.9)
  t = jnp.asarray([0.3, 0.8])
  noise = mixed_noise()
  logits_fn = lambda h, w, b: jnp.where(jnp.arange(Vs) < real, h @ w + b, jnp.finfo(jnp.float32).min)

  def full(h, w, b):
    logits = logits_fn(h, w, b)
    total = jnp.sum(losses.gidd_token_loss(logits, targets, noisy, corruptible, t, noise))
    return total, losses.token_nll_and_correct(logits, targets)

  def chunked(h, w, b):
    total, nll, correct = losses.fused_gidd_loss(h, w, targets, noisy, corruptible, t, noise, real, chunk_size, b)
    return total, (nll, correct)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(hidden, w, bias)
  (got, (nll, correct)), grads = grad(chunked)
  (want, (want_nll, want_correct)), want_grads = grad(full)
  assert float(want) > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
  np.testing.assert_array_equal(correct, want_correct)
  for g, ref in zip(grads, want_grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_loss_fn_refuses_gidd_as_an_nll_weighting():
  with pytest.raises(ValueError, match="fused_gidd_loss"):
    losses.loss_fn("flowlm", "gidd")
