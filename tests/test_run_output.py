"""What a finished run shows: test-prompt answers at evaluations (throttled), a summary with next commands."""

import io
import json
import os
import shlex

import pytest

from flowlm_jax import config as config_lib
from helpers import diff_yaml, launch_in_process, metrics_rows, tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 6-step tiny run through launch.py, evaluating (and so sampling) at steps 3 and 6."""
  root = tmp_path_factory.mktemp("finished")
  c = tiny_config("flowlm")
  c.evaluation.eval_steps = 3
  c.inference.at_evaluation = True  # the preset default, which tiny_config turns off
  c.inference.answer_length, c.inference.steps, c.inference.max_steps = 4, 4, 4
  c.logging.samples_print_seconds = 1e9  # only the last answers reach the console
  c.logging.progress_bar = True  # as users run it; here stdout is not a terminal, as in a SLURM log
  overlay = diff_yaml("flowlm", None, c, str(root / "tiny.yaml"))
  workdir = str(root / "run")
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={overlay}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, r, c, overlay


def samples_by_step(workdir):
  by_step = {}
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      by_step.setdefault(row["step"], []).append(row)
  return by_step


@pytest.mark.parametrize("variant", [None, "tasks"])
def test_presets_answer_their_own_test_prompts_in_both_modes_at_every_evaluation(variant):
  i = config_lib.preset("flowlm", variant).inference
  assert i.at_evaluation and i.test_both_modes and i.test_prompts
  data = config_lib.preset("flowlm", variant).dataset.name
  assert all(p.split()[0] in ("add", "reverse", "sort", "copy") for p in i.test_prompts) == (data == "embedded:sft_tasks")


def test_every_evaluation_answers_the_test_prompts_and_the_last_answers_are_printed(finished_run):
  workdir, r, c, _ = finished_run
  by_step = samples_by_step(workdir)
  assert sorted(by_step) == [3, 6]
  for rows in by_step.values():
    assert [(row["prompt"], row["mode"]) for row in rows] == [
        (p, m) for m in ("llada", "flowlm") for p in c.inference.test_prompts]
    assert all(isinstance(row["answer"], str) for row in rows)
  printed = r.stdout.split("step 6: test prompts (prompt -> answer)\n")[1].splitlines()
  expected = {(row["mode"], row["prompt"]): row["answer"] for row in by_step[6]}
  assert printed[:len(expected)] == [f"  [{m:<6}] {p!r} -> {expected[m, p]!r}"
                                     for p in c.inference.test_prompts for m in ("llada", "flowlm")]
  assert "step 3: test prompts" not in r.stdout  # throttled: logging.samples_print_seconds


def test_a_piped_progress_bar_is_not_redrawn_at_every_logged_step(finished_run):
  """Written to a file, every redraw stays in it: the bar redraws on its 30 s clock and around printed lines
  (evaluations, answers), not at each of the run's logged steps (logging.log_every = 1 here)."""
  _, r, c, _ = finished_run
  renders = r.stdout.count(f"/{c.training.max_steps} [")  # each redraw shows "i/total [elapsed<eta, ...]"
  assert 1 <= renders < c.training.max_steps, r.stdout


def test_a_finished_run_ends_with_its_figures_checkpoint_and_next_commands(finished_run):
  workdir, r, c, _ = finished_run
  summary = r.stdout[r.stdout.index("finished step 6 in"):]
  train, evaluation = metrics_rows(workdir)[6], metrics_rows(workdir, "eval_loss")[6]
  assert f"loss {train['loss']:.4f}" in summary and f"accuracy {train['accuracy']:.4f}" in summary
  assert f"eval_loss {evaluation['eval_loss']:.4f}" in summary
  checkpoint = os.path.join(workdir, "checkpoints", "6")
  assert f"checkpoint  {checkpoint}  " in summary and os.path.isdir(checkpoint)
  commands = [line.split("#")[0].strip() for line in summary.split("next:\n")[1].splitlines()]
  assert [cmd.split()[4] for cmd in commands[:2]] == ["flowlm_jax.sample", "flowlm_jax.plot"]
  assert f"--workdir={workdir}" in commands[0] and f"plot {workdir} --out={workdir}/plots" in commands[1]
  assert commands[3] == f"FLOWLM_WORKDIR={workdir} uv run --with jupyterlab jupyter lab notebooks/inspect_checkpoint.ipynb"


def test_relaunching_a_finished_run_says_there_is_nothing_to_do(finished_run):
  workdir, _, _, overlay = finished_run
  rows_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={overlay}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "nothing to do" in r.stdout and "training.max_steps" in r.stdout and "finished step" not in r.stdout
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == rows_before


def test_the_printed_sample_command_runs_as_written(finished_run, capsys):
  from flowlm_jax import sample

  workdir, r, c, _ = finished_run
  line = next(x for x in r.stdout.splitlines() if "flowlm_jax.sample" in x)
  argv = shlex.split(line.split("#")[0])
  assert argv[:4] == ["uv", "run", "python", "-m"]
  assert sample.main(argv[5:]) == 0
  out = capsys.readouterr().out
  assert f"checkpoint step 6 of {workdir}" in out
  assert f"[llada ] {c.inference.test_prompts[0]!r} -> " in out and f"[flowlm] {c.inference.test_prompts[0]!r} -> " in out


def test_the_progress_rate_and_eta_leave_the_compile_out():
  from tqdm import tqdm

  from flowlm_jax import loop

  clock = [1000.0]
  bar = tqdm(total=1000, file=io.StringIO(), mininterval=0, miniters=1, desc="compiling")
  bar._time = lambda: clock[0]
  bar.start_t = bar.last_print_t = clock[0]
  clock[0] += 120.0  # the first step compiles for two minutes
  loop._leave_out_of_rate(bar)
  for _ in range(50):  # then runs 4 steps a second
    clock[0] += 0.25
    bar.update(1)
  assert bar.format_dict["rate"] == pytest.approx(4.0, rel=1e-6)
  assert bar.format_dict["elapsed"] == pytest.approx(132.5)  # the wall time, compile included
  bar.close()


def test_a_piped_bars_rate_leaves_an_evaluation_out_with_the_steps_before_it():
  """Printing every 30 s (a log file): the steps run between the last print and an evaluation must not be
  counted against the time after it (the bar read 1.8x the true rate on the H200)."""
  from tqdm import tqdm

  from flowlm_jax import loop

  clock = [1000.0]
  bar = tqdm(total=10_000, file=io.StringIO(), mininterval=30.0, miniters=1, smoothing=0.3)
  bar._time = lambda: clock[0]
  bar.start_t = bar.last_print_t = clock[0]

  def run(steps, per_second):
    for _ in range(steps):
      clock[0] += 1 / per_second
      bar.update(1)

  for _ in range(3):  # 4 steps a second; every 100 steps (25 s, before the next print) a 60-s evaluation
    run(100, 4.0)
    clock[0] += 60.0
    loop._leave_out_of_rate(bar)
  run(200, 4.0)
  assert bar.format_dict["rate"] == pytest.approx(4.0, rel=1e-6)
  bar.close()


def test_sample_answers_prompts_from_arguments_flags_and_a_file_and_writes_jsonl(finished_run, tmp_path, capsys):
  from flowlm_jax import sample

  workdir, *_ = finished_run
  (tmp_path / "p.jsonl").write_text('{"prompt": "from a file"}\n')
  out = tmp_path / "answers" / "a.jsonl"
  assert sample.main([f"--workdir={workdir}", "first", "--prompt=second", f"--prompts_file={tmp_path / 'p.jsonl'}",
                      "--mode=both", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  assert [(r["prompt"], r["mode"], r["step"]) for r in rows] == [
      (p, m, 6) for p in ("first", "second", "from a file") for m in ("llada", "flowlm")]
  for r in rows:
    assert f"[{r['mode']:<6}] {r['prompt']!r} -> {r['answer']!r}" in printed
