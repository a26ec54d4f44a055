"""Fault injection through launch.py: kills, preemption and secrets in subprocesses; numerical faults and bad
input in-process (a fresh interpreter proves nothing more there)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import REPO, launch, launch_in_process, metrics_rows, tree_hashes

pytestmark = pytest.mark.integration

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


# launch.py with Orbax's commit of step SLOW_FROM and later held back for a minute: the step's files are
# written into `N.orbax-checkpoint-tmp-*` but not renamed, so a test can act while that save is in flight.
SLOW_SAVE = """
import asyncio, runpy, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def slow_finalize(self, *args, **kwargs):
  name = self.get_final().name  # a step directory, or an item (state, data, config) inside one
  if name.isdigit() and int(name) >= {slow_from}:
    await asyncio.sleep(60)
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def start(overlay, workdir, *extra, slow_save_from=None):
  head = [sys.executable, "launch.py"] if slow_save_from is None else [
      sys.executable, "-c", SLOW_SAVE.format(slow_from=slow_save_from)]
  return subprocess.Popen([*head, "--config=configs/flowlm.py", f"--config_yaml={overlay}",
                           f"--workdir={workdir}", *extra], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_until(done, proc, what, timeout=120):
  """Polls `done()` until true; fails if `proc` exits first or `timeout` seconds pass."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
    if done():
      return
    time.sleep(0.05)
  raise AssertionError(f"{what} not seen in {timeout}s")


def wait_for_save_in_flight(workdir, step, proc):
  directory = os.path.join(workdir, "checkpoints")
  wait_until(lambda: os.path.isdir(directory) and any(
      re.match(rf"{step or '[0-9]+'}\.orbax-checkpoint-tmp", d) for d in os.listdir(directory)),
             proc, f"a save of step {step} in flight")


def wait_for_step(workdir, step, proc):
  path = os.path.join(workdir, "metrics.jsonl")
  wait_until(lambda: os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)),
             proc, f"step {step}")


def test_sigkill_then_relaunch_reproduces_the_uninterrupted_losses(tiny_overlay, reference_run, tmp_path):
  workdir = str(tmp_path / "killed")
  # Asynchronous saves every 2 steps; killed while the save of step 4 is written but not committed.
  proc = start(tiny_overlay, workdir, "--config.training.async_checkpointing=true", slow_save_from=4)
  wait_for_save_in_flight(workdir, 4, proc)
  proc.kill()
  proc.wait()
  assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2"]
  # The relaunch is an ordinary resume (a subprocess in test_launch.py): in-process here.
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout and "(step 2," in r.stdout
  reference, resumed = metrics_rows(reference_run), metrics_rows(workdir)
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]
  assert steps == sorted(reference)  # each step once: rows of steps 3-4 from before the kill were dropped
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
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
                        f"--stop_at_step={saved[0] + 1}")
  assert r.returncode == 0 and f"step {saved[0]}" in r.stdout, r.stderr[-2000:]


def test_a_signal_that_arrives_twice_at_once_still_saves(tiny_overlay, tmp_path):
  """`uv run` passes a signal sent to the process group on to its child: the run gets it twice, ms apart. Before,
  the copy killed it with no checkpoint."""
  workdir = str(tmp_path / "doubled")
  proc = start(tiny_overlay, workdir, "--config.training.max_steps=400", "--config.training.save_steps=1000")
  wait_for_step(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, (proc.returncode, err[-2000:])
  assert "preempted: saved checkpoint at step" in out
  assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]


def test_a_second_signal_exits_at_once_without_waiting_for_the_save_in_flight(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "twice")
  proc = start(tiny_overlay, workdir, "--config.training.max_steps=400", "--config.training.save_steps=1000",
               "--config.training.async_checkpointing=true", slow_save_from=1)
  wait_for_step(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)  # saves the current step: its commit is held back for a minute
  wait_for_save_in_flight(workdir, None, proc)
  time.sleep(1.5)  # past loop.DUPLICATE_SIGNAL_S: a copy within it is the first signal again
  proc.send_signal(signal.SIGTERM)
  start_time = time.time()
  out, err = proc.communicate(timeout=60)
  assert time.time() - start_time < 20, "the second signal waited for the pending checkpoint"
  assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-2000:])  # killed by the signal itself
  assert "a second signal stops at once" in err, err[-2000:]
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]  # nothing half-listed


def test_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_good_checkpoints(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "nan")
  # A real numerical fault: the learning rate is 0 at step 1 (warmup), 1e30 at step 2 (finite weights of
  # ~1e30, saved: save_steps=2), and the forward pass of step 3 overflows. Metrics every 10 steps only:
  # the run must still stop at step 3, not at the next log or save boundary.
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             "--config.training.learning_rate=1e30", "--config.training.gradient_clip_val=0",
             "--config.training.warmup_steps=1", "--config.training.nonfinite=stop",
             "--config.logging.log_every=10", "--config.training.max_steps=12")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "non-finite loss, gradient or update at step 3:" in last, last
  assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2"]
  from flowlm_jax import loading
  for step in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]:
    loaded = loading.load(workdir, step=step)
    assert all(bool((abs(v) < float("inf")).all()) for v in loaded.params.values())


def test_nonfinite_updates_are_skipped_and_counted_when_configured(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "skip")
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
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
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
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
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}", *args)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, last
  assert "Traceback" not in r.stderr


def test_unwritable_workdir_is_reported(tiny_overlay, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = launch_in_process("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={blocker}/run")
  assert r.returncode != 0 and "not writable" in r.stderr.strip().splitlines()[-1]


def test_no_secret_reaches_the_workdir_or_the_output(tiny_overlay, tmp_path):
  secret = "sk-test-0123456789abcdef0123456789abcdef"
  workdir = str(tmp_path / "secret")
  # The key also sits in a config value (one the embedded dataset never reads), as a pasted secret would:
  # config.yaml, the checkpoints' config and wandb's config must not hold it. (In the YAML overlay, not on
  # the command line: wandb records the command line.)
  overlay = yaml.safe_load(open(tiny_overlay))
  overlay.setdefault("dataset", {})["hub_config"] = secret
  with open(tmp_path / "overlay.yaml", "w") as f:
    yaml.safe_dump(overlay, f)
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tmp_path / 'overlay.yaml'}", f"--workdir={workdir}",
             "--config.training.max_steps=2", "--config.logging.wandb.mode=offline",
             env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert secret not in r.stdout + r.stderr
  for root, _, files in os.walk(workdir):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        assert secret.encode() not in f.read(), os.path.join(root, name)
