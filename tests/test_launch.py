"""End to end through launch.py: train, resume (a real subprocess), dry run, bad input (in-process)."""

import json
import os

import pytest

from helpers import diff_yaml, launch, launch_in_process, metrics_rows, tiny_config

pytestmark = pytest.mark.integration


def test_stopped_and_relaunched_run_matches_an_uninterrupted_one(tiny_overlay, reference_run, tmp_path):
  split = str(tmp_path / "split")
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={split}",
                        "--stop_at_step=3")
  assert r.returncode == 0, r.stderr[-2000:]
  # Relaunched with the same --stop_at_step (a requeue script), it trains nothing, instead of one step more.
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={split}",
                        "--stop_at_step=3")
  assert r.returncode == 0 and "--stop_at_step=3: the run is already at step 3; nothing to train" in r.stdout
  assert max(map(int, os.listdir(os.path.join(split, "checkpoints")))) == 3 and sorted(metrics_rows(split)) == [1, 2, 3]
  # The same command without it, in a fresh process, continues from step 3.
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={split}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout and "step 3" in r.stdout
  a, b = metrics_rows(reference_run), metrics_rows(split)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):  # after the resume: same data, same noise, same optimiser state
    assert a[step]["loss"] == b[step]["loss"], step
  assert os.path.isdir(os.path.join(split, "checkpoints", "6"))


def test_llada_preset_trains_and_evaluates(tmp_path):
  c = tiny_config("llada")
  c.training.max_steps = 3
  overlay = diff_yaml("llada", None, c, str(tmp_path / "tiny.yaml"))
  r = launch_in_process("--config=configs/llada.py", f"--config_yaml={overlay}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 0, r.stderr[-2000:]
  evals = metrics_rows(str(tmp_path / "w"), "eval_loss")
  assert list(evals) == [3] and evals[3]["eval_loss"] > 0
  train_rows = metrics_rows(str(tmp_path / "w"))
  for key in ("loss", "learning_rate", "tokens_per_second", "accuracy_mask"):
    assert key in train_rows[3]


def test_dry_run_reports_the_data_and_exits_without_training(tmp_path):
  r = launch_in_process("--config=configs/flowlm.py:tasks", "--dry_run")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "dry run: ok" in r.stdout and "rows x 24" in r.stdout and "unigram entropy" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.masking.min_ratio=0.9", "--config.masking.max_ratio=0.5"], "masking.min_ratio"),
    (["--config.dataset.train_files=/nonexistent.txt", "--config.dataset.name="], "dataset.train_files"),
    (["--config.training.batch_sise=3"], "batch_sise"),
    (["--config=configs/flowlm.py:bogus"], "unknown config variant 'bogus'; known: demo"),
    (["--config=configs/nonexistent.py"], "--config=configs/nonexistent.py: Failed loading config file"),
    (["configs/llada.py"], "unexpected argument(s) configs/llada.py (flags are --name=value"),
    (["--num_processes=2", "--process_id=1"], "--num_processes/--process_id need --coordinator_address"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "--process_id=2 is not in [0,"),
    (["--distributed"], "jax.distributed.initialize: "),
    (["--stop_at_step=0"], "--stop_at_step must be >= 1, got 0"),
])
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, args, message):
  r = launch_in_process("--config=configs/flowlm.py", f"--workdir={tmp_path}", *args)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(("config error:", "error:")) and message in last, last
  assert "Traceback" not in r.stderr
  assert not os.path.isdir(os.path.join(tmp_path, "checkpoints"))


def test_a_relaunch_that_only_ran_the_missing_final_evaluation_says_so(tmp_path, monkeypatch):
  """loop.run returns only "eval" when a finished run's final evaluation had failed and ran on relaunch
  (test_checkpoint.py checks that it runs): the command shows its figures, not "nothing to do"."""
  from flowlm_jax import loop

  monkeypatch.setattr(loop, "run", lambda *a, **k: {"eval": {"step": 6, "eval_loss": 2.5, "eval_accuracy": 0.25}})
  r = launch_in_process("--config=configs/flowlm.py", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "its final evaluation, missing, ran now" in r.stdout and "eval_loss 2.5000" in r.stdout
  assert "nothing to do" not in r.stdout


def test_every_evaluation_row_follows_a_training_row_of_its_step(tmp_path):
  """eval_steps not a multiple of log_every (nor save_steps): the evaluation at step 4 still has its training row."""
  from flowlm_jax import loop

  c = tiny_config("llada", max_steps=7)
  c.logging.log_every, c.evaluation.eval_steps, c.training.save_steps = 3, 4, 5
  loop.run(c, str(tmp_path / "w"))
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    kinds = [("eval" if "eval_loss" in r else "train", r["step"]) for r in map(json.loads, f)]
  assert kinds == [("train", 3), ("train", 4), ("eval", 4), ("train", 5), ("train", 6), ("train", 7), ("eval", 7)]


def test_tokens_per_second_leaves_out_compile_saves_and_evaluation(tmp_path, monkeypatch):
  """An evaluation that takes 2 s after step 2 is no training time: the row of steps 3-4 reports the rate of those
  steps (~10 ms each here), not their tokens over the pause."""
  import time

  from flowlm_jax import loop

  evaluate = loop.evaluate
  monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (time.sleep(2.0), evaluate(*a, **k))[1])
  c = tiny_config("llada", max_steps=6)
  c.logging.log_every, c.evaluation.eval_steps, c.training.save_steps = 2, 2, 2
  loop.run(c, str(tmp_path / "w"))
  rows = metrics_rows(str(tmp_path / "w"))
  tokens_per_step = c.training.batch_size * c.dataset.max_length
  paused_rate = tokens_per_step * 2 / 2.0  # two steps' tokens over the pause alone
  assert rows[4]["tokens_per_second"] > 4 * paused_rate, rows[4]  # two steps well inside half a second


@pytest.mark.parametrize("epochs, batches, steps", [(0.29, 100, 29), (0.57, 100, 57), (2.5, 7, 17), (6.0, 312, 1872),
                                                    (0.001, 10, 1)])
def test_epochs_give_the_whole_steps_they_hold_despite_floating_point(epochs, batches, steps):
  """0.29 x 100 is 28.999999999999996 in floating point: still 29 steps; a fraction of a step is not run."""
  from flowlm_jax import loop

  assert loop.steps_of_epochs(epochs, batches) == steps
