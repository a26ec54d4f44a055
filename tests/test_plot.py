"""`python -m flowlm_jax.plot`: PNG figures from metrics.jsonl."""

import json
import math
import os

import pytest

from flowlm_jax import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BUCKETS = ("ratio_le_0.25", "ratio_0.25_to_0.5", "ratio_0.5_to_0.75", "ratio_gt_0.75")


def fake_run(workdir, steps=40, eval_every=10, offset=0.0, random_kind=True, loss="flowlm"):
  """A metrics.jsonl shaped like loop.py's (train rows every step, eval rows every `eval_every`) + config.yaml."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(1, steps + 1):
      progress = step / steps
      row = {"time": 1.0 + step, "step": step, "loss": 9 - 3 * progress + 0.2 * math.sin(step) + offset,
             "nll_corrupted": 9 - 2.5 * progress + offset, "grad_norm": 1.0, "learning_rate": 1e-3,
             "accuracy": 0.3 * progress, "accuracy_mask": 0.25 * progress}
      if random_kind:
        row["accuracy_random"] = 0.4 * progress
      row.update({f"accuracy_{b}": (0.4 - 0.1 * i) * progress for i, b in enumerate(BUCKETS)})
      f.write(json.dumps(row) + "\n")
      if step % eval_every == 0:
        ev = {"time": 1.5 + step, "step": step, "eval_loss": 8.5 - 2 * progress + offset,
              "eval_nll_corrupted": 8.6 - 2 * progress + offset, "eval_accuracy": 0.28 * progress,
              "eval_accuracy_mask": 0.2 * progress}
        if random_kind:
          ev["eval_accuracy_random"] = 0.35 * progress
        ev.update({f"eval_accuracy_{b}": (0.35 - 0.08 * i) * progress for i, b in enumerate(BUCKETS)})
        f.write(json.dumps(ev) + "\n")
  with open(os.path.join(workdir, "config.yaml"), "w") as f:
    f.write(f"training:\n  loss: {loss}\nmasking:\n  strategy: {loss.upper()}_STRATEGY\n")
  return workdir


def assert_png(path, min_bytes=10_000):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
  assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
  width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  assert width >= 400 and height >= 300, (path, width, height)


def test_one_run_writes_loss_accuracy_and_mask_vs_random_pngs(tmp_path):
  run = fake_run(str(tmp_path / "flowlm-demo"))
  out = tmp_path / "plots"
  assert plot.main([run, "--out", str(out)]) == 0
  names = sorted(os.listdir(out))
  assert names == ["flowlm-demo_accuracy_by_ratio.png", "flowlm-demo_loss.png", "flowlm-demo_mask_vs_random.png"]
  for name in names:
    assert_png(out / name)


def test_several_runs_are_overlaid_and_labelled(tmp_path):
  llada = fake_run(str(tmp_path / "a" / "LLaDA"), random_kind=False, loss="llada")
  flowlm = fake_run(str(tmp_path / "b" / "FlowLM"), offset=-0.3)
  paths = plot.plot_workdirs([llada, flowlm], str(tmp_path / "plots"))
  names = {os.path.basename(p) for p in paths}
  assert {"compare_loss.png", "compare_accuracy.png", "LLaDA_loss.png", "FlowLM_mask_vs_random.png"} <= names
  for path in paths:
    assert_png(path)
  fig = plot.compare_loss_figure({"LLaDA": plot.read_metrics(llada), "FlowLM": plot.read_metrics(flowlm)})
  labels = {text.get_text() for ax in fig.axes for text in ax.get_legend().get_texts()}
  assert {"LLaDA (smoothed)", "FlowLM (smoothed)", "LLaDA", "FlowLM"} <= labels


def test_labels_default_to_unique_workdir_names():
  assert plot.default_labels(["runs/llada", "runs/flowlm"]) == ["llada", "flowlm"]
  assert plot.default_labels(["x/a/w", "y/a/w"]) == ["x/a/w", "y/a/w"]
  assert plot.default_labels(["x/w", "y/w/metrics.jsonl"]) == ["x/w", "y/w"]


def test_resumed_run_keeps_the_last_value_of_a_repeated_step_and_skips_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                  '{"step": 2, "eval_loss": 2.5}\n{"step": 3, "lo')
  rows = plot.read_metrics(str(tmp_path))
  assert plot.series(rows, "loss") == ([1, 2], [3.0, 1.5])
  assert plot.series(rows, "eval_loss") == ([2], [2.5])
  assert plot.last_value(rows, "accuracy_random") is None


def test_missing_metrics_fail_with_one_line(tmp_path, capsys):
  assert plot.main([str(tmp_path / "nope"), "--out", str(tmp_path / "plots")]) == 2
  assert "no metrics file" in capsys.readouterr().err


def test_run_without_eval_or_random_metrics_still_plots(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, "accuracy_mask": 0.1 * s})
                                                 + "\n" for s in range(1, 6)))
  for path in plot.plot_workdirs([str(workdir)], str(tmp_path / "plots")):
    assert_png(path, min_bytes=5_000)


@pytest.mark.integration
def test_cli_on_a_real_run(reference_run, tmp_path, capsys):
  out = tmp_path / "plots"
  assert plot.main([reference_run, "--out", str(out), "--labels", "ref"]) == 0  # in-process: `-m` adds nothing
  printed = capsys.readouterr().out.split()
  assert len(printed) == 3 and all(os.path.basename(p).startswith("ref_") for p in printed)
  for path in printed:
    assert_png(path)


def test_self_correction_figure_has_a_row_per_strategy_and_a_bar_per_label_and_rate():
  def result(fixed):
    return {"0.1": {"fixed": fixed, "broken": 0.004, "exact_match": 0.9},
            "0.5": {"fixed": None, "broken": 0.002, "exact_match": 0.5}}  # None: no wrong token, no bar height
  fig = plot.self_correction_figure({"below_threshold": {"llada": result(0.01), "flowlm": result(0.02)},
                                     "most_confident_changes": {"llada": result(0.98), "flowlm": result(0.99)}})
  axes = fig.get_axes()
  assert [ax.get_title() for ax in axes[::3]] == ["below_threshold: wrong tokens fixed",
                                                  "most_confident_changes: wrong tokens fixed"]
  assert [round(b.get_height(), 3) for b in axes[3].patches] == [0.98, 0.0, 0.99, 0.0]  # llada's rates, then flowlm's
  texts = [t.get_text() for t in axes[1].texts]  # small fractions keep three digits
  assert texts == ["0.004", "0.002", "0.004", "0.002"]
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ["llada", "flowlm"]


def test_a_non_finite_value_does_not_end_the_smoothed_curve():
  """An older metrics file can hold a bare NaN (a skipped non-finite step): the average passes over it."""
  values = [1.0] * 5 + [math.nan] + [2.0] * 20
  smoothed = plot.ema(values, span=4)
  assert all(math.isfinite(v) for v in smoothed[:5] + smoothed[6:])
  assert smoothed[5] == smoothed[4] and smoothed[-1] == pytest.approx(2.0, abs=1e-3)


def test_labels_that_share_a_file_name_and_an_out_that_is_a_file_fail_in_one_line(tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
  assert plot.main([str(workdir), str(workdir), "--labels", "run 1,run_1", "--out", str(tmp_path / "plots")]) == 2
  assert "give the same file names ['run_1', 'run_1']" in capsys.readouterr().err
  (tmp_path / "taken").write_text("x")
  assert plot.main([str(workdir), "--out", str(tmp_path / "taken")]) == 2
  assert "cannot be a folder" in capsys.readouterr().err
  assert plot.main([str(workdir), "--out", str(tmp_path / "taken" / "sub")]) == 2
  assert "cannot be a folder (Not a directory)" in capsys.readouterr().err
  assert plot.main([str(workdir), str(workdir), "--labels", "a,compare", "--out", str(tmp_path / "plots")]) == 2
  assert "the label 'compare' would name a run's files" in capsys.readouterr().err
  assert not os.path.isdir(tmp_path / "plots")
