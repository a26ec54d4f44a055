"""Samplers against a plain-Python reference on a tiny random model, plus their invariants.

The reference below calls the model (one plain forward pass) once per step and does the selection
in numpy/Python; it shares only the key derivation with `sampling.py` (init_key, step_key = split(key); step t:
gumbel_key, conf_key = split(fold_in(step_key, t))), so the random draws are identical.
"""

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowlm_jax import config as config_lib
from flowlm_jax import evaluate, sample, sampling
from flowlm_jax.models.llama import ModelConfig, Transformer
from flowlm_jax.vocab import Vocab
from helpers import jit_compiles

VOCAB = Vocab(size=60, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))
MASK = VOCAB.mask_id
NEG_INF = np.finfo(np.float32).min
PROMPTS = [[5, 6, 7, 3], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 3], [20, 21, 22, 23, 24, 25, 26, 3]]
STRATEGIES = ("below_threshold", "most_confident_changes", "fill_then_refine")
# Configs with randomness, shared by the reference and determinism tests (same spec: no recompile).
LLADA_RANDOM = dict(block_length=4, remasking="random", temperature=0.8, cfg_scale=1.5)
FLOWLM_RANDOM = dict(replacement_strategy="below_threshold", initial_answer="random", temperature=0.7)
FLOWLM_CASES = [*[(s, dict()) for s in STRATEGIES], ("most_confident_changes", dict(initial_answer="random")),
                ("below_threshold", FLOWLM_RANDOM), ("fill_then_refine", dict(temperature=0.7, steps=4))]
FLOWLM_IDS = [*STRATEGIES, "most_confident_changes-random", "below_threshold-random-temperature",
              "fill_then_refine-temperature"]
# Parallel decoding (Fast-dLLM's confidence threshold); 0.3 sits in the tiny model's confidence range.
LLADA_PARALLEL = dict(block_length=4, parallel_threshold=0.3)
FLOWLM_PARALLEL_CASES = [(s, dict(parallel_threshold=0.3)) for s in STRATEGIES]
# Fast-dLLM's factor rule; at factor 2 the bar 1 - 2 / (n + 1) is 0.33 for two tokens, 0.6 for four, 0.8 for nine:
# the tiny model's confidences pass it for a varying count.
LLADA_FACTOR = dict(block_length=4, parallel_factor=2.0)
FLOWLM_FACTOR_CASES = [(s, dict(parallel_factor=2.0)) for s in STRATEGIES]


def build(model_cfg: ModelConfig):
  """(graphdef, pure-dict params): N(0, init_std) matrices, unit norms, drawn with numpy (jax's init compiles)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=0))))
  rng = np.random.default_rng(0)
  init = lambda name, x: (np.ones(x.shape) if "norm" in name else rng.normal(0, model_cfg.init_std, x.shape))
  return graphdef, {name: jnp.asarray(init(name, x), jnp.float32) for name, x in nnx.to_pure_dict(abstract).items()}


@functools.lru_cache(maxsize=None)
def tiny_model():
  return build(ModelConfig(vocab_size=64, num_real_tokens=60, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64,
                           compute_dtype="float32"))


@functools.lru_cache(maxsize=None)
def params_at(logit_scale: float):
  """Weights x10 so predictions depend on the context; the output matrix sets how confident they are.

  logit_scale 30 spreads top probabilities over ~0.15-1 (median ~0.5, the tests' threshold).
  """
  graphdef, params = tiny_model()
  scaled = {name: w if "norm" in name else w * 10 for name, w in params.items()}
  scaled["unembed"] = params["unembed"] * logit_scale
  return graphdef, scaled


def inference_config(**overrides):
  icfg = config_lib.base_config().inference
  icfg.update(dict(answer_length=8, steps=8, max_steps=12, block_length=0, temperature=0.0, cfg_scale=0.0,
                   confidence_threshold=0.5, max_replacements=2))
  icfg.update(overrides)
  return icfg


# --- plain-Python reference -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def model_forward(graphdef, params, tokens_BxT, valid_BxT, positions_BxT):
  """One plain forward pass (jitted only because eager `lax.scan` over layers is slow)."""
  return nnx.merge(graphdef, params)(tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT)


def ref_left_pad(prompt_ids):
  """(prompt [B, P], valid [B, P]): left-padded to the longest prompt, the layout the brief describes."""
  P = max(map(len, prompt_ids))
  prompt = np.array([[VOCAB.pad_id] * (P - len(p)) + p for p in prompt_ids])
  return prompt, prompt != VOCAB.pad_id


def ref_logits(model, prompt_BxP, valid_BxP, answer_BxA):
  valid = np.concatenate([valid_BxP, np.ones(answer_BxA.shape, bool)], axis=1)
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  tokens = np.concatenate([prompt_BxP, answer_BxA], axis=1)
  return np.asarray(model_forward(*model, tokens, valid, positions))[:, prompt_BxP.shape[1]:]


def ref_predict(logits, temperature, gumbel_key):
  logits = logits.copy()
  logits[..., [VOCAB.mask_id, VOCAB.pad_id]] = NEG_INF
  e = np.exp(logits - logits.max(-1, keepdims=True))
  probs = e / e.sum(-1, keepdims=True)
  if temperature > 0:
    logits = logits + temperature * np.asarray(jax.random.gumbel(gumbel_key, logits.shape, jnp.float32))
  pred = logits.argmax(-1)
  return pred, np.take_along_axis(probs, pred[..., None], -1)[..., 0], probs


def ref_top(positions, key, k):
  """The first k of `positions` sorted by key (ties: lower index first)."""
  return sorted(positions, key=lambda i: (key(i), i))[:max(int(k), 0)]


def ref_factor_count(confs, factor):
  """Fast-dLLM's factor rule, spelled out: the longest run of the most confident whose n-th has conf >= 1 - factor
  / (n + 1) (0 when the most confident misses its bar)."""
  n = 0
  for rank, c in enumerate(sorted(confs, reverse=True), start=1):
    if c < 1 - factor / (rank + 1):
      break
    n = rank
  return n


def ref_parallel(candidates, conf, icfg):
  """What a parallel rule adds: every candidate above the threshold, or the factor rule's most confident."""
  if icfg.parallel_threshold:
    return [j for j in candidates if conf[j] > icfg.parallel_threshold]
  if icfg.parallel_factor:
    return ref_top(candidates, lambda j: -conf[j], ref_factor_count([conf[j] for j in candidates], icfg.parallel_factor))
  return []


def ref_schedule(count, steps):
  return [count // steps + (i < count % steps) for i in range(steps)]


def ref_llada(graphdef, params, prompt_ids, key, icfg):
  """(trajectory [steps + 1, B, A], steps made); entries after the last step repeat the answer."""
  model = (graphdef, params)
  prompt, valid = ref_left_pad(prompt_ids)
  B, A = len(prompt_ids), icfg.answer_length
  parallel = icfg.parallel_threshold > 0 or icfg.parallel_factor > 0
  block = icfg.block_length or A
  steps_per_block = icfg.steps // (A // block)
  _, step_key = jax.random.split(key)
  x = np.full((B, A), MASK)
  trajectory = [x.copy()]
  for b in range(A // block):
    cols = range(b * block, (b + 1) * block)
    schedules = [ref_schedule(int(np.sum(x[r, cols] == MASK)), steps_per_block) for r in range(B)]
    for i in range(steps_per_block):
      gumbel_key, conf_key = jax.random.split(jax.random.fold_in(step_key, len(trajectory) - 1))
      logits = ref_logits(model, prompt, valid, x)
      if icfg.cfg_scale > 0:
        uncond = ref_logits(model, np.where(valid, MASK, prompt), valid, x)
        logits = uncond + (icfg.cfg_scale + 1) * (logits - uncond)
      # Only the current block is predicted (the noise is drawn for its columns alone).
      pred, conf = np.zeros((B, A), int), np.zeros((B, A))
      pred[:, cols], conf[:, cols], _ = ref_predict(logits[:, cols], icfg.temperature, gumbel_key)
      score = np.asarray(jax.random.uniform(conf_key, (B, A))) if icfg.remasking == "random" else conf
      for r in range(B):
        masks = [j for j in cols if x[r, j] == MASK]
        chosen = ref_top(masks, lambda j: -score[r, j], max(schedules[r][i], 1 if parallel else 0))
        chosen += [j for j in ref_parallel(masks, conf[r], icfg) if j not in chosen]
        x[r, chosen] = pred[r, chosen]
      trajectory.append(x.copy())
      if parallel and not np.any(x[:, cols] == MASK):  # the whole batch is done with this block
        break
  passes = len(trajectory) - 1
  trajectory += [x.copy()] * (icfg.steps + 1 - len(trajectory))
  return np.stack(trajectory), passes


def ref_flowlm_choose(strategy, x, pred, conf, probs, icfg, fill_schedule, t):
  """(positions to rewrite, has candidates) of one row under `strategy`."""
  A, k, thr = len(x), icfg.max_replacements, icfg.confidence_threshold
  masks = [j for j in range(A) if x[j] == MASK]
  if strategy == "below_threshold":
    below = [j for j in range(A) if x[j] != MASK and conf[j] < thr]
    chosen = ref_top(masks, lambda j: -conf[j], k)
    chosen += ref_top(below, lambda j: conf[j], k - len(chosen))
    candidates = masks + below
  elif strategy == "most_confident_changes":
    candidates = [j for j in range(A) if x[j] == MASK or (pred[j] != x[j] and conf[j] >= thr)]
    chosen = ref_top(candidates, lambda j: -conf[j], k)
  else:
    current = probs[np.arange(A), x]
    refinable = [j for j in range(A) if x[j] != MASK and current[j] < thr and pred[j] != x[j]]
    chosen = ref_top(masks, lambda j: -conf[j], fill_schedule[t] if t < len(fill_schedule) else 0)
    chosen += ref_top(refinable, lambda j: current[j], k)
    candidates = masks + refinable
  chosen += [j for j in ref_parallel(candidates, conf, icfg) if j not in chosen]
  return chosen, bool(candidates)


def ref_flowlm(graphdef, params, prompt_ids, key, icfg):
  model = (graphdef, params)
  prompt, valid = ref_left_pad(prompt_ids)
  B, A, S = len(prompt_ids), icfg.answer_length, icfg.max_steps
  init_key, step_key = jax.random.split(key)
  if icfg.initial_answer == "mask":
    x = np.full((B, A), MASK)
  else:
    ids = VOCAB.random_token_ids
    x = ids[np.asarray(jax.random.randint(init_key, (B, A), 0, len(ids)))]
  schedules = [ref_schedule(int(np.sum(row == MASK)), min(icfg.steps, S)) for row in x]
  done, steps = np.zeros(B, bool), np.full(B, S)
  trajectory = [x.copy()]
  for t in range(S):
    if done.all():
      break
    gumbel_key, _ = jax.random.split(jax.random.fold_in(step_key, t))
    pred, conf, probs = ref_predict(ref_logits(model, prompt, valid, x), icfg.temperature, gumbel_key)
    new = x.copy()
    for r in range(B):
      if done[r]:
        continue
      chosen, has_candidates = ref_flowlm_choose(icfg.replacement_strategy, x[r], pred[r], conf[r], probs[r], icfg,
                                                 schedules[r], t)
      if t == S - 1:
        chosen += [j for j in range(A) if x[r, j] == MASK]
      new[r, chosen] = pred[r, chosen]
      if not has_candidates or (icfg.temperature == 0 and np.array_equal(new[r], x[r])):
        done[r], steps[r] = True, t
    x = new
    trajectory.append(x.copy())
  trajectory += [x.copy()] * (S + 1 - len(trajectory))
  return np.stack(trajectory), steps


# --- compiled == reference --------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(),
    LLADA_RANDOM,
    LLADA_PARALLEL,
    dict(LLADA_RANDOM, parallel_threshold=0.3),
    LLADA_FACTOR,
    dict(LLADA_RANDOM, parallel_factor=2.0),
], ids=["greedy", "blocks-random-temperature-cfg", "blocks-parallel", "blocks-random-temperature-cfg-parallel",
        "blocks-factor", "blocks-random-temperature-cfg-factor"])
def test_llada_matches_reference(overrides):
  """cache=none, parallel_threshold=0 (the first two) is the sampler as it was before those options."""
  graphdef, params = params_at(30.0)
  icfg = inference_config(**overrides)
  key = jax.random.key(3)
  out = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="llada", key=key, return_trajectory=True)
  trajectory, passes = ref_llada(graphdef, params, PROMPTS, key, icfg)
  np.testing.assert_array_equal(out.trajectory, trajectory)
  np.testing.assert_array_equal(out.passes, passes)
  np.testing.assert_array_equal(out.full_passes, passes)  # no cache: every pass runs whole rows


@pytest.mark.parametrize("strategy, overrides", FLOWLM_CASES + FLOWLM_PARALLEL_CASES + FLOWLM_FACTOR_CASES,
                         ids=FLOWLM_IDS + [f"{s}-parallel" for s in STRATEGIES] + [f"{s}-factor" for s in STRATEGIES])
def test_flowlm_matches_reference(strategy, overrides):
  graphdef, params = params_at(30.0)
  icfg = inference_config(**{"replacement_strategy": strategy, **overrides})
  key = jax.random.key(4)
  out = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="flowlm", key=key, return_trajectory=True)
  trajectory, steps = ref_flowlm(graphdef, params, PROMPTS, key, icfg)
  np.testing.assert_array_equal(out.trajectory, trajectory)
  np.testing.assert_array_equal(out.steps, steps)
  np.testing.assert_array_equal(out.answer, trajectory[-1])
  np.testing.assert_array_equal(out.passes, np.minimum(steps + 1, icfg.max_steps))


# --- LLaDA invariants -------------------------------------------------------------------------


def test_transfer_count_is_llada_schedule():
  for count, steps in [(8, 8), (8, 3), (3, 8), (10, 4), (0, 2)]:
    got = [int(sampling.transfer_count(jnp.array([count]), steps, i)[0]) for i in range(steps + 1)]
    assert got == ref_schedule(count, steps) + [0], (count, steps)


def test_llada_invariants():
  graphdef, params = params_at(30.0)
  icfg = inference_config(answer_length=8, block_length=4, steps=6)
  out = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="llada", return_trajectory=True)
  P = out.tokens.shape[1] - icfg.answer_length
  for row, prompt in zip(out.tokens, PROMPTS):  # the prompt comes back as it went in, left-padded
    assert row[P - len(prompt):P].tolist() == prompt and np.all(row[:P - len(prompt)] == VOCAB.pad_id)
  traj = out.trajectory  # [7, B, 8]; 3 steps per block of 4: commits 2, 1, 1
  filled = traj != MASK
  assert np.all(filled[1:] >= filled[:-1]), "a committed token was re-masked"
  assert np.all((traj[1:] == traj[:-1]) | ~filled[:-1]), "a committed token changed"
  per_step = (filled[1:] & ~filled[:-1]).sum(-1)  # [steps, B]
  np.testing.assert_array_equal(per_step, np.array([[2], [1], [1], [2], [1], [1]]).repeat(len(PROMPTS), 1))
  assert not filled[1:4, :, 4:].any(), "the second block started before the first was done"
  assert filled[3, :, :4].all()
  assert not np.any(out.answer == MASK)
  np.testing.assert_array_equal(out.steps, 6)


def test_llada_cfg_changes_the_answer():
  graphdef, params = params_at(30.0)
  run = lambda icfg: sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="llada", key=jax.random.key(3),
                                       return_trajectory=True)
  plain, guided = run(inference_config()), run(inference_config(cfg_scale=3.0))
  assert not np.array_equal(plain.answer, guided.answer)
  assert not np.any(guided.answer == MASK)


# --- FlowLM invariants ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, overrides", FLOWLM_CASES, ids=FLOWLM_IDS)
def test_flowlm_respects_strategy_rules(strategy, overrides):
  """Each step's rewrites obey the strategy, judged by the model's probabilities at that step."""
  graphdef, params = params_at(30.0)
  icfg = inference_config(**{"replacement_strategy": strategy, **overrides})
  key = jax.random.key(4)  # the same run as the reference test: the compiled sampler is cached
  out = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="flowlm", key=key, return_trajectory=True)
  prompt, valid = ref_left_pad(PROMPTS)
  _, step_key = jax.random.split(key)
  thr, rewrites = icfg.confidence_threshold, 0
  for t in range(icfg.max_steps):
    before, after = out.trajectory[t], out.trajectory[t + 1]
    gumbel_key, _ = jax.random.split(jax.random.fold_in(step_key, t))
    pred, conf, probs = ref_predict(ref_logits((graphdef, params), prompt, valid, before), icfg.temperature, gumbel_key)
    current = np.take_along_axis(probs, before[..., None], -1)[..., 0]
    changed = after != before
    rewritten = changed & (before != MASK)  # a real token replaced (not a [MASK] filled)
    np.testing.assert_array_equal(after[changed], pred[changed])  # a change writes the prediction
    capped = rewritten if strategy == "fill_then_refine" else changed  # fill_then_refine fills on a schedule
    if t < icfg.max_steps - 1:  # the last step may also fill leftover [MASK]s
      assert np.all(capped.sum(-1) <= icfg.max_replacements), t
    rule = {"below_threshold": conf < thr, "most_confident_changes": conf >= thr,
            "fill_then_refine": current < thr}[strategy]
    assert np.all(rule[rewritten]), t
    if strategy == "below_threshold":  # [MASK]s go first
      assert not np.any(rewritten.any(-1) & (after == MASK).any(-1)), t
    assert not changed[out.steps <= t].any(), "a stopped row changed"
    rewrites += rewritten.sum()
  assert rewrites > 0, "no real token was ever rewritten: the test exercises nothing"
  assert not np.any(out.answer == MASK)


@functools.lru_cache(maxsize=None)
def self_consistent_params():
  """Output matrix = embedding^T x 30: a filled position confidently predicts its own token (p ~ 1)."""
  graphdef, params = tiny_model()
  return graphdef, {**params, "unembed": params["embed"].T * 30}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flowlm_fills_every_mask_and_stops_when_confident(strategy):
  graphdef, params = self_consistent_params()
  icfg = inference_config(replacement_strategy=strategy)  # the reference tests' config: no recompile
  out = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="flowlm", key=jax.random.key(4),
                          return_trajectory=True)
  assert not np.any(out.answer == MASK)
  assert np.all(out.steps < icfg.max_steps), out.steps
  # A stopped row's answer is the trajectory entry at its step and never changes afterwards.
  for r, s in enumerate(out.steps):
    assert np.all(out.trajectory[s:, r] == out.answer[r])


def test_flowlm_fills_leftover_masks_at_the_last_step():
  graphdef, params = params_at(30.0)
  icfg = inference_config(replacement_strategy="most_confident_changes", max_replacements=1, max_steps=3)
  out = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="flowlm", return_trajectory=True)
  assert np.all((out.trajectory[2] == MASK).any(-1)), "the budget should leave [MASK]s for the last step"
  assert not np.any(out.answer == MASK)


# --- batching, determinism --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["llada", "flowlm"])
def test_batched_mixed_lengths_match_each_prompt_alone(mode):
  graphdef, params = params_at(30.0)
  run = lambda prompts: sampling.generate(graphdef, params, prompts, VOCAB, inference_config(), mode=mode,
                                          return_trajectory=True).trajectory
  together = run(PROMPTS)  # prompt lengths 4, 12, 8: 12, 4 and 8 [PAD]s here; 4, 4 and none alone
  for row, prompt in enumerate(PROMPTS):
    np.testing.assert_array_equal(run([prompt])[:, 0], together[:, row])


@pytest.mark.parametrize("mode, overrides", [("llada", LLADA_RANDOM), ("flowlm", FLOWLM_RANDOM)])
def test_deterministic_given_key(mode, overrides):
  graphdef, params = params_at(30.0)
  icfg = inference_config(**overrides)
  run = lambda seed: sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode=mode, key=jax.random.key(seed),
                                       return_trajectory=True).answer
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


# --- text API and evaluation ------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype, atol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_decoding_model_casts_and_unstacks_once_with_the_same_logits(compute_dtype, atol):
  graphdef, params = build(ModelConfig(vocab_size=64, num_real_tokens=60, d_model=32, n_layers=2, n_heads=2,
                                       n_kv_heads=2, d_ff=64, compute_dtype=compute_dtype))
  model, layers = sampling.decoding_model(graphdef, params)
  assert {w.dtype for w in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(compute_dtype)}
  assert len(layers) == 2 and layers[1]["wq"].shape == params["wq"].shape[1:]
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 60, (2, 12)), jnp.int32)
  reference = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))(params)
  decoded = jax.jit(lambda: model.logits_from_hidden(model.hidden(tokens, layers=layers)))()
  np.testing.assert_allclose(np.asarray(decoded)[..., :60], np.asarray(reference)[..., :60], atol=atol, rtol=0)


def test_argmax_and_logsumexp_match_numpy_with_ties_and_banned_entries():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 5, (3, 7, 50)).astype(np.float32)
  logits[..., :2] = NEG_INF                          # banned ids
  logits[0, 0, 10] = logits[0, 0, 30] = 100.0       # a tie: the lower index wins
  scores = logits + rng.normal(0, 1, logits.shape).astype(np.float32)
  argmax, log_z = sampling.argmax_and_logsumexp(jnp.asarray(scores), jnp.asarray(logits))
  np.testing.assert_array_equal(argmax, scores.argmax(-1))
  m = logits.max(-1, keepdims=True)
  np.testing.assert_allclose(log_z, (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0], rtol=1e-6)
  assert int(sampling.argmax_and_logsumexp(jnp.asarray(logits), jnp.asarray(logits))[0][0, 0]) == 10


def test_answer_ids_stop_at_eos_and_keep_other_specials():
  assert sampling.answer_ids(np.array([7, 4, 8, VOCAB.eos_id, 9]), VOCAB) == [7, 4, 8]  # 4: a special, kept
  assert sampling.answer_ids(np.array([7, VOCAB.pad_id, 9]), VOCAB) == [7]
  assert sampling.answer_ids(np.array([7, 8, 9]), VOCAB) == [7, 8, 9]
  assert sampling.answer_ids(np.array([7, 8, 9]), VOCAB, end_id=8) == [7]  # a chat template's end of turn


def test_evaluate_tasks_runs_and_prints_table(tokenizer, vocab):
  graphdef, params = build(ModelConfig(vocab_size=vocab.size, num_real_tokens=vocab.size, d_model=32, n_layers=1,
                                       n_heads=2, n_kv_heads=2, d_ff=64, compute_dtype="float32"))
  config = config_lib.apply_variant(config_lib.base_config(), "tasks")
  run = types.SimpleNamespace(config=config, graphdef=graphdef, params=params, tokenizer=tokenizer, vocab=vocab)
  records = evaluate.load_records(limit_per_task=2)
  assert [r["task"] for r in records] == ["add"] * 2 + ["reverse"] * 2 + ["sort"] * 2 + ["copy"] * 2
  result = evaluate.evaluate_tasks(run, records, steps=4)
  assert result["counts"] == {"add": 2, "reverse": 2, "sort": 2, "copy": 2, "overall": 8}
  for mode in evaluate.MODES:
    assert set(result["accuracy"][mode]) == set(result["counts"])
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"][mode].values())
    assert len(result["answers"][mode]) == 8 and all(isinstance(a, str) for a in result["answers"][mode])
  table = evaluate.format_table(result)
  assert "overall" in table and "llada" in table and "flowlm" in table


def test_exact_match_counts_only_answers_equal_to_the_records_up_to_surrounding_space():
  records = [{"task": "add", "prompt": "add 1 2", "answer": "3"}, {"task": "add", "prompt": "add 2 2", "answer": "4"},
             {"task": "sort", "prompt": "sort 2 1", "answer": "1 2"},
             {"task": "sort", "prompt": "sort 3 1", "answer": "1 3"}]
  answers = [" 3 ", "5", "1 2", "1 3 3"]  # right (padded), wrong, right, a prefix match is wrong
  assert evaluate.exact_match(records, answers) == {"add": 0.5, "sort": 0.5, "overall": 0.5}
  assert evaluate.exact_match(records, ["3", "4", "1 2", "1 3"])["overall"] == 1.0
  assert evaluate.exact_match(records, ["", "", "", ""]) == {"add": 0.0, "sort": 0.0, "overall": 0.0}


def test_evaluate_tasks_scores_the_samplers_answers(tokenizer, vocab, monkeypatch):
  records = evaluate.load_records(limit_per_task=1)
  right = {r["prompt"]: r["answer"] for r in records}
  # An oracle sampler for LLaDA decoding, a wrong one for FlowLM decoding.
  monkeypatch.setattr(sampling, "generate_texts", lambda graphdef, params, tok, voc, prompts, icfg, mode, chat,
                      batch_size: [right[p] if mode == "llada" else "wrong" for p in prompts])
  run = types.SimpleNamespace(config=config_lib.apply_variant(config_lib.base_config(), "tasks"), graphdef=None,
                              params=None, tokenizer=tokenizer, vocab=vocab)
  result = evaluate.evaluate_tasks(run, records, steps=4)
  assert result["accuracy"]["llada"] == {"add": 1.0, "reverse": 1.0, "sort": 1.0, "copy": 1.0, "overall": 1.0}
  assert result["accuracy"]["flowlm"] == {"add": 0.0, "reverse": 0.0, "sort": 0.0, "copy": 0.0, "overall": 0.0}


def test_sample_cli_maps_flags_to_inference_fields():
  args = sample.parse_args(["--workdir=w", "--prompt", "a", "--prompt", "b", "--steps=6", "--gen_length=4",
                            "--threshold=0.8", "--strategy=fill_then_refine"])
  assert args.prompt == ["a", "b"]
  icfg = sampling.run_config(inference_config(), **sample.overrides_of(args))
  assert (icfg.steps, icfg.max_steps, icfg.answer_length) == (6, 6, 4)
  assert (icfg.confidence_threshold, icfg.replacement_strategy) == (0.8, "fill_then_refine")
  assert sample.overrides_of(sample.parse_args(["--workdir=w", "--steps=6", "--max_steps=9"]))["max_steps"] == 9


# --- fast decoding: key/value cache and parallel threshold ------------------------------------


FAST = dict(answer_length=8, block_length=4, steps=8)  # 2 blocks of 4 steps


def run_fast(mode, params=None, **overrides):
  graphdef, params = params or params_at(30.0)
  return sampling.generate(graphdef, params, PROMPTS, VOCAB, inference_config(**{**FAST, **overrides}), mode=mode,
                           key=jax.random.key(3), return_trajectory=True)


@pytest.mark.parametrize("mode, overrides", [("llada", {}), ("llada", dict(cache="dual")), ("flowlm", {})],
                         ids=["llada", "llada-dual", "flowlm"])
def test_masked_and_unmasked_programs_decode_a_prompt_that_fills_its_bucket_alike(mode, overrides):
  """padded=True (one compiled sampler for every call with a bucket) on a prompt without [PAD]s: the answers of
  the unmasked program generate picks for it by default. padded=False on a padded prompt is refused."""
  graphdef, params = params_at(30.0)
  filling = [PROMPTS[2]]  # 8 tokens: the bucket of 8
  run = lambda prompts, padded: sampling.generate(graphdef, params, prompts, VOCAB,
                                                  inference_config(**{**FAST, **overrides}), mode=mode,
                                                  key=jax.random.key(5), padded=padded)
  np.testing.assert_array_equal(run(filling, True).answer, run(filling, None).answer)
  with pytest.raises(ValueError, match="padded=False, but some prompt is shorter than the bucket"):
    run([PROMPTS[0]], False)


@pytest.mark.parametrize("mode", ["llada", "flowlm"])
def test_batched_generation_compiles_one_sampler_for_prompts_of_every_length(mode, caplog):
  """generate_batched gives every batch the longest prompt's width and the masked program: batches of 4-, 12- and
  8-token prompts share one compile (three before: one per bucket, padded or not), and each answer is the
  one `generate` gives its prompt alone."""
  graphdef, params = params_at(30.0)
  icfg = inference_config(answer_length=24, block_length=8, steps=12)  # a shape no other test compiles
  with jit_compiles(caplog, f"{mode}_sample") as compiles:
    batched = sampling.generate_batched(graphdef, params, PROMPTS, VOCAB, icfg, mode=mode, batch_size=1)
  assert len(compiles) == 1 and batched.shape == (3, 24)
  alone = [sampling.generate(graphdef, params, [p], VOCAB, icfg, mode=mode).answer[0] for p in PROMPTS]
  np.testing.assert_array_equal(batched, np.stack(alone))
  assert sampling.generate_batched(graphdef, params, [], VOCAB, icfg, mode=mode, batch_size=2).shape == (0, 24)
  # Guidance and the dual cache, a smaller last batch: two programs (2 rows, 1 row), the same answers.
  guided = inference_config(answer_length=24, block_length=8, steps=12, cache="dual", cfg_scale=1.0)
  with jit_compiles(caplog, f"{mode}_sample") as compiles:
    batched = sampling.generate_batched(graphdef, params, PROMPTS, VOCAB, guided, mode=mode, batch_size=2)
  assert len(compiles) == 2
  alone = [sampling.generate(graphdef, params, [p], VOCAB, guided, mode=mode).answer[0] for p in PROMPTS]
  np.testing.assert_array_equal(batched, np.stack(alone))
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    sampling.generate_batched(graphdef, params, PROMPTS, VOCAB, icfg, mode=mode, batch_size=0)


@pytest.mark.parametrize("mode, overrides", [("llada", dict(temperature=0.8)), ("flowlm", dict(initial_answer="random"))])
def test_each_batch_draws_its_own_noise(mode, overrides):
  """The same prompt in two batches gets two samples (one key for every batch gave row r of each the same draws);
  the first batch keeps `generate`'s."""
  graphdef, params = params_at(30.0)
  icfg = inference_config(**overrides)
  prompts = [PROMPTS[0]] * 4
  batched = sampling.generate_batched(graphdef, params, prompts, VOCAB, icfg, mode=mode, batch_size=2,
                                      key=jax.random.key(4))
  first = sampling.generate(graphdef, params, prompts[:2], VOCAB, icfg, mode=mode, key=jax.random.key(4), padded=True)
  np.testing.assert_array_equal(batched[:2], first.answer)
  assert not np.array_equal(batched[:2], batched[2:]), batched


@pytest.mark.parametrize("mode, overrides", [
    ("llada", dict(cache="prefix", cache_refresh=1)), ("llada", dict(cache="dual", cache_refresh=1)),
    ("llada", dict(parallel_threshold=1.0)), ("flowlm", dict(cache="prefix", cache_refresh=1)),
    ("flowlm", dict(parallel_threshold=1.0))], ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_cache_refreshed_every_step_or_threshold_one_equals_the_plain_sampler(mode, overrides):
  """A cache refreshed at every step is never used; no confidence is above 1.0."""
  plain, fast = run_fast(mode), run_fast(mode, **overrides)
  np.testing.assert_array_equal(fast.trajectory, plain.trajectory)
  np.testing.assert_array_equal(fast.passes, plain.passes)


@functools.lru_cache(maxsize=None)
def one_layer_params():
  graphdef, params = build(ModelConfig(vocab_size=64, num_real_tokens=60, d_model=32, n_layers=1, n_heads=2,
                                       n_kv_heads=2, d_ff=64, compute_dtype="float32"))
  return graphdef, {name: w if "norm" in name else w * (300 if name == "unembed" else 10) for name, w in params.items()}


@pytest.mark.parametrize("mode, overrides", [
    ("llada", dict(cache="prefix", block_length=0)), ("llada", dict(cache="prefix")), ("llada", dict(cache="dual")),
    ("flowlm", dict(cache="dual"))], ids=["llada-prefix-one-block", "llada-prefix", "llada-dual", "flowlm"])
def test_caches_are_exact_for_a_one_layer_model(mode, overrides):
  """With one layer a column's keys/values depend on its own token only; the columns a cache keeps (prompt,
  finished blocks, later all-[MASK] blocks) do not change between refreshes, so nothing is approximated.
  (With more layers every column sees the whole row and the cache is an approximation.)"""
  plain = run_fast(mode, one_layer_params(), **{k: v for k, v in overrides.items() if k != "cache"})
  cached = run_fast(mode, one_layer_params(), **overrides)
  np.testing.assert_array_equal(cached.trajectory, plain.trajectory)
  assert np.all(cached.full_passes < cached.passes), "the cache was never used"


def rows_and_answer():
  from flowlm_jax.decoding_passes import Rows

  graphdef, params = params_at(30.0)
  model, layers = sampling.decoding_model(graphdef, params)
  prompt_BxP, length_B = sampling.pad_prompts(PROMPTS, VOCAB.pad_id)
  rows = Rows(model, layers, jnp.asarray(prompt_BxP), jnp.asarray(length_B), padded=True)
  answer_BxA = np.full((len(PROMPTS), 8), MASK, np.int32)
  answer_BxA[:, :4] = np.random.default_rng(0).integers(5, 60, (len(PROMPTS), 4))  # block 0 finished
  return params, rows, jnp.asarray(answer_BxA)


def test_refresh_keeps_every_columns_keys_values_of_a_fresh_pass():
  """Layer 0's keys are rope(rms_norm(embedding) @ wk) of each column, at the row's positions."""
  from flowlm_jax.models.layers import apply_rope, rms_norm, rope_tables

  params, rows, answer_BxA = rows_and_answer()
  _, cache = jax.jit(lambda a: rows.refresh(a, 0, 8))(answer_BxA)
  tokens_BxT = jnp.concatenate([answer_BxA, rows.prompt_BxP], axis=1)
  positions_BxT = jnp.concatenate([rows.length_B[:, None] + jnp.arange(8),
                                   jnp.broadcast_to(jnp.arange(rows.prompt_BxP.shape[1]), rows.prompt_BxP.shape)], 1)
  h = rms_norm(params["embed"][tokens_BxT], params["attn_norm"][0], 1e-5)
  keys = apply_rope(jnp.einsum("btd,dhk->bthk", h, params["wk"][0]), *rope_tables(positions_BxT, 16, 10000.0))
  np.testing.assert_allclose(cache.keys[0], keys, atol=1e-5)
  assert len(cache.keys) == len(cache.values) == 2 and cache.values[1].shape == keys.shape


@pytest.mark.parametrize("start, query", [(0, 4), (4, 4), (0, 8)], ids=["dual-block-0", "block-1", "prefix-block-0"])
def test_a_slice_pass_against_an_up_to_date_cache_is_the_full_pass(start, query):
  """Nothing changed since the refresh: the slice's logits are the whole rows' and only its columns are
  rewritten (with the same keys/values)."""
  _, rows, answer_BxA = rows_and_answer()
  logits, cache = jax.jit(lambda a: rows.refresh(a, 0, 8))(answer_BxA)
  sliced, updated = jax.jit(lambda a, c: rows.from_cache(a, c, start, query, 4))(answer_BxA, cache)
  np.testing.assert_allclose(sliced, logits[:, start:start + 4], atol=1e-4, rtol=1e-5)
  for before, after in zip(cache.keys + cache.values, updated.keys + updated.values):
    outside = np.ones(before.shape[1], bool)
    outside[start:start + query] = False
    np.testing.assert_array_equal(after[:, outside], before[:, outside])
    np.testing.assert_allclose(after[:, start:start + query], before[:, start:start + query], atol=1e-5)


@pytest.mark.parametrize("rule", [LLADA_PARALLEL, LLADA_FACTOR], ids=["threshold", "factor"])
def test_parallel_decoding_commits_at_least_one_and_ends_blocks_early(rule):
  """Every step commits >= max(1, schedule) [MASK]s of the current block in each row that has one, never
  more than it holds; a block ends when no row has a [MASK] left in it; no [MASK] at the end."""
  out = run_fast("llada", **rule)  # the reference test's run (no recompile)
  traj, L, passes = out.trajectory, 4, int(out.passes[0])
  assert 2 <= passes < 8, passes
  block = 0
  for t in range(passes):
    before, after = traj[t, :, block * L:(block + 1) * L], traj[t + 1, :, block * L:(block + 1) * L]
    masks, committed = (before == MASK).sum(-1), ((before == MASK) & (after != MASK)).sum(-1)
    assert np.all(committed[masks > 0] >= 1) and np.all(committed <= masks), t
    assert np.array_equal(np.delete(traj[t + 1], np.s_[block * L:(block + 1) * L], 1),
                          np.delete(traj[t], np.s_[block * L:(block + 1) * L], 1)), "a column outside the block changed"
    block += not np.any(after == MASK)
  assert block == 2 and not np.any(out.answer == MASK)
  assert np.all(traj[passes:] == out.answer)


@pytest.mark.parametrize("overrides, full", [
    (dict(cache="prefix"), 2), (dict(cache="dual", cache_refresh=3), 4), (dict(cache="dual", **LLADA_PARALLEL), 2)],
    ids=["prefix", "dual-refresh-3", "dual-parallel"])
def test_llada_full_passes_are_one_per_block_plus_the_periodic_refreshes(overrides, full):
  out = run_fast("llada", **overrides)  # 4 steps per block; refresh every 3 steps: at steps 0 and 3 of each block
  assert np.all(out.full_passes == full)
  assert np.all(out.passes == (8 if "parallel_threshold" not in overrides else run_fast("llada", **LLADA_PARALLEL).passes))
  assert not np.any(out.answer == MASK)


def test_flowlm_cache_refresh_0_is_the_default_period_not_a_cache_computed_once():
  period = sampling.FLOWLM_CACHE_REFRESH
  default, explicit, once = (run_fast("flowlm", cache="prefix", cache_refresh=r, max_steps=3 * period)
                             for r in (0, period, 3 * period))
  assert default.passes.max() > period, default.passes  # some row runs past its first period
  for name in ("answer", "passes", "full_passes", "trajectory"):
    np.testing.assert_array_equal(getattr(default, name), getattr(explicit, name), err_msg=name)
  assert np.any(default.full_passes > once.full_passes), (default.full_passes, once.full_passes)


@pytest.mark.parametrize("refresh", [0, 3])
def test_flowlm_full_passes_are_the_refresh_steps_among_each_rows_passes(refresh):
  period = refresh or sampling.FLOWLM_CACHE_REFRESH
  out = run_fast("flowlm", cache="prefix", cache_refresh=refresh, max_steps=3 * period)
  np.testing.assert_array_equal(out.full_passes, -(-out.passes // period))  # steps 0, k, 2k, ... of its passes


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_a_greedy_flowlm_answer_does_not_depend_on_the_rest_of_the_batch(cache):
  graphdef, params = params_at(30.0)
  icfg = inference_config(answer_length=16, max_steps=32, cache=cache, cache_refresh=4)
  batched = sampling.generate(graphdef, params, PROMPTS, VOCAB, icfg, mode="flowlm", key=jax.random.key(0))
  for i, prompt in enumerate(PROMPTS):
    alone = sampling.generate(graphdef, params, [prompt], VOCAB, icfg, mode="flowlm", key=jax.random.key(0))
    np.testing.assert_array_equal(alone.answer[0], batched.answer[i])
    assert (alone.steps[0], alone.full_passes[0]) == (batched.steps[i], batched.full_passes[i])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("refresh", [0, 4])
def test_a_row_the_cached_flowlm_sampler_calls_final_is_final_for_a_full_pass(strategy, refresh):
  """Greedy: a row stops only when a full pass finds nothing to do with its answer (the cached prompt is stale, so
  a cached pass finding nothing proves nothing). The uncached sampler started from that answer stops at once."""
  icfg = inference_config(answer_length=16, max_steps=32, replacement_strategy=strategy, cache="prefix",
                          cache_refresh=refresh)
  graphdef, params = params_at(30.0)
  prompts = PROMPTS * 2
  out = sampling.generate(graphdef, params, prompts, VOCAB, icfg, mode="flowlm", key=jax.random.key(0))
  stopped = out.steps < icfg.max_steps
  assert stopped.sum() >= len(prompts) // 2, out.steps
  assert np.all(out.steps[stopped] % (refresh or sampling.FLOWLM_CACHE_REFRESH) == 0), out.steps  # on a full pass
  again = sampling.generate(graphdef, params, prompts, VOCAB, sampling.run_config(icfg, cache="none"), mode="flowlm",
                            key=jax.random.key(0), initial_BxA=out.answer)
  np.testing.assert_array_equal(again.steps[stopped], 0)
  np.testing.assert_array_equal(again.answer[stopped], out.answer[stopped])


@pytest.mark.parametrize("rule", [dict(parallel_threshold=0.3), dict(parallel_factor=2.0)], ids=["threshold", "factor"])
def test_flowlm_parallel_decoding_takes_fewer_passes(rule):
  plain, fast = run_fast("flowlm"), run_fast("flowlm", **rule)
  assert fast.passes.sum() < plain.passes.sum(), (fast.passes, plain.passes)
  assert not np.any(fast.answer == MASK)


def test_factor_rule_commits_the_longest_run_whose_nth_clears_its_bar():
  """The n-th most confident eligible position must have conf >= 1 - factor / (n + 1): with factor 1 the bars
  are 0.5, 0.667, 0.75, 0.8, ...; the count stops at the first miss (no later one can clear its own bar: sorted
  confidences fall while the bar rises); 0 where the most confident misses or nothing is eligible."""
  conf = jnp.array([[0.70, 0.99, 0.60, 0.90, 0.10, 0.95],    # sorted .99 .95 .90 .70: bars .5 .667 .75 .8 -> 3
                    [0.40, 0.30, 0.20, 0.10, 0.05, 0.01],    # the best misses 0.5
                    [0.99, 0.99, 0.99, 0.99, 0.99, 0.99],    # ineligible but the first two
                    [0.99, 0.99, 0.99, 0.99, 0.99, 0.99]])   # nothing eligible
  eligible = jnp.array([[True] * 6, [True] * 6, [True, True] + [False] * 4, [False] * 6])
  np.testing.assert_array_equal(sampling.parallel_count(conf, eligible, 1.0), [3, 0, 2, 0])
  np.testing.assert_array_equal(sampling.parallel_count(conf, eligible, 0.1), [1, 0, 2, 0])  # bars .95 .967: .99, then .95 misses
  np.testing.assert_array_equal(sampling.parallel_count(conf, eligible, 4.0), [5, 3, 2, 0])


@pytest.mark.parametrize("mode, overrides", [
    ("llada", LLADA_RANDOM), ("llada", dict(block_length=4)),
    *[("flowlm", dict(replacement_strategy=s)) for s in STRATEGIES]],
    ids=["llada-random", "llada", *[f"flowlm-{s}" for s in STRATEGIES]])
def test_a_factor_nothing_clears_adds_nothing_to_either_sampler(mode, overrides):
  """Like a threshold of 1.0: a rule that no confidence passes commits nothing beyond the sampler's own choice
  (the logits scaled down: every confidence is below 0.05, every bar of factor 0.5 above 0.75). With random
  remasking a forced most-confident token would be a second commit beside the schedule's random one."""
  params = params_at(3.0)
  plain, fast = run_fast(mode, params, **overrides), run_fast(mode, params, parallel_factor=0.5, **overrides)
  np.testing.assert_array_equal(fast.trajectory, plain.trajectory)
  np.testing.assert_array_equal(fast.passes, plain.passes)


@pytest.mark.parametrize("mode", ["llada", "flowlm"])
def test_cached_parallel_sampler_is_one_compiled_loop_without_host_callbacks(mode):
  import re

  graphdef, params = params_at(30.0)
  icfg = inference_config(**FAST, cache="prefix", parallel_threshold=0.5)
  spec = (sampling.LladaSpec if mode == "llada" else sampling.FlowSpec).from_config(icfg, VOCAB)
  fn = (sampling.llada_sample if mode == "llada" else sampling.flowlm_sample).__wrapped__
  prompt_BxP, length_B = sampling.pad_prompts(PROMPTS, VOCAB.pad_id)
  text = jax.jit(fn, static_argnames=("graphdef", "spec", "padded")).lower(
      graphdef, params, prompt_BxP, length_B, jax.random.key(0), spec=spec, padded=True).as_text()
  assert not [t for t in re.findall(r"custom_call @([\w.]+)", text) if "callback" in t]
  main = text[text.index("func.func public @main"):]
  main = main[:main.index("\n  }\n")]
  assert main.count("stablehlo.while") == 1, "the decoding steps are not one loop"


@pytest.mark.parametrize("spec, overrides, message", [
    ("llada", dict(block_length=-1), "block_length must be > 0"),
    ("llada", dict(cfg_scale=-2.0), "cfg_scale must be >= 0"),
    ("llada", dict(temperature=-1.0), "temperature must be >= 0"),
    ("flowlm", dict(temperature=float("nan")), "temperature must be >= 0"),
    ("flowlm", dict(confidence_threshold=1.5), "confidence_threshold must be in [0, 1]"),
])
def test_sampler_options_the_config_would_refuse_are_refused_by_the_sampler_too(spec, overrides, message):
  """`sample` and `run_config` overrides reach the samplers without config.validate: before, these decoded greedily
  or without guidance (a negative or NaN temperature, a negative cfg_scale) or failed inside the trace."""
  cls = sampling.LladaSpec if spec == "llada" else sampling.FlowSpec
  with pytest.raises(ValueError, match=re.escape(message)):
    cls.from_config(inference_config(**overrides), VOCAB)


def test_initial_answers_of_the_wrong_width_are_refused():
  graphdef, params = tiny_model()
  with pytest.raises(ValueError, match=re.escape("initial answers of shape (2, 12)")):
    sampling.generate(graphdef, params, [[5, 6, 3], [7, 3]], VOCAB, inference_config(), mode="flowlm",
                      initial_BxA=np.full((2, 12), 5, np.int32))


def test_bad_fast_options_fail_with_one_line_naming_them():
  with pytest.raises(ValueError, match="inference: unknown cache 'full'"):
    sampling.LladaSpec.from_config(inference_config(cache="full"), VOCAB)
  with pytest.raises(ValueError, match="parallel_threshold must be in"):
    sampling.FlowSpec.from_config(inference_config(parallel_threshold=1.5), VOCAB)
  with pytest.raises(ValueError, match="parallel_factor must be >= 0"):
    sampling.LladaSpec.from_config(inference_config(parallel_factor=-1.0), VOCAB)
  with pytest.raises(ValueError, match="set parallel_threshold or parallel_factor, not both"):
    sampling.FlowSpec.from_config(inference_config(parallel_threshold=0.9, parallel_factor=1.0), VOCAB)
  from flowlm_jax.decoding_passes import check_cacheable

  with pytest.raises(ValueError, match="model family object has no cached decoding"):
    check_cacheable(object(), "dual")
  check_cacheable(object(), "none")
