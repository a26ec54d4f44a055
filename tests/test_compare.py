"""`python -m flowlm_jax.compare` on two tiny runs trained on the SFT tasks, and conditional-likelihood
ranking on one of them."""

import json
import os

import numpy as np
import pytest

from flowlm_jax import compare, evaluate, likelihood, loading, loop
from flowlm_jax import config as config_lib
from helpers import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BUDGET = compare.Budget(steps=(4,), seeds=(0,), rates=(0.3,), limit_per_task=2, bound_rows=8, draws=2, choices=2,
                        choice_draws=2, refine_steps=4, batch_size=64,
                        strategies=("below_threshold", "most_confident_changes"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """{method: workdir} of a LLaDA and a FlowLM run on the SFT tasks (a 2-layer d32 model): FlowLM 60 steps
  (enough to rank answers above chance), LLaDA 20 (the report only needs a second run)."""
  workdirs = {}
  for method, steps in (("llada", 20), ("flowlm", 60)):
    c = tiny_config(method, "tasks")
    c.training.batch_size, c.training.max_steps, c.training.save_steps = 32, steps, steps
    c.training.learning_rate, c.training.warmup_steps = 3e-3, 10
    c.dataset.max_train_examples = 1000
    c.inference.every_steps = 0
    workdirs[method] = str(tmp_path_factory.mktemp(method) / "w")
    loop.run(c, workdirs[method])
  return workdirs


@pytest.mark.slow
def test_conditional_likelihood_ranks_the_right_answer_first_more_often_than_chance(trained):
  """100 task prompts, each with its answer and 3 answers of other tasks: after 60 steps the model knows which
  kind of answer a prompt takes (chance: 0.25)."""
  run = loading.load(trained["flowlm"])
  records = evaluate.load_records(limit_per_task=25)
  result = evaluate.multiple_choice(run, records, choices=4, distractors="other_tasks", draws=4)
  assert result["chance"] == 0.25
  assert result["accuracy"]["overall"] > 0.35
  assert result["accuracy"]["add"] > 0.8  # digits vs letters: learnt first


@pytest.mark.slow
def test_report_numbers_are_those_of_the_separate_evaluation_functions(trained, tmp_path):
  workdirs = [trained["llada"], trained["flowlm"]]
  out = str(tmp_path / "report")
  args = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in BUDGET.__dict__.items()]
  assert compare.main([*workdirs, "--out", out, "--labels", "LLaDA,FlowLM", *args]) == 0
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["budget"] == json.loads(json.dumps(BUDGET.__dict__))
  records = evaluate.load_records(limit_per_task=BUDGET.limit_per_task)
  for label, workdir, entry in zip(("LLaDA", "FlowLM"), workdirs, report["runs"]):
    run = loading.load(workdir)
    assert (entry["label"], entry["step"]) == (label, {"LLaDA": 20, "FlowLM": 60}[label])
    rows = evaluate.validation_rows(run, BUDGET.bound_rows)
    bound = likelihood.estimate_bound(run.graphdef, run.params, run.tokenizer, run.vocab, rows.tokens,
                                      rows.corruptible, likelihood.BoundSpec(draws=BUDGET.draws), batch_size=64)
    assert entry["bounds"]["mask"] == bound.as_dict()
    mixed = likelihood.estimate_bound(run.graphdef, run.params, run.tokenizer, run.vocab, rows.tokens,
                                      rows.corruptible, likelihood.BoundSpec(figure="mixed", draws=2), batch_size=64)
    assert entry["bounds"]["mixed"] == mixed.as_dict()
    assert entry["multiple_choice"]["other_tasks"] == evaluate.multiple_choice(
        run, records, choices=2, distractors="other_tasks", draws=2, batch_size=64)["accuracy"]
    quality = evaluate.quality_vs_steps(run, records, (4,), (0,), batch_size=64)
    assert entry["quality"] == quality
    for strategy in BUDGET.strategies:
      assert entry["self_correction"][strategy]["0"] == evaluate.self_correction(
          run, records, (0.3,), steps=4, seed=0, batch_size=64, replacement_strategy=strategy)
    group = report["groups"][label]
    assert group["bounds"]["mask"]["mean"] == bound.nats_per_token
    assert group["quality"]["llada"]["4"]["mean"] == quality["llada"]["4"]["overall"][0]
  with open(os.path.join(out, "report.md")) as f:
    markdown = f.read()
  for label, entry in zip(("LLaDA", "FlowLM"), report["runs"]):
    mask = entry["bounds"]["mask"]
    assert f"| {label} | {mask['nats_per_token']:.3f} ± {mask['nats_per_token_se']:.3f} |" in markdown
  for name in ("training_curves", "bound_vs_steps", "quality_vs_steps", "self_correction"):
    assert f"({name}.png)" in markdown
    with open(os.path.join(out, f"{name}.png"), "rb") as f:
      data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_a_missing_workdir_fails_with_one_line_before_any_evaluation(tmp_path, capsys):
  assert compare.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no metrics.jsonl" in err[0]
  assert compare.main([str(tmp_path), "--out", str(tmp_path / "out"), "--rates", "0.1,1.5"]) == 2
  assert "rates" in capsys.readouterr().err


def test_an_unknown_replacement_strategy_fails_with_one_line(tmp_path, capsys):
  assert compare.main([str(tmp_path), "--out", str(tmp_path / "out"), "--strategies", "below_threshold,nope"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "strategies must be some of" in err[0] and "nope" in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,0,1"], "--seeds repeats a value: 0,0,1"),
    (["--steps", "4,4"], "--steps repeats a value: 4,4"),
    (["--draws", "0"], "--draws must be >= 1, got 0"),
    (["--refine_steps", "0"], "--refine_steps must be >= 1, got 0"),
    (["--choices", "1"], "--choices must be >= 2, got 1"),
    (["--limit_per_task", "-1"], "--limit_per_task must be >= 0, got -1"),
    (["--records", "/nonexistent.jsonl"], "records: no such file: /nonexistent.jsonl"),
    (["--limit_per_task", "1"], "fewer than 4 distinct answers"),
])
def test_a_budget_or_records_that_cannot_be_evaluated_fail_with_one_line_before_any_run_loads(
    tmp_path, capsys, monkeypatch, flags, message):
  """Before, these failed after a checkpoint had loaded (some after whole evaluations), or were counted twice."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("")
  monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a run loaded before the budget was checked"))
  assert compare.main([str(workdir), "--out", str(tmp_path / "out"), *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


def test_the_same_run_twice_or_an_out_that_is_a_file_fail_before_any_run_loads(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("")
  monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a run loaded before the arguments were checked"))
  assert compare.main([str(workdir), str(tmp_path / "." / "run"), "--labels", "A,A", "--out", str(tmp_path)]) == 2
  assert "given twice: it would be pooled as two training runs" in capsys.readouterr().err
  (tmp_path / "out").write_text("")
  assert compare.main([str(workdir), "--out", str(tmp_path / "out")]) == 2
  assert "is a file, not a folder" in capsys.readouterr().err


def test_pooled_runs_whose_folders_share_a_name_keep_a_training_curve_each(tmp_path, monkeypatch):
  from flowlm_jax import plot

  workdirs = [str(tmp_path / seed / "w") for seed in ("s0", "s1")]
  curves = {}
  monkeypatch.setattr(compare, "read_metrics", lambda workdir: [{"step": 1, "loss": 1.0}])
  monkeypatch.setattr(plot, "compare_loss_figure", lambda runs: curves.update(runs))
  monkeypatch.setattr(plot, "bound_vs_steps_figure", lambda *a: None)
  monkeypatch.setattr(plot, "save", lambda figure, path: path)
  compare.write_figures({"groups": {}}, str(tmp_path), workdirs, ["FlowLM", "FlowLM"])
  assert sorted(curves) == ["FlowLM (s0/w)", "FlowLM (s1/w)"]


def test_the_masking_cell_names_a_mix_of_strategies():
  c = config_lib.preset("flowlm", "demo")
  assert compare.masking_label(c.masking) == "FLOWLM_STRATEGY"
  c.masking.mix_strategy, c.masking.mix_prob = "LLADA_STRATEGY", 0.25
  assert compare.masking_label(c.masking) == "FLOWLM_STRATEGY + 0.25 LLADA_STRATEGY"
