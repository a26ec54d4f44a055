"""Multi-host: each process reads its share of every batch; 2 processes x 4 CPU devices train like 1 x 8.

The processes talk through jax.distributed on 127.0.0.1 (gloo CPU collectives). The single-process run
is the demo launch command with a `--config.mesh.fsdp=4` override on 8 simulated devices; the two-process
run is the same command plus the coordinator flags, so it must log the same losses.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flowlm_jax import data
from helpers import REPO, diff_yaml, launch, metrics_rows, tiny_config
from mesh_worker import cpu_env, parse

STEPS = 3


def _split(rows=40, length=4):
  tokens = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
  return data.TokenizedSplit(tokens=tokens, corruptible=np.ones_like(tokens, bool))


def _row_ids(batch, length=4):
  return (batch["tokens"][:, 0] // length).tolist()


def test_processes_read_disjoint_slices_that_make_up_the_global_batch():
  split = _split()
  whole = data.BatchIterator(split, 8, seed=5)
  parts = [data.BatchIterator(split, 8, seed=5, process_index=p, process_count=4) for p in range(4)]
  for _ in range(2 * whole.batches_per_epoch + 1):  # across epoch boundaries (reshuffled)
    expected = _row_ids(next(whole))
    got = [_row_ids(next(it)) for it in parts]
    assert all(len(g) == 2 for g in got)
    assert sum(got, []) == expected  # process p reads rows [2p, 2p+2) of the global batch, nothing else
  assert all(it.state() == whole.state() for it in parts)


def test_eval_batches_are_split_the_same_way():
  split = _split(rows=10)
  whole = list(data.eval_batches(split, 8))
  parts = [list(data.eval_batches(split, 8, process_index=p, process_count=2)) for p in range(2)]
  for b, batch in enumerate(whole):
    for key in ("tokens", "corruptible"):
      np.testing.assert_array_equal(np.concatenate([parts[0][b][key], parts[1][b][key]]), batch[key])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(args_of, timeout=300):
  """Starts processes 0 and 1 (4 CPU devices each) and returns their CompletedProcess-like results."""
  port = _free_port()
  env = {**os.environ, **cpu_env(4)}
  procs = [subprocess.Popen([sys.executable, *args_of(f"127.0.0.1:{port}", i)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  # Both read at once: one after the other, a process blocked on a full pipe would stall the other in a collective.
  try:
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
      outputs = list(pool.map(lambda p: p.communicate(timeout=timeout), procs))
    results = [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def _both_set_step_2_aside_and_restore_step_1(tmp_path, damage_step_2, *worker_args):
  """Steps 1 and 2 written, then `damage_step_2(its directory)`; both processes restore through mesh_worker's
  `damaged` (with `worker_args`): each must restore step 1, and step 2 must have been set aside once."""
  from test_export import write_checkpoint

  c = tiny_config("flowlm")
  for step in (1, 2):
    write_checkpoint(str(tmp_path / "run"), c, step=step)
  directory = str(tmp_path / "run" / "checkpoints")
  damage_step_2(os.path.join(directory, "2"))
  worker = os.path.join(REPO, "tests", "mesh_worker.py")
  results = _two_processes(lambda coord, i: [worker, "damaged", coord, str(i), directory, *worker_args], timeout=180)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
  outs = [parse(r.stdout) for r in results]
  assert [o["restored"] for o in outs] == [1, 1]
  assert [n.split(".")[0] + (".damaged" if ".damaged-" in n else "") for n in outs[0]["listing"]] == ["1", "2.damaged"]


@pytest.mark.integration
def test_two_processes_agree_to_set_a_damaged_step_aside_even_when_one_looks_later(tmp_path):
  """Every process of a job takes the same branch: the newest step damaged, both set it aside (process 0
  renames it) and restore the one before, even when process 1 looks at the step directory after process 0 has
  renamed it (a process that decided "deleted, list again" there would enter another collective and hang)."""
  from test_checkpoint import truncate_state

  _both_set_step_2_aside_and_restore_step_1(tmp_path, truncate_state, "0.2")


@pytest.mark.integration
def test_a_step_only_one_process_cannot_read_is_set_aside_by_both_without_a_hang(tmp_path):
  """Process 1's reads of step 2 fail inside Orbax's restores on every attempt (a damaged file only it reads), while
  process 0 reads its part and waits in their closing barriers: both agree, set step 2 aside and restore step 1
  (before: process 1's outcome agreement paired with such a barrier, and the processes hung until the job died)."""
  _both_set_step_2_aside_and_restore_step_1(tmp_path, lambda step_dir: None, "0", "only_process_1")


@pytest.mark.integration
def test_two_processes_assemble_the_single_process_batch():
  """BatchIterator slices + sharding.global_batch on several meshes, through jax.distributed."""
  worker = os.path.join(REPO, "tests", "mesh_worker.py")
  results = _two_processes(lambda coord, i: [worker, "split", coord, str(i)], timeout=180)
  outs = []
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
    outs.append(parse(r.stdout))
  assert [o["process_index"] for o in outs] == [0, 1]
  assert all(o["device_count"] == 8 and o["local_device_count"] == 4 for o in outs)
  for mesh in ("8x1x1", "2x4x1", "2x2x2", "1x2x4"):
    a, b = (o["meshes"][mesh] for o in outs)
    assert len(a["read_rows"]) == len(b["read_rows"]) == 4 and not set(a["read_rows"]) & set(b["read_rows"])
    assert a["held_rows"] == [0, 1, 2, 3] and b["held_rows"] == [4, 5, 6, 7], mesh
    assert a["global_shape"] == [8, 4] and a["equals_single_process_batch"] and b["equals_single_process_batch"]
  # tensor=8 spans both processes: the batch would be replicated over processes that read different
  # rows; global_batch refuses instead of silently training on an inconsistent half batch.
  for o in outs:
    assert "keep mesh.tensor within one host" in o["meshes"]["1x1x8"]["error"]


@pytest.fixture(scope="module")
def overlay(tmp_path_factory):
  c = tiny_config("flowlm")
  c.training.max_steps = STEPS
  # The test prompts at the final evaluation, as many as data x fsdp: the samplers' answers are split over both
  # processes' devices.
  i = c.inference
  i.at_evaluation, i.test_prompts = True, tuple(f"prompt {n}" for n in range(8))
  i.answer_length = i.steps = i.max_steps = i.block_length = 8
  return diff_yaml("flowlm", None, c, str(tmp_path_factory.mktemp("cfg") / "tiny.yaml"))


def _launch_args(overlay, workdir):
  return ["--config=configs/flowlm.py", f"--config_yaml={overlay}", f"--workdir={workdir}", "--config.mesh.fsdp=4"]


@pytest.fixture(scope="module")
def single(overlay, tmp_path_factory):
  """The demo command, unchanged but for a mesh override, on 8 simulated devices in one process."""
  workdir = str(tmp_path_factory.mktemp("single"))
  return launch(*_launch_args(overlay, workdir), env=cpu_env(8)), workdir


@pytest.mark.integration
@pytest.mark.slow
def test_demo_command_runs_with_a_mesh_override_on_8_devices(single):
  r, workdir = single
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh: {'data': 2, 'fsdp': 4, 'tensor': 1}" in r.stdout
  assert sorted(metrics_rows(workdir)) == list(range(1, STEPS + 1))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_train_like_one(single, overlay, tmp_path):
  r, single_dir = single
  assert r.returncode == 0, r.stderr[-3000:]
  workdir = str(tmp_path / "multi")  # one workdir for both processes, as on a shared filesystem
  launch_py = os.path.join(REPO, "launch.py")
  results = _two_processes(lambda coord, i: [launch_py, *_launch_args(overlay, workdir), f"--coordinator_address={coord}",
                                             "--num_processes=2", f"--process_id={i}"])
  for i, p in enumerate(results):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"
  assert "mesh: {'data': 2, 'fsdp': 4, 'tensor': 1}" in results[0].stdout
  assert "mesh:" not in results[1].stdout  # process 1 prints no run summary
  # Only process 0 writes metrics: one row per step (a second writer would append duplicates).
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [row["step"] for row in rows if "loss" in row] == list(range(1, STEPS + 1))
  assert [row["step"] for row in rows if "eval_loss" in row] == [STEPS]
  multi, one = metrics_rows(workdir), metrics_rows(single_dir)
  for step in range(1, STEPS + 1):  # same global batches, same noise: the same losses
    np.testing.assert_allclose(multi[step]["loss"], one[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
  eval_multi, eval_one = metrics_rows(workdir, "eval_loss"), metrics_rows(single_dir, "eval_loss")
  np.testing.assert_allclose(eval_multi[STEPS]["eval_loss"], eval_one[STEPS]["eval_loss"], rtol=1e-5)
  # The test prompts' answers, decoded on both processes' devices, are the single process's.
  with open(os.path.join(workdir, "samples.jsonl")) as f, open(os.path.join(single_dir, "samples.jsonl")) as g:
    multi_samples, one_samples = [json.loads(line) for line in f], [json.loads(line) for line in g]
  assert len(multi_samples) == 16 and multi_samples == one_samples
  # One checkpoint, written by both processes into the shared directory and committed.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(STEPS)]


def _start(args_of, log_dir, port):
  env = {**os.environ, **cpu_env(4)}
  return [subprocess.Popen([sys.executable, *args_of(f"127.0.0.1:{port}", i)], cwd=REPO, env=env, text=True,
                           stdout=open(os.path.join(log_dir, f"out{i}"), "w"),
                           stderr=open(os.path.join(log_dir, f"err{i}"), "w")) for i in range(2)]


def _wait_for_steps(workdir, count, procs, timeout=240):
  """Blocks until metrics.jsonl holds `count` training rows (fails if a process exits first)."""
  deadline = time.monotonic() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
    if os.path.exists(path) and len(metrics_rows(workdir)) >= count:
      return max(metrics_rows(workdir))
    time.sleep(0.2)
  raise AssertionError(f"no {count} steps within {timeout} s")


@pytest.mark.integration
@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_and_a_killed_process_takes_the_other_down(tmp_path):
  c = tiny_config("flowlm")
  c.training.max_steps = c.training.save_steps = 100_000
  c.training.stop_check_every = 4
  overlay = diff_yaml("flowlm", None, c, str(tmp_path / "long.yaml"))
  workdir, logs = str(tmp_path / "w"), str(tmp_path)
  launch_py = os.path.join(REPO, "launch.py")
  args_of = lambda coord, i: [launch_py, *_launch_args(overlay, workdir), f"--coordinator_address={coord}",
                              "--num_processes=2", f"--process_id={i}", "--heartbeat_timeout=10"]
  read = lambda name: open(os.path.join(logs, name)).read()

  # SIGTERM to process 1 only: both stop after the same step (the next agreement), save it, exit 0.
  procs = _start(args_of, logs, _free_port())
  signalled_after = _wait_for_steps(workdir, 3, procs)
  procs[1].send_signal(signal.SIGTERM)
  assert [p.wait(timeout=120) for p in procs] == [0, 0], read("err0")[-2000:] + read("err1")[-2000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(saved) == 1 and saved[0] % 4 == 0 and saved[0] >= signalled_after, saved
  assert max(metrics_rows(workdir)) == saved[0]
  assert f"preempted: saved checkpoint at step {saved[0]}" in read("out0")
  assert "preempted:" not in read("out1")  # said once, by process 0

  # Relaunched, both resume; kill -9 one and the other exits non-zero within a bounded time, saying why.
  procs = _start(args_of, logs, _free_port())
  _wait_for_steps(workdir, saved[0] + 3, procs)
  procs[1].kill()
  start = time.monotonic()
  returncode = procs[0].wait(timeout=120)
  assert returncode != 0 and time.monotonic() - start < 60, (returncode, time.monotonic() - start)
  # Whichever notices first names the death: jax's coordination service (missed heartbeats) or, on CPU,
  # the gloo collective the survivor was in when its peer's socket closed (seen under heavy load).
  died = read("err0")
  assert "another task died" in died or "gloo::EnforceNotMet" in died, died[:3000]
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{saved[0]}" in read("out0")
  assert "resumed from" not in read("out1")


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_start_from_an_exported_directory(tmp_path):
  """training.init_from on 2 processes x 4 devices with the parameters sharded over both (fsdp 8), so each
  process reads only its devices' parts of the file: at a learning rate of 1e-12 the saved step-1 weights are
  the export's."""
  import jax
  from test_export import write_checkpoint

  from flowlm_jax import export, load

  weights, _ = write_checkpoint(str(tmp_path / "source"), tiny_config("flowlm"), step=7, seed=3)
  export.export(str(tmp_path / "source"), str(tmp_path / "exported"))
  c = tiny_config("llada", learning_rate=1e-12, max_steps=1, save_steps=1)
  c.training.init_from = str(tmp_path / "exported")
  overlay = diff_yaml("llada", None, c, str(tmp_path / "ft.yaml"))
  workdir = str(tmp_path / "ft")
  launch_py = os.path.join(REPO, "launch.py")
  results = _two_processes(lambda coord, i: [
      launch_py, "--config=configs/llada.py", f"--config_yaml={overlay}", f"--workdir={workdir}",
      "--config.mesh.data=1", "--config.mesh.fsdp=8", f"--coordinator_address={coord}", "--num_processes=2",
      f"--process_id={i}"])
  for i, p in enumerate(results):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"
  assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in results[0].stdout
  assert f"initial weights: {tmp_path / 'exported'} (exported at its step 7)" in results[0].stdout
  started = load(workdir, step=1).params
  for name, want in weights.items():
    np.testing.assert_allclose(np.asarray(jax.device_get(started[name])), want, rtol=0, atol=1e-9, err_msg=name)
