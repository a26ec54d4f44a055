import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowlm_jax import masking
from flowlm_jax.vocab import Vocab

# Small vocab: a bug that draws special ids as random replacements would show up often.
VOCAB = Vocab(size=64, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))
BATCH, SEQ_LEN = 256, 512
SIGMAS = 5.0


def make_cfg(strategy="FLOWLM_STRATEGY", **overrides):
  cfg = ml_collections.ConfigDict(
    dict(strategy=strategy, mask_prob=0.0, random_prob=0.0, keep_prob=0.0, min_ratio=0.0, max_ratio=1.0, eps=1e-3)
  )
  cfg.update(overrides)
  return cfg


def make_spec(strategy="FLOWLM_STRATEGY", **overrides):
  return masking.MaskingSpec.from_config(make_cfg(strategy, **overrides), VOCAB)


def text_tokens(key, shape=(BATCH, SEQ_LEN)):
  return jax.random.randint(key, shape, 5, VOCAB.size, dtype=jnp.int32)


def corrupt_all(spec, shape=(BATCH, SEQ_LEN), seed=0):
  """Corrupt plain text where every position is corruptible."""
  tokens_key, corrupt_key = jax.random.split(jax.random.key(seed))
  tokens_BxL = text_tokens(tokens_key, shape)
  return tokens_BxL, masking.corrupt(corrupt_key, tokens_BxL, jnp.ones(shape, bool), spec)


def binomial_tolerance(p, n):
  return SIGMAS * np.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize(
  "strategy, probs",
  [
    *[(name, probs) for name, probs in masking.STRATEGIES.items()],
    ("CUSTOM", (0.5, 0.25, 0.25)),
  ],
)
def test_kind_fractions_match_strategy(strategy, probs):
  mask_prob, random_prob, keep_prob = probs
  spec = make_spec(strategy, mask_prob=mask_prob, random_prob=random_prob, keep_prob=keep_prob)
  _, out = corrupt_all(spec)
  kind = np.asarray(out.kind)[np.asarray(out.corrupted)]
  for kind_id, p in zip((masking.KIND_MASK, masking.KIND_RANDOM, masking.KIND_UNCHANGED), probs):
    assert abs(np.mean(kind == kind_id) - p) <= binomial_tolerance(p, kind.size), (kind_id, p)


def test_noisy_tokens_agree_with_kind():
  spec = make_spec("BERT_STRATEGY")
  tokens, out = corrupt_all(spec)
  tokens, noisy, kind = np.asarray(tokens), np.asarray(out.noisy_tokens), np.asarray(out.kind)
  assert noisy.dtype == np.int32 and kind.dtype == np.int8 and out.t.dtype == jnp.float32
  assert np.all((kind != masking.KIND_NONE) == np.asarray(out.corrupted))
  assert np.all(noisy[kind == masking.KIND_MASK] == VOCAB.mask_id)
  kept = (kind == masking.KIND_NONE) | (kind == masking.KIND_UNCHANGED)
  np.testing.assert_array_equal(noisy[kept], tokens[kept])


def test_corrupted_fraction_per_sequence_tracks_t():
  _, out = corrupt_all(make_spec())
  t_B = np.asarray(out.t)
  fraction_B = np.asarray(out.corrupted).mean(axis=1)
  assert np.all(np.abs(fraction_B - t_B) <= binomial_tolerance(t_B, SEQ_LEN))
  assert np.corrcoef(fraction_B, t_B)[0, 1] > 0.99


@pytest.mark.parametrize("min_ratio, max_ratio, eps", [(0.0, 1.0, 1e-3), (0.2, 0.8, 0.0), (0.1, 0.4, 0.05)])
def test_t_is_uniform_on_eps_lifted_range(min_ratio, max_ratio, eps):
  spec = make_spec(min_ratio=min_ratio, max_ratio=max_ratio, eps=eps)
  n = 8192  # many short sequences: t is one draw per sequence
  _, out = corrupt_all(spec, shape=(n, 2))
  t = np.asarray(out.t)
  lo, hi = (1 - eps) * min_ratio + eps, (1 - eps) * max_ratio + eps
  assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6
  width = hi - lo
  assert abs(t.mean() - (lo + hi) / 2) <= SIGMAS * width / np.sqrt(12 * n)
  # The sample std of a uniform has relative std ~ sqrt((1/80 - 1/144) / n) / (2 / 12) ~ 0.45 / sqrt(n).
  assert abs(t.std() / (width / np.sqrt(12)) - 1) <= SIGMAS * 0.45 / np.sqrt(n)


def test_fixed_ratio_without_eps_gives_t_equal_to_ratio():
  _, out = corrupt_all(make_spec(min_ratio=0.3, max_ratio=0.3, eps=0.0), shape=(4, 8))
  np.testing.assert_allclose(np.asarray(out.t), 0.3, rtol=1e-6)


def test_non_corruptible_positions_never_change_nor_are_flagged():
  key_tokens, key_special, key_corrupt = jax.random.split(jax.random.key(1), 3)
  tokens = np.array(text_tokens(key_tokens))
  # Sprinkle specials, pad the tail of every sequence and mark a prompt prefix as off-limits.
  specials = np.asarray(jax.random.choice(key_special, np.asarray(VOCAB.special_ids), tokens.shape))
  sprinkle = np.random.default_rng(0).random(tokens.shape) < 0.1
  tokens[sprinkle] = specials[sprinkle]
  tokens[:, -64:] = VOCAB.pad_id
  is_prompt = np.arange(SEQ_LEN)[None, :] < 32
  corruptible = ~VOCAB.special_mask(tokens) & ~is_prompt
  # t near 1 chooses almost every position it may; FlowLM's random draws must still skip the rest.
  spec = make_spec("FLOWLM_STRATEGY", min_ratio=0.9, max_ratio=1.0)
  out = masking.corrupt(key_corrupt, jnp.asarray(tokens), jnp.asarray(corruptible), spec)
  noisy, corrupted, kind = map(np.asarray, (out.noisy_tokens, out.corrupted, out.kind))
  np.testing.assert_array_equal(noisy[~corruptible], tokens[~corruptible])
  assert not corrupted[~corruptible].any()
  assert np.all(kind[~corruptible] == masking.KIND_NONE)
  assert corrupted[corruptible].mean() > 0.9


def test_random_replacements_are_uniform_over_non_special_ids():
  _, out = corrupt_all(make_spec("FLOWLM_STRATEGY"))
  drawn = np.asarray(out.noisy_tokens)[np.asarray(out.kind) == masking.KIND_RANDOM]
  assert not np.isin(drawn, VOCAB.special_ids).any()
  allowed = VOCAB.random_token_ids
  counts = np.bincount(drawn, minlength=VOCAB.size)[allowed]
  p = 1 / allowed.size
  assert counts.sum() == drawn.size
  assert np.all(np.abs(counts / drawn.size - p) <= binomial_tolerance(p, drawn.size))


def test_corrupt_at_the_drawn_t_reproduces_corrupt():
  """corrupt = sample_t, then corrupt_at from the same key: the training noise is one stream."""
  spec = make_spec("BERT_STRATEGY")
  tokens = text_tokens(jax.random.key(0), (8, 64))
  corruptible = jnp.broadcast_to(jnp.arange(64) >= 4, tokens.shape)
  drawn = masking.corrupt(jax.random.key(3), tokens, corruptible, spec)
  again = masking.corrupt_at(jax.random.key(3), tokens, corruptible, drawn.t, spec)
  jax.tree.map(np.testing.assert_array_equal, drawn, again)


def test_corrupt_at_chooses_corruptible_positions_at_the_given_rates():
  t = jnp.asarray([0.0, 0.1, 0.5, 0.9, 1.0])
  tokens = text_tokens(jax.random.key(0), (5, 4096))
  corruptible = jnp.broadcast_to(jnp.arange(4096) % 4 != 0, tokens.shape)
  out = jax.jit(masking.corrupt_at, static_argnums=4)(jax.random.key(1), tokens, corruptible, t,
                                                     make_spec("BERT_STRATEGY"))
  corrupted, ok = np.asarray(out.corrupted), np.asarray(corruptible)
  assert not corrupted[~ok].any()
  fraction = corrupted[ok].reshape(5, -1).mean(axis=1)
  np.testing.assert_array_equal(fraction[[0, -1]], [0.0, 1.0])
  assert np.all(np.abs(fraction - t) <= binomial_tolerance(np.asarray(t), 3072))
  np.testing.assert_array_equal(out.t, t)


def test_same_key_same_output_different_key_different_output():
  spec = make_spec("BERT_STRATEGY")
  tokens = text_tokens(jax.random.key(0), (8, 64))
  corruptible = jnp.ones(tokens.shape, bool)
  first = masking.corrupt(jax.random.key(3), tokens, corruptible, spec)
  again = masking.corrupt(jax.random.key(3), tokens, corruptible, spec)
  other = masking.corrupt(jax.random.key(4), tokens, corruptible, spec)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first.noisy_tokens, other.noisy_tokens)
  assert not np.array_equal(first.t, other.t)


def test_jit_with_closed_over_spec_matches_eager():
  spec = make_spec("FLOWLM_STRATEGY")
  tokens = text_tokens(jax.random.key(0), (8, 64))
  corruptible = jnp.broadcast_to(jnp.arange(64) >= 4, tokens.shape)
  jitted = jax.jit(functools.partial(masking.corrupt, spec=spec))
  eager = masking.corrupt(jax.random.key(5), tokens, corruptible, spec)
  out = jitted(jax.random.key(5), tokens, corruptible)
  for field in ("noisy_tokens", "corrupted", "kind"):
    np.testing.assert_array_equal(getattr(out, field), getattr(eager, field))
  # XLA may fuse (1 - eps) * r + eps into an FMA under jit: t agrees to an ulp, not bitwise.
  np.testing.assert_allclose(out.t, eager.t, rtol=1e-6)


def test_legacy_uint32_keys_work():
  tokens = text_tokens(jax.random.key(0), (2, 16))
  out = masking.corrupt(jax.random.PRNGKey(0), tokens, jnp.ones(tokens.shape, bool), make_spec())
  assert out.noisy_tokens.shape == tokens.shape and out.t.shape == (2,)


def test_from_config_accepts_plain_attribute_objects():
  cfg = types.SimpleNamespace(strategy="LLADA_STRATEGY", min_ratio=0.1, max_ratio=0.9, eps=0.0)
  spec = masking.MaskingSpec.from_config(cfg, VOCAB)
  assert (spec.mask_prob, spec.random_prob, spec.keep_prob) == masking.STRATEGIES["LLADA_STRATEGY"]
  assert spec.random_token_ids == tuple(VOCAB.random_token_ids.tolist())
  assert spec.mask_id == VOCAB.mask_id
  hash(spec)  # safe to use as a cache key / static value


def test_custom_strategy_uses_config_probabilities():
  spec = make_spec("CUSTOM", mask_prob=0.6, random_prob=0.3, keep_prob=0.1)
  assert (spec.mask_prob, spec.random_prob, spec.keep_prob) == (0.6, 0.3, 0.1)


def test_named_strategy_ignores_custom_probabilities():
  spec = make_spec("BERT_STRATEGY", mask_prob=0.2, random_prob=0.2, keep_prob=0.2)
  assert (spec.mask_prob, spec.random_prob, spec.keep_prob) == masking.STRATEGIES["BERT_STRATEGY"]


def test_unknown_strategy_raises_naming_the_field():
  with pytest.raises(ValueError, match="masking.strategy"):
    make_spec("SPAN_STRATEGY")


def test_custom_probabilities_not_summing_to_one_raise_naming_the_fields():
  with pytest.raises(ValueError, match=r"masking.mask_prob \+ masking.random_prob \+ masking.keep_prob"):
    make_spec("CUSTOM", mask_prob=0.5, random_prob=0.3, keep_prob=0.1)


def test_bad_ratio_range_raises():
  with pytest.raises(ValueError, match="masking.min_ratio"):
    make_spec(min_ratio=0.8, max_ratio=0.2)


def test_mask_id_among_random_ids_raises():
  vocab = Vocab(size=8, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 2, 3))
  with pytest.raises(ValueError, match="mask_id"):
    masking.MaskingSpec.from_config(make_cfg(), vocab)


# --- clean answer prefixes (training rows in the states of a semi-autoregressive sampler) -----


def _prefix_lengths(spec, corruptible_BxL, seed=0):
  """(kept corruptible [B, L], per row: how many of its first corruptible positions were taken out)."""
  kept = np.asarray(masking.keep_clean_prefix(jax.random.key(seed), jnp.asarray(corruptible_BxL), spec))
  corruptible = np.asarray(corruptible_BxL, bool)
  assert not (kept & ~corruptible).any()  # nothing becomes corruptible
  removed = corruptible & ~kept
  rank = np.cumsum(corruptible, axis=1) - 1
  lengths = removed.sum(1)
  # What is taken out is exactly the row's first `length` corruptible positions, and one is always left.
  np.testing.assert_array_equal(removed, corruptible & (rank < lengths[:, None]))
  assert (kept.sum(1) >= 1).all()
  return kept, lengths


def test_clean_prefix_off_leaves_every_row_as_it_was():
  corruptible = np.zeros((64, 48), bool)
  corruptible[:, 8:40] = True
  kept, _ = _prefix_lengths(make_spec(clean_prefix_prob=0.0, clean_prefix_block=1), corruptible)
  np.testing.assert_array_equal(kept, corruptible)


def test_clean_prefix_length_is_uniform_over_whole_blocks_below_the_answer_length():
  """40 corruptible positions, blocks of 8: prefixes of 0, 8, ..., 32 positions, each in a fifth of the rows."""
  rows = 20_000
  corruptible = np.zeros((rows, 64), bool)
  corruptible[:, 10:50] = True
  _, lengths = _prefix_lengths(make_spec(clean_prefix_prob=1.0, clean_prefix_block=8), corruptible)
  values, counts = np.unique(lengths, return_counts=True)
  assert values.tolist() == [0, 8, 16, 24, 32]
  np.testing.assert_allclose(counts / rows, 0.2, atol=SIGMAS * np.sqrt(0.2 * 0.8 / rows))


def test_clean_prefix_of_a_count_that_is_not_whole_blocks_ends_before_the_last_partial_block():
  """35 corruptible positions, blocks of 8: five blocks (the last of 3), prefixes 0, 8, ..., 32: 3 left at most."""
  corruptible = np.zeros((4_000, 48), bool)
  corruptible[:, 5:40] = True
  _, lengths = _prefix_lengths(make_spec(clean_prefix_prob=1.0, clean_prefix_block=8), corruptible, seed=2)
  assert sorted(set(lengths.tolist())) == [0, 8, 16, 24, 32]


def test_clean_prefix_goes_to_the_configured_share_of_rows_and_counts_corruptible_positions_only():
  """Half the rows draw a prefix (of 0..n-1 positions, so n-1 in n of them lose some); rows whose corruptible
  positions have holes lose their first corruptible positions, not their first columns."""
  rows, n = 20_000, 30
  corruptible = np.zeros((rows, 64), bool)
  corruptible[:, 4:64:2] = True  # every other column: 30 corruptible positions with holes between them
  _, lengths = _prefix_lengths(make_spec(clean_prefix_prob=0.5, clean_prefix_block=1), corruptible, seed=1)
  expected = 0.5 * (n - 1) / n
  assert abs((lengths > 0).mean() - expected) < SIGMAS * np.sqrt(expected * (1 - expected) / rows)
  assert lengths.max() == n - 1


def test_clean_prefix_settings_out_of_range_raise_naming_the_fields():
  with pytest.raises(ValueError, match="clean_prefix_prob"):
    make_spec(clean_prefix_prob=1.5)
  with pytest.raises(ValueError, match="clean_prefix_block"):
    make_spec(clean_prefix_block=0)


# --- a second strategy for a share of the rows ---------------------------------------------------


def test_mixed_rows_take_the_mix_strategys_kinds_and_the_others_keep_their_own():
  """FlowLM corruption with LLaDA's in a quarter of the rows: each row's kind fractions are one strategy's, the
  rows split at the configured share, and t (the choice of positions) is the same draw as without the mix."""
  plain = make_spec("FLOWLM_STRATEGY")
  mixed = make_spec("FLOWLM_STRATEGY", mix_strategy="LLADA_STRATEGY", mix_prob=0.25)
  _, out = corrupt_all(mixed, shape=(2_000, 256))
  _, out_plain = corrupt_all(plain, shape=(2_000, 256))
  np.testing.assert_array_equal(np.asarray(out.corrupted), np.asarray(out_plain.corrupted))
  kind, corrupted = np.asarray(out.kind), np.asarray(out.corrupted)
  rows = corrupted.sum(1) >= 100  # enough chosen positions per row to tell a 0.3 [MASK] share from 0.9 by far
  kind, corrupted = kind[rows], corrupted[rows]
  llada_rows = (kind == masking.KIND_MASK).sum(1) / corrupted.sum(1) > 0.6
  assert abs(llada_rows.mean() - 0.25) < SIGMAS * np.sqrt(0.25 * 0.75 / rows.sum())
  for strategy, of_strategy in (("LLADA_STRATEGY", llada_rows), ("FLOWLM_STRATEGY", ~llada_rows)):
    chosen = corrupted[of_strategy].sum()
    for kind_id, p in zip((masking.KIND_MASK, masking.KIND_RANDOM), masking.STRATEGIES[strategy]):
      share = (kind[of_strategy] == kind_id).sum() / chosen
      assert abs(share - p) <= binomial_tolerance(p, chosen), (strategy, kind_id, share, p)


def test_a_mix_of_nothing_draws_what_no_mix_draws():
  plain = corrupt_all(make_spec("FLOWLM_STRATEGY"))[1]
  off = corrupt_all(make_spec("FLOWLM_STRATEGY", mix_strategy="LLADA_STRATEGY", mix_prob=0.0))[1]
  for a, b in zip(plain, off):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_mix_that_draws_random_tokens_draws_them_where_the_main_strategy_never_does():
  """Mask-only main strategy, BERT's kinds in every row: random replacements appear, from non-special ids."""
  spec = make_spec("CUSTOM", mask_prob=1.0, mix_strategy="BERT_STRATEGY", mix_prob=1.0)
  _, out = corrupt_all(spec, shape=(64, 256))
  kind, noisy = np.asarray(out.kind), np.asarray(out.noisy_tokens)
  random_share = (kind == masking.KIND_RANDOM).sum() / np.asarray(out.corrupted).sum()
  assert abs(random_share - 0.1) < 0.02
  assert not np.isin(noisy[kind == masking.KIND_RANDOM], VOCAB.special_ids).any()


def test_a_mix_without_a_strategy_or_out_of_range_raises_naming_the_field():
  with pytest.raises(ValueError, match="masking.mix_prob=0.5 needs masking.mix_strategy"):
    make_spec(mix_prob=0.5)
  with pytest.raises(ValueError, match="masking.mix_prob must lie in"):
    make_spec(mix_strategy="LLADA_STRATEGY", mix_prob=1.5)


def test_an_absorbing_mix_at_ratio_one_gives_the_llada_samplers_all_mask_answer():
  spec = make_spec("FLOWLM_STRATEGY", min_ratio=1.0, max_ratio=1.0, eps=0.0, mix_strategy="ABSORBING_STRATEGY",
                   mix_prob=1.0)
  _, out = corrupt_all(spec, shape=(8, 64))
  assert np.all(np.asarray(out.noisy_tokens) == VOCAB.mask_id)
