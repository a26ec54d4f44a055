"""Fault injection through launch.py: kills, preemption, numerical faults, bad input, secrets."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, launch, metrics_rows

pytestmark = pytest.mark.integration

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def start(overlay, workdir, *extra):
  return subprocess.Popen([sys.executable, "launch.py", "--config=configs/flowlm.py", f"--config_yaml={overlay}",
                           f"--workdir={workdir}", *extra], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def tree_hashes(directory):
  """{relative path: sha256} of every file below `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def wait_for_step(workdir, step, proc, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
    if os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)):
      return
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_then_relaunch_reproduces_the_uninterrupted_losses(tiny_overlay, reference_run, tmp_path):
  workdir = str(tmp_path / "killed")
  # Asynchronous saves every 2 steps; kill right after step 5 is logged (a save of step 4 may be in flight).
  proc = start(tiny_overlay, workdir, "--config.training.async_checkpointing=true")
  wait_for_step(workdir, 5, proc)
  proc.kill()
  proc.wait()
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout
  reference, resumed = metrics_rows(reference_run), metrics_rows(workdir)  # last row per step wins
  assert sorted(resumed) == sorted(reference)
  for step, row in reference.items():
    assert resumed[step]["loss"] == row["loss"], step


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "preempted")
  proc = start(tiny_overlay, workdir, "--config.training.max_steps=400", "--config.training.save_steps=1000")
  wait_for_step(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted: saved checkpoint at step" in out
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 400
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             f"--stop_at_step={saved[0] + 1}")
  assert r.returncode == 0 and f"step {saved[0]}" in r.stdout, r.stderr[-2000:]


def test_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_good_checkpoints(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "nan")
  # An absurd learning rate drives the weights to inf within a few steps: a real numerical fault.
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             "--config.training.learning_rate=1e30", "--config.training.gradient_clip_val=0",
             "--config.training.warmup_steps=1", "--config.training.nonfinite=stop")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "non-finite loss or gradient at step" in last, last
  from flowlm_jax import api
  for step in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]:
    loaded = api.load(workdir, step=step)
    assert all(bool((abs(v) < float("inf")).all()) for v in loaded.params.values())


def test_nonfinite_updates_are_skipped_and_counted_when_configured(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "skip")
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             "--config.training.learning_rate=1e30", "--config.training.gradient_clip_val=0",
             "--config.training.warmup_steps=1", "--config.training.nonfinite=skip")
  assert r.returncode == 0, r.stderr[-2000:]
  rows = metrics_rows(workdir)
  assert rows[6]["nonfinite_count"] >= 1
  assert "update skipped" in r.stderr


def test_relaunch_with_a_different_optimiser_stops_naming_it_and_leaves_every_checkpoint_untouched(
    tiny_overlay, reference_run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference_run, workdir)
  before = tree_hashes(workdir)
  # Gradient clipping off: a different optimiser-state structure and a different run.
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             "--config.training.gradient_clip_val=0")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "training.gradient_clip_val (1.0 -> 0.0)" in last and "--workdir" in last, last
  assert "Traceback" not in r.stderr
  assert tree_hashes(workdir) == before  # checkpoints, metrics.jsonl and config.yaml


@pytest.mark.parametrize("args, message", [
    (["--config.dataset.name=", "--config.dataset.train_files={empty}"], "empty"),
    (["--resume=/nonexistent/checkpoints/10"], "--resume"),
    (["--config.model.tokenizer=/nonexistent/tokenizer"], "model.tokenizer"),
    (["--config.model.d_model=64"], "model.d_model (32 -> 64)"),  # the reference was saved from d_model=32
])
def test_bad_input_fails_in_one_line_before_compiling(tiny_overlay, reference_run, tmp_path, args, message):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  args = [a.format(empty=empty) for a in args]
  workdir = reference_run + "-copy"
  if not os.path.exists(workdir):
    import shutil
    shutil.copytree(reference_run, workdir)
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}", *args, timeout=120)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, last
  assert "Traceback" not in r.stderr


def test_unwritable_workdir_is_reported(tiny_overlay, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={blocker}/run", timeout=120)
  assert r.returncode != 0 and "not writable" in r.stderr.strip().splitlines()[-1]


def test_no_secret_reaches_the_workdir_or_the_output(tiny_overlay, tmp_path):
  secret = "sk-test-0123456789abcdef0123456789abcdef"
  workdir = str(tmp_path / "secret")
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             "--config.training.max_steps=2", "--config.logging.wandb.mode=offline",
             env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert secret not in r.stdout + r.stderr
  for root, _, files in os.walk(workdir):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        assert secret.encode() not in f.read(), os.path.join(root, name)
