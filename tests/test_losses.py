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
