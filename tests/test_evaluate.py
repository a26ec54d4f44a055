"""Evaluation functions behind `python -m flowlm_jax.compare` (evaluate.py, compare.pool) that need no
trained model."""

import types

import numpy as np
import pytest
from flax import nnx

from flowlm_jax import compare, evaluate
from flowlm_jax import config as config_lib
from flowlm_jax.models import registry

RECORDS = [{"task": "add", "prompt": "add 1 2", "answer": "3"}, {"task": "sort", "prompt": "sort 2 1", "answer": "1 2"},
           {"task": "add", "prompt": "add 2 2", "answer": "4"}, {"task": "add", "prompt": "add 3 2", "answer": "5"},
           {"task": "sort", "prompt": "sort 3 1", "answer": "1 3"}, {"task": "add", "prompt": "add 0 3", "answer": "3"}]


def test_choice_candidates_put_the_answer_first_then_distinct_answers_after_it():
  adds = [r for r in RECORDS if r["task"] == "add"]
  assert evaluate.choice_candidates(adds, 3) == [["3", "4", "5"], ["4", "5", "3"], ["5", "3", "4"], ["3", "4", "5"]]
  other = evaluate.choice_candidates(RECORDS, 2, "other_tasks")
  assert other == [["3", "1 2"], ["1 2", "4"], ["4", "1 3"], ["5", "1 3"], ["1 3", "3"], ["3", "1 2"]]
  with pytest.raises(ValueError, match="fewer than 3"):
    evaluate.choice_candidates(RECORDS, 3)  # sort has only two distinct answers


def test_random_token_corruption_hits_the_rate_and_always_changes_the_token():
  rng = np.random.default_rng(0)
  random_ids = np.arange(10, 20)
  clean = rng.choice(random_ids, size=(200, 50)).astype(np.int32)
  start, wrong = evaluate.corrupt_with_random_tokens(clean, 0.3, random_ids, rng)
  assert abs(wrong.mean() - 0.3) < 0.02
  np.testing.assert_array_equal(start != clean, wrong)
  assert np.isin(start, random_ids).all()


def test_spread_is_mean_and_sample_std():
  assert evaluate.spread([1.0, 2.0, 4.0]) == pytest.approx(
      {"mean": 7 / 3, "std": np.std([1, 2, 4], ddof=1), "min": 1.0, "max": 4.0, "n": 3})
  assert evaluate.spread([0.5])["std"] == 0.0
  assert evaluate.spread([]) == {"n": 0}  # e.g. no position corrupted at some rate in any run


@pytest.fixture(scope="module")
def untrained_tasks_run(tokenizer, vocab):
  config = config_lib.apply_variant(config_lib.base_config(), "tasks")
  with config.unlocked():
    config.model.d_model, config.model.n_layers, config.model.d_ff = 32, 1, 64
    config.dataset.prompt_format = "plain"
  model = registry.create(registry.model_config(config.model, vocab), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  return types.SimpleNamespace(config=config, graphdef=graphdef, params=nnx.to_pure_dict(params), tokenizer=tokenizer,
                               vocab=vocab)


def test_clean_answers_are_the_training_rows_answer_part_then_eos(untrained_tasks_run, tokenizer, vocab):
  from flowlm_jax import sampling

  prompts, answers = evaluate.clean_answers(untrained_tasks_run, RECORDS[:2], 16)
  for record, prompt, answer in zip(RECORDS, prompts, answers):
    assert prompt == sampling.encode_prompt(tokenizer, record["prompt"], chat=False)
    ids = tokenizer.encode(record["answer"], add_special_tokens=False)
    np.testing.assert_array_equal(answer, ids + [vocab.eos_id] * (16 - len(ids)))
  assert evaluate.decode_answers(untrained_tasks_run, answers) == ["3", "1 2"]


def test_self_correction_starts_from_the_corrupted_answers(untrained_tasks_run):
  """With a confidence threshold of 0 no token is ever a candidate, so the refined answer is the corrupted
  start itself: nothing fixed, nothing broken, the same exact match before and after."""
  result = evaluate.self_correction(untrained_tasks_run, RECORDS, rates=(0.5,), steps=4, confidence_threshold=0.0)
  r = result["0.5"]
  assert (r["fixed"], r["broken"]) == (0.0, 0.0)
  assert r["exact_match"] == r["exact_match_before"] < 1.0
  assert r["wrong_tokens"] + r["right_tokens"] == len(RECORDS) * 16


def _run_result(accuracy, nats, fixed):
  bound = {"nats_per_token": nats, "nats_per_token_se": 0.01, "bits_per_byte": 2 * nats, "perplexity": 3 * nats}
  return {"bounds": {"mask": bound}, "multiple_choice": {"same_task": {"overall": accuracy}},
          "quality": {"llada": {"4": {"overall": [accuracy, accuracy + 0.1]}}},
          "self_correction": {"most_confident_changes": {
              "0": {"0.2": {"fixed": fixed, "broken": 0.1, "exact_match": 0.5, "exact_match_before": 0.2}},
              "1": {"0.2": {"fixed": None, "broken": 0.3, "exact_match": 0.7, "exact_match_before": 0.2}}}}}


def test_runs_sharing_a_label_are_pooled_over_runs_and_seeds():
  pooled = compare.pool([_run_result(0.2, 1.0, 0.4), _run_result(0.4, 2.0, 0.6)])
  assert pooled["runs"] == 2
  assert pooled["bounds"]["mask"]["mean"] == 1.5 and pooled["bounds"]["mask"]["error"] == pooled["bounds"]["mask"]["std"]
  assert pooled["quality"]["llada"]["4"] == pytest.approx(evaluate.spread([0.2, 0.3, 0.4, 0.5]))
  assert pooled["multiple_choice"]["same_task"]["mean"] == pytest.approx(0.3)
  sc = pooled["self_correction"]["most_confident_changes"]["0.2"]
  assert sc["fixed"] == pytest.approx(evaluate.spread([0.4, 0.6]))  # a seed without wrong tokens has no "fixed"
  assert sc["broken"]["n"] == 4
  assert pooled["bits_per_byte"] == pytest.approx(evaluate.spread([2.0, 4.0]))  # the bound in its other units too
  assert pooled["perplexity"] == pytest.approx(evaluate.spread([3.0, 6.0]))
  no_bytes = _run_result(0.2, 1.0, 0.4)
  no_bytes["bounds"]["mask"]["bits_per_byte"] = None  # e.g. a run whose bytes per token are unknown
  assert compare.pool([no_bytes, _run_result(0.4, 2.0, 0.6)])["bits_per_byte"] is None
  one = compare.pool([_run_result(0.2, 1.0, 0.4)])
  assert one["bounds"]["mask"]["error"] == 0.01  # one run: its standard error over sequences


@pytest.mark.parametrize("flag, message", [("--batch_size=0", "--batch_size must be > 0, got 0"),
                                           ("--limit=-1", "--limit must be >= 0, got -1"),
                                           ("--steps=-4", "--steps must be >= 0, got -4")])
def test_evaluate_refuses_bad_numbers_before_loading_anything(flag, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.parse_args(["--workdir=does-not-exist", flag])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("content, message", [
    (None, "records: no such file: {path}"),
    ('{"task": "add", "prompt": "add 1 2", "answer": "3"}\n{"task": "add", \n', "records: {path}:2 is not JSON"),
    ('{"task": "add", "prompt": "add 1 2"}\n', "records: {path}:1 needs text fields task, prompt and answer (not: answer)"),
])
def test_evaluate_refuses_bad_records_before_loading_the_checkpoint(tmp_path, capsys, content, message):
  path = tmp_path / "records.jsonl"
  if content is not None:
    path.write_text(content)
  assert evaluate.main([f"--workdir={tmp_path / 'no-run'}", f"--records={path}"]) == 2  # the run is never read
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: " + message.format(path=path))


def test_a_special_token_inside_an_answer_makes_it_wrong(untrained_tasks_run, tokenizer, vocab):
  """The samplers can emit [SEP] or [UNK] mid-answer: kept in the decoded text, such an answer no longer matches."""
  ids = tokenizer.encode("1 2", add_special_tokens=False)
  clean, stray = (np.asarray(x + [vocab.eos_id] * (16 - len(x)), np.int32)
                  for x in (ids, ids[:1] + [vocab.sep_id] + ids[1:]))
  texts = evaluate.decode_answers(untrained_tasks_run, np.stack([clean, stray]))
  assert evaluate.exact_match([RECORDS[1]] * 2, texts)["overall"] == 0.5, texts


def test_clean_answers_prompts_stop_where_the_answer_starts_with_answer_slots(untrained_tasks_run, tokenizer):
  """With dataset.answer_slots a training row ends in [PAD]s after its slot; they are not part of the prompt."""
  from flowlm_jax import sampling

  run = types.SimpleNamespace(**vars(untrained_tasks_run))
  run.config = untrained_tasks_run.config.copy_and_resolve_references()
  with run.config.unlocked():
    run.config.dataset.answer_slots = (8, 16)
  prompts, _ = evaluate.clean_answers(run, RECORDS[:2], 8)
  assert prompts == [sampling.encode_prompt(tokenizer, r["prompt"], chat=False) for r in RECORDS[:2]]
