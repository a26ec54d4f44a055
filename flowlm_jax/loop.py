"""The training run: set up (validate, data, mesh, state, resume), then step, log, evaluate, sample, save.

Side effects live here and in logging.py/checkpoint.py; the math is in train.py and below.
Preemption: SIGTERM/SIGINT finish the current step, save a checkpoint, wait for it and exit cleanly; a
second signal (a second or more after the first: copies within DUPLICATE_SIGNAL_S are the same one) kills the
process at once (the signal's default action; a shell reports 128 + signal), leaving an unfinished save
uncommitted.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from flowlm_jax import checkpoint as ckpt_lib
from flowlm_jax import config as config_lib
from flowlm_jax import data, losses, masking, sharding, train, warm_start
from flowlm_jax.decoding_passes import check_cacheable
from flowlm_jax.logging import MetricsLogger, format_samples, redact
from flowlm_jax.models import registry
from flowlm_jax.models.llama import ModelConfig
from flowlm_jax.tokenizer import load_tokenizer, vocab_of

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  pass


@dataclasses.dataclass
class Setup:
  """Everything a run needs before its first step; built without compiling anything."""
  config: Any
  tokenizer: Any
  vocab: Any
  train_split: data.TokenizedSplit
  valid_split: data.TokenizedSplit
  iterator: data.BatchIterator
  mesh: Any
  model_cfg: ModelConfig
  step_cfg: train.StepConfig
  total_steps: int


def prepare(config, *, num_devices: int | None = None, initialises: bool = True) -> Setup:
  """Validates and loads everything that can fail on bad input, before any compile. `initialises`: the run will
  start from model.pretrained's weights (not a checkpoint), so they are checked too."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  config_lib.validate(config, num_devices)
  tokenizer = load_tokenizer(config.model.tokenizer)
  vocab = vocab_of(tokenizer)
  model_cfg = registry.model_config(config.model, vocab)
  if initialises:
    registry.check_pretrained(model_cfg, vocab)
  if config.inference.test_prompts and config.inference.cache != "none":
    # The test prompts are sampled at evaluations: a cache this model family lacks fails now, not at the first one.
    check_cacheable(nnx.eval_shape(lambda: registry.create(model_cfg, rngs=nnx.Rngs(params=0))), config.inference.cache)
  d = config.dataset
  train_split = data.load_split(d, "train", tokenizer, vocab, d.max_train_examples)
  valid_split = data.load_split(d, "validation", tokenizer, vocab, d.max_validation_examples)
  iterator = data.BatchIterator(train_split, config.training.batch_size, seed=config.dataloader.seed,
                                shuffle=config.dataloader.shuffle, process_index=jax.process_index(),
                                process_count=jax.process_count())
  with config.unlocked():  # resolved once, saved with the config: samplers must render prompts the same way
    config.dataset.prompt_format = "chat" if train_split.chat else "plain"
  t = config.training
  total_steps = t.max_steps or steps_of_epochs(t.num_epochs, iterator.batches_per_epoch)
  step_cfg = train.StepConfig(
      model=model_cfg, masking=masking.MaskingSpec.from_config(config.masking, vocab), loss=t.loss,
      loss_weighting=t.loss_weighting, grad_accum=t.gradient_accumulation_steps,
      loss_chunk_size=config.model.loss_chunk_size, pad_id=vocab.pad_id)
  mesh = sharding.make_mesh(config)
  for rows in {t.batch_size, config.evaluation.eval_batch_size or t.batch_size}:
    sharding.check_process_split(mesh, rows)
  return Setup(config, tokenizer, vocab, train_split, valid_split, iterator, mesh, model_cfg, step_cfg, total_steps)


def steps_of_epochs(num_epochs: float, batches_per_epoch: int) -> int:
  """Whole steps in `num_epochs` epochs (at least one). The product is rounded to 1e-6 first: 0.29 epochs of 100
  batches is 28.999999999999996 in floating point, and 29 steps."""
  return max(1, math.floor(round(num_epochs * batches_per_epoch, 6)))


def starts_from_initial_weights(workdir: str | None, resume: str | None) -> bool:
  """Whether a launch would start from model.pretrained's (or random) weights, not a checkpoint: no --resume, and
  no step in the workdir (a resumed run needs neither the release's weights nor its [MASK] row)."""
  checkpoints = os.path.join(workdir or "", "checkpoints")
  return resume is None and not (workdir and os.path.isdir(checkpoints) and any(
      name.isdigit() and ckpt_lib.is_step_directory(os.path.join(checkpoints, name)) for name in os.listdir(checkpoints)))


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{socket.gethostname()}-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir {workdir} is not writable: {e.strerror}") from None


# A copy of the first signal within this many seconds is the same preemption, not a second one: `uv run` passes
# a signal sent to the whole process group on to its child, which then receives it twice a few ms apart.
DUPLICATE_SIGNAL_S = 1.0


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}
    self._lock = threading.Lock()
    self._timer: threading.Timer | None = None
    self._exited = False

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:  # a copy already queued for the interpreter
      return
    self.signal = signum
    # Copies arriving within DUPLICATE_SIGNAL_S are dropped by the kernel; after it, a second signal must stop the
    # process at once, whatever the main thread is blocked in (a Python handler runs only when the main thread
    # returns to the interpreter: a wait inside a save in flight held it back for a minute in CI). So a timer
    # thread then restores the default action, which kills the process right in the kernel; Orbax never lists an
    # uncommitted step, so the previous checkpoint stays the newest.
    for sig in self._previous:
      signal.signal(sig, signal.SIG_IGN)
    self._timer = threading.Timer(DUPLICATE_SIGNAL_S, self._arm_default_action)
    self._timer.daemon = True
    self._timer.start()
    print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
          "(a second signal stops at once)", file=sys.stderr, flush=True)

  def _arm_default_action(self):
    with self._lock:
      if not self._exited:
        for sig in self._previous:
          _default_action(sig)

  def __exit__(self, *exc):
    with self._lock:
      self._exited = True
      if self._timer is not None:
        self._timer.cancel()
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _default_action(sig: int) -> None:
  """The signal's default action, set from any thread (Python's `signal.signal` works in the main thread only)."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]
    libc.signal(sig, None)  # SIG_DFL is the null handler
  except (OSError, AttributeError, TypeError):  # no C library to call (not a POSIX system): a second signal is ignored
    log.warning("cannot restore the default action of signal %d: a second signal will not stop the run", sig)


def run(config, workdir: str, *, resume: str | None = None, stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains until `total_steps`, preemption or `stop_at_step` (then saves and returns, resumable).

  Returns the last train and eval metrics ("train", "eval"), test-prompt answers ("samples"), the last
  saved "checkpoint", and "wandb_offline_dir" where wandb tracked offline.
  """
  check_workdir(workdir)
  if stop_at_step is not None and stop_at_step < 1:
    raise ValueError(f"--stop_at_step must be >= 1, got {stop_at_step}")
  resume_dir, resume_step = ckpt_lib.resolve_resume_path(resume) if resume else (None, None)
  s = prepare(config, initialises=starts_from_initial_weights(workdir, resume))
  is_main = jax.process_index() == 0
  c = s.config
  config_dict = config_lib.with_resolved_model(redact(c.to_dict()), s.model_cfg)
  if is_main:
    print(f"train: {s.train_split.summary()}\nvalidation: {s.valid_split.summary()}\n"
          f"mesh: {dict(s.mesh.shape)}  steps: {s.total_steps}  unigram entropy (nats/token): "
          f"{data.unigram_entropy(s.train_split):.3f} (train), context-free validation NLL "
          f"{data.unigram_cross_entropy(s.train_split, s.valid_split):.3f}", flush=True)

  graphdef, abstract_model_state = train.abstract_model(s.model_cfg)
  tx, schedule = train.make_optimizer(c.training, s.total_steps, abstract_model_state)
  shardings = train.state_shardings(s.model_cfg, tx, s.mesh)
  train_step, eval_step = train.compile_steps(graphdef, tx, s.step_cfg, shardings, s.mesh)
  abstract = ckpt_lib.restore_target(s.model_cfg, tx, shardings)

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.training.save_total_limit,
                                       async_save=c.training.async_checkpointing)
  try:
    # Whether a restore would come from this workdir's own steps (its metrics.jsonl then tells what ran).
    own_checkpoints = bool(checkpointer.all_steps())
    state = _restore(checkpointer, abstract, s.iterator, resume_dir, resume_step, c.training, config_dict)
    if state is None:  # a refused training.init_from (or unreadable model.pretrained) closes the checkpointer too
      state = train.init_state(s.model_cfg, tx, c.training.seed, shardings,
                               params=_warm_start_params(c.training.init_from, s, abstract_model_state, shardings,
                                                         is_main))
  except BaseException:
    checkpointer.close()
    raise
  start_step = int(state.step)
  if is_main:  # written only once the checkpoint (if any) is known to belong to this config
    with open(os.path.join(workdir, "config.yaml"), "w") as f:
      f.write(config_lib.to_yaml(config_lib.from_dict(config_dict)))
    ckpt_lib.record_launch_directory(workdir)  # where the config's relative paths start (loading.load)
  logger = MetricsLogger(workdir, c, is_main=is_main, start_step=start_step)
  tokens_per_step = c.training.batch_size * c.dataset.max_length
  result: dict[str, Any] = {}

  saved_unlogged = []  # steps whose (asynchronous) save may still run: uploaded to wandb once it is done

  def upload_saved() -> None:
    if saved_unlogged and logger.logs_model:
      checkpointer.wait()
      for saved in saved_unlogged:
        logger.checkpoint_saved(saved, os.path.join(checkpointer.directory, str(saved)))
    saved_unlogged.clear()

  def save(step: int) -> None:
    upload_saved()  # Orbax would wait for the previous save before starting this one anyway
    checkpointer.save(step, state, s.iterator.state(), config_dict)
    saved_unlogged.append(step)

  stop_on_nonfinite = c.training.nonfinite == "stop"
  try:
    with _Preemption() as preemption, _progress(c, start_step, s.total_steps, is_main) as bar:
      window, window_start, window_steps = None, time.perf_counter(), 0
      rate = _SteadyRate()
      nonfinite_seen = int(state.nonfinite_count)
      previous = None  # (step, finite flag) of the last step, read one step late so the device never idles
      step = start_step
      samples_echoed = time.monotonic()  # console echo of test-prompt answers is throttled from here

      def evaluate_and_sample(step: int, last: bool) -> bool:
        """Whether it evaluated or sampled (a pause)."""
        nonlocal samples_echoed
        evaluating = (c.evaluation.eval_steps and step % c.evaluation.eval_steps == 0) or last
        if evaluating:
          result["eval"] = evaluate(eval_step, state.params, s, step)
          logger.write(result["eval"])
          if is_main:
            bar.write(_format_eval(result["eval"]))
        sampling = _sampling_due(c.inference, step, evaluating, last)
        if sampling:
          echo = last or time.monotonic() - samples_echoed >= c.logging.samples_print_seconds
          result["samples"] = _sample_test_prompts(s, graphdef, state.params, step, logger, bar if echo else None)
          samples_echoed = time.monotonic() if echo else samples_echoed
        if evaluating or sampling:
          _leave_out_of_rate(bar)
        return bool(evaluating or sampling)

      finished = start_step >= s.total_steps
      # Mid-run only for a step of this workdir: a fork from --resume's step evaluated there already.
      evaluation_step = bool(own_checkpoints and start_step and c.evaluation.eval_steps
                             and start_step % c.evaluation.eval_steps == 0)
      if (finished or evaluation_step) and not _evaluation_logged(workdir, start_step):
        evaluate_and_sample(start_step, finished)  # saved before it: an evaluation that failed or was cut is done now
      if stop_at_step is not None and stop_at_step <= start_step < s.total_steps:
        # A requeue passing the same --stop_at_step would otherwise creep one step further per relaunch.
        if is_main:
          print(f"--stop_at_step={stop_at_step}: the run is already at step {start_step}; nothing to train", flush=True)
        result["halted_at"] = start_step
      while step < s.total_steps and "halted_at" not in result:
        batch = sharding.global_batch(next(s.iterator), s.mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if step == start_step + 1:
          _compiled(bar, metrics)
          rate.restart()  # the compile is not training time
        else:
          rate.count_step()
        if stop_on_nonfinite:
          if previous is not None:
            _stop_if_nonfinite(*previous)
          previous = (step, metrics["finite"])
        window = metrics if window is None else _add(window, metrics)
        window_steps += 1
        bar.update(1)
        last = step == s.total_steps
        preempted = _stop_requested(preemption, step, c.training.stop_check_every)
        halt = preempted or (stop_at_step is not None and step >= stop_at_step and not last)
        saving = step % c.training.save_steps == 0 or last or halt
        evaluation_due = bool(c.evaluation.eval_steps) and step % c.evaluation.eval_steps == 0
        # A row at a save: a crash after it loses no logged steps; at an evaluation: its row follows a training row
        # of its step.
        if step % c.logging.log_every == 0 or saving or evaluation_due:
          sums = jax.device_get(window)  # waits for the window's steps: the rate's clock stops here
          tokens_per_second = rate.tokens_per_second(tokens_per_step) or (  # no steady step yet: the whole window
              tokens_per_step * window_steps / max(time.perf_counter() - window_start, 1e-9))
          # The rate of the newest applied update (skipped steps keep the optimiser's count, and so its schedule)
          learning_rate = float(schedule(max(int(train.applied_updates(state.opt_state)) - 1, 0)))
          row = _train_row(sums, window_steps, step, learning_rate, tokens_per_second, int(state.nonfinite_count))
          nonfinite_seen = _check_nonfinite(state, nonfinite_seen, previous)
          logger.write(row)
          bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}", refresh=False)
          result["train"] = row
          window, window_start, window_steps = None, time.perf_counter(), 0
          rate.restart()
        if saving:
          # Before evaluating and sampling: a failure there (or a preemption's grace period running out) loses no
          # training (a relaunch after a failed final evaluation runs it), and an asynchronous save overlaps them.
          nonfinite_seen = _check_nonfinite(state, nonfinite_seen, previous)
          save(step)
          result["checkpoint"] = os.path.join(workdir, "checkpoints", str(step))  # as the user wrote the workdir
        if evaluate_and_sample(step, last) or saving:  # a pause: the rate's clock starts again after it
          rate.restart()
        if halt:
          checkpointer.wait()
          why = "preempted" if preempted else f"stopped at step {stop_at_step} as asked"  # a signal may have reached another process
          if is_main:
            print(f"{why}: saved checkpoint at step {step} in {checkpointer.directory}; exiting", flush=True)
          result["halted_at"] = step
          break
  finally:
    try:
      upload_saved()
    finally:
      checkpointer.close()  # waits for pending asynchronous saves
      logger.close()
  if logger.offline_run_dir:
    result["wandb_offline_dir"] = logger.offline_run_dir
  return result


def _evaluation_logged(workdir: str, step: int) -> bool:
  """Whether metrics.jsonl holds an evaluation row of `step`; process 0's answer, the same on every process
  (evaluation is collective)."""
  logged = False
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() == 0 and os.path.isfile(path):
    with open(path) as f:
      rows = (json.loads(line) for line in f if '"eval_loss"' in line)
      logged = any(row.get("step") == step for row in rows)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    logged = bool(multihost_utils.broadcast_one_to_all(np.int32(logged)))
  return logged


def _stop_requested(preemption, step: int, every: int) -> bool:
  """Whether a signal asks every process to stop (and save) after this step.

  One process: a signal counts at once. Several: they must stop at the same step, so they agree on it
  with a collective, but only every `every` steps (the same steps on all of them): a collective per
  step would make each process wait for its devices before dispatching the next step (measured on 4
  H200s, one process per GPU: -30% tokens/s for a small model). A signal waits at most `every` steps.
  """
  flag = preemption.signal is not None
  if jax.process_count() == 1:
    return flag
  if step % every:
    return False
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _add(a, b):
  return jax.tree.map(lambda x, y: x + y, a, b)


def _progress(c, start: int, total: int, is_main: bool):
  """The step bar; it says "compiling" until the first step has run (`_compiled`).

  Written to a file or pipe (SLURM, nohup, `| tee`) every redraw stays in the log: there it redraws every
  30 s instead of ten times a second.
  """
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not (is_main and c.logging.progress_bar), unit="step",
              dynamic_ncols=True, file=sys.stdout, desc="compiling",
              mininterval=0.1 if sys.stdout.isatty() else 30.0)


def _compiled(bar, metrics) -> None:
  """After the first step, compiled and run: from now on the bar's rate counts steady-state steps only.

  With the compile in it, tqdm's rate gave a 3-minute demo an ETA of an hour at its first steps.
  """
  jax.block_until_ready(metrics)
  bar.set_description_str("train", refresh=False)
  _leave_out_of_rate(bar)


def _leave_out_of_rate(bar) -> None:
  """Leaves the time since the bar last printed (a compile, an evaluation) out of its rate and ETA.

  tqdm's rate is a moving average of (steps, seconds) between prints; restarting the interval drops the
  pause from it, while the elapsed time shown stays the wall time (tqdm.unpause would shift that too). The
  steps since the last print go with it: counted against the time after the pause alone, they made a piped
  bar (a print every 30 s) read 131 steps/s on the H200 where 71 ran.
  """
  if not bar.disable:
    bar.last_print_n, bar.last_print_t = bar.n, bar._time()  # tqdm's own clock (a test may replace it)


def _warm_start_params(init_from: str, s: Setup, abstract_model_state, shardings, is_main: bool):
  """training.init_from's weights in their shards, or None (random init, or model.pretrained's). Checked first,
  before anything compiles; only a run without a checkpoint gets here, so a resume never reads the directory."""
  if not init_from:
    return None
  template = nnx.to_pure_dict(abstract_model_state)
  source_step = warm_start.check(init_from, s.model_cfg, template, s.tokenizer)
  if is_main:
    print(f"initial weights: {init_from} (exported at its step {source_step})", flush=True)
  return warm_start.initial_params(init_from, template, shardings.params)


def _restore(checkpointer, abstract, iterator, resume_dir, resume_step, tcfg, config_dict):
  """Resumes from the workdir's newest good checkpoint, or where it has none, from --resume; None only where
  there is no checkpoint at all. A workdir's own checkpoints win over --resume, so the same command relaunched
  (after a preemption, a requeue) goes on from where that workdir got to instead of from --resume's step."""
  source, own_steps = checkpointer, checkpointer.all_steps()
  if resume_dir is not None and os.path.realpath(resume_dir) == os.path.realpath(checkpointer.directory):
    later = [step for step in own_steps if resume_step is not None and step > resume_step]
    if later:  # the first save would find its step taken, after the metrics past resume_step were dropped
      raise ckpt_lib.CheckpointError(
          f"--resume={resume_dir}/{resume_step}: this workdir has later steps ({', '.join(map(str, later[:3]))}"
          f"{', ...' if len(later) > 3 else ''}) that training from it would run into; resume it into a new "
          f"--workdir instead")
  elif resume_dir is not None:
    if own_steps or checkpointer.set_aside_steps():  # the workdir's own steps win; set-aside ones are refused below
      if own_steps and jax.process_index() == 0:
        print(f"--resume={resume_dir} ignored: {checkpointer.directory} has checkpoints of its own (the newest is "
              f"resumed); --resume starts a workdir without any", flush=True)
      resume_dir, resume_step = None, None
    else:
      source = ckpt_lib.Checkpointer(resume_dir, max_to_keep=tcfg.save_total_limit, async_save=False)
  if resume_dir is not None and not source.all_steps():
    if source is not checkpointer:
      source.close()
    raise FileNotFoundError(f"--resume: no checkpoints in {resume_dir}")
  try:
    # Damaged steps of another run's directory (--resume) are skipped, never renamed.
    found = source.restore_latest_good(abstract, resume_step, config_dict=config_dict,
                                       set_aside=source is checkpointer)
  finally:
    if source is not checkpointer:
      source.close()
  if found is None:
    return None
  step, state, data_state = found
  iterator.restore(data_state)
  if jax.process_index() == 0:
    print(f"resumed from {source.directory}/{step} (step {int(state.step)}, data epoch {data_state['epoch']} "
          f"batch {data_state['position']})", flush=True)
  return state


class _SteadyRate:
  """Training tokens/s over the steps since the clock last restarted: the first step (its compile), a
  checkpoint save and an evaluation or sampling pause restart it, as they restart the progress bar's rate."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def count_step(self) -> None:
    self.steps += 1

  def tokens_per_second(self, tokens_per_step: int) -> float | None:
    """None before any step was counted."""
    return tokens_per_step * self.steps / max(time.perf_counter() - self.start, 1e-9) if self.steps else None


def _train_row(sums, n_steps, step, learning_rate, tokens_per_second, nonfinite_count) -> dict[str, Any]:
  row = {"step": step, "loss": float(sums["loss"]) / n_steps, "grad_norm": float(sums["grad_norm"]) / n_steps,
         "learning_rate": learning_rate, "tokens_per_second": tokens_per_second,
         "nonfinite_count": nonfinite_count}
  if sums["count/corrupted"] > 0:
    row["nll_corrupted"] = float(sums["nll/corrupted"]) / float(sums["count/corrupted"])
  row.update(losses.finalize_metrics(sums))
  return row


def _stop_if_nonfinite(step: int, finite) -> None:
  if not bool(finite):
    raise NonFiniteError(f"non-finite loss, gradient or update at step {step}: stopping (training.nonfinite=stop); "
                         "the update was not applied and no later step was saved")


def _check_nonfinite(state, seen: int, latest) -> int:
  """Before a log row or a save. Policy "stop" (`latest` = (step, finite) of the step just taken): every
  earlier step was checked one step late, so this names the first bad step. Policy "skip" (`latest` None):
  warns about updates skipped since `seen`. Returns the new skip count."""
  if latest is not None:
    _stop_if_nonfinite(*latest)
  count = int(state.nonfinite_count)
  if count > seen:
    log.warning("non-finite loss, gradient or update at step %d: update skipped (%d skipped so far)",
                int(state.last_nonfinite_step), count)
  return count


def evaluate(eval_step, params, s: Setup, step: int) -> dict[str, Any]:
  """Validation metrics under a fixed corruption key, so that evaluations are comparable."""
  c = s.config
  batch_size = c.evaluation.eval_batch_size or c.training.batch_size
  key = jax.random.PRNGKey(c.evaluation.seed)
  totals = None
  for i, local in enumerate(data.eval_batches(s.valid_split, batch_size, c.evaluation.eval_batches,
                                              process_index=jax.process_index(), process_count=jax.process_count())):
    sums = eval_step(params, sharding.global_batch(local, s.mesh), jax.random.fold_in(key, i))
    totals = sums if totals is None else _add(totals, sums)
  totals = jax.device_get(totals)
  row = {"step": step, "eval_loss": float(totals["loss_sum"]) / max(float(totals["count/loss"]), 1.0)}
  if totals["count/corrupted"] > 0:
    row["eval_nll_corrupted"] = float(totals["nll/corrupted"]) / float(totals["count/corrupted"])
  row.update({f"eval_{k}": v for k, v in losses.finalize_metrics(totals).items()})
  return row


def _format_eval(row: dict[str, Any]) -> str:
  acc = row.get("eval_accuracy")
  return (f"step {row['step']}: eval_loss {row['eval_loss']:.4f}"
          + (f"  eval_nll_corrupted {row['eval_nll_corrupted']:.4f}" if "eval_nll_corrupted" in row else "")
          + (f"  eval_accuracy {acc:.3f}" if acc is not None else ""))


def _sampling_due(icfg, step: int, evaluating: bool, last: bool) -> bool:
  if not icfg.test_prompts:
    return False
  periodic = icfg.every_steps and (step % icfg.every_steps == 0 or last)
  return bool((icfg.at_evaluation and evaluating) or periodic)


def _sample_test_prompts(s: Setup, graphdef, params, step: int, logger: MetricsLogger, bar) -> dict[str, Any]:
  """Answers the test prompts in each decoding mode; logs them all and, given a `bar`, prints them."""
  from flowlm_jax import sampling  # the samplers are only needed when inference testing is on

  icfg = s.config.inference
  modes = ("llada", "flowlm") if icfg.test_both_modes else (icfg.mode,)
  prompts = list(icfg.test_prompts)
  rows = []
  for mode in modes:
    answers = sampling.generate_texts(graphdef, params, s.tokenizer, s.vocab, prompts, icfg, mode=mode,
                                      chat=s.config.dataset.prompt_format == "chat")
    rows += [{"mode": mode, "prompt": prompt, "answer": answer} for prompt, answer in zip(prompts, answers)]
  logger.samples(step, rows)
  if bar is not None and jax.process_index() == 0:
    bar.write(f"step {step}: test prompts (prompt -> answer)\n{format_samples(rows)}")
  return {"step": step, "rows": rows}
