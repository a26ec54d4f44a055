"""Orbax checkpoints of (train state, data-iterator state, resolved config).

Orbax writes a step into a temporary directory and renames it only when every file is committed, so
a crash mid-save never replaces a good checkpoint with a partial one. Arrays are restored straight into
the shardings of the current mesh, so a checkpoint saved on one mesh or device count loads on another.

A failed restore is one of three kinds, and only the first ever moves a file:
- damaged (files missing or truncated, undecodable metadata): the trainer renames the step
  `N.damaged-<time>` (kept, never deleted) once every process has failed on it (or some have on every attempt,
  the others reading their part: a file only they read), and tries the previous one;
- mismatch (saved config differs in a key a resumed run must keep, or the saved parameter/optimiser
  tree differs from the model's): one-line `CheckpointMismatch`, nothing touched;
- anything else (out of memory, I/O errors of a shared filesystem, processes that disagree): retried with
  backoff, then a one-line `CheckpointError`, nothing touched.
A step that vanished while a single process read it (a training beside it deleted it, `max_to_keep`) is not
damage: the steps are listed again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flowlm_jax import config as config_lib
from flowlm_jax import train
from flowlm_jax.errors import first_line
from flowlm_jax.train import TrainState

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (2.0, 8.0, 30.0)  # waits before each retry of a step that failed for a non-damage reason
MAX_RELISTS = 3  # a reader whose step was deleted under it (a training's max_to_keep) lists the steps again this often
# Status codes and messages by which tensorstore/Orbax report files that are missing, truncated or corrupt.
DAMAGE_MARKERS = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "Truncated", "Error decoding", "checksum", "corrupt",
                  "Invalid JSON")
TRANSIENT_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                     "ABORTED")
START_FRESH = "to start a new run instead, use a new --workdir"
OK, DAMAGED, OTHER, MISMATCH = range(4)  # outcomes of one restore attempt, compared across processes


class CheckpointError(RuntimeError):
  pass


class CheckpointMismatch(CheckpointError):
  """The checkpoint belongs to a differently configured run: never set aside, never retried."""


def _state_dict(state: TrainState) -> dict[str, Any]:
  """The state's fields by name, leaving out empty ones (`fp8` without FP8): a bf16 run saves exactly what
  it saved before FP8 existed, so its old checkpoints restore unchanged."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}


def failure_kind(e: BaseException) -> int:
  """DAMAGED when the error (or its cause) says a file is missing, truncated or corrupt, else OTHER."""
  chain = []
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  # Paths leave the text first: a workdir named `runs/corruption_study` must not make an I/O error read as damage.
  text = re.sub(r"\S*/\S*", "<path>", " ".join(f"{type(x).__name__}: {x}" for x in chain))
  if any(isinstance(x, MemoryError) for x in chain) or any(m in text for m in TRANSIENT_MARKERS):
    return OTHER
  if any(isinstance(x, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)) for x in chain):
    return DAMAGED
  if any(isinstance(x, KeyError) and ("Unknown key" in str(x) or "was not found in the checkpoint" in str(x))
         for x in chain):  # an item directory (state, data, config) is missing
    return DAMAGED
  return DAMAGED if any(m in text for m in DAMAGE_MARKERS) else OTHER


def _tree_paths(tree) -> dict[str, tuple]:
  """{"opt_state/1/0/mu/embed": shape}: key paths spelled the same for a restore target and Orbax metadata."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _all_processes(outcome: int) -> list[int]:
  """Every process's outcome (one element on a single process)."""
  if jax.process_count() == 1:
    return [outcome]
  from jax.experimental import multihost_utils
  return [int(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)]


# The barrier Orbax's Checkpointer.restore ends with (orbax-checkpoint 0.11-0.12), where the processes whose read
# succeeded wait; its collective has the shape of the outcome agreement's (an allgather of one number per process).
# Its key carries the manager's prefix, set here (Orbax's synchronous and asynchronous checkpointers default it
# differently).
ORBAX_RESTORE_BARRIER, BARRIER_PREFIX = "Checkpointer:restore", "flowlm"


def _meet_restore_barriers(count: int) -> None:
  """Takes `count` closing barriers of Orbax restores this process skipped by raising, where the other processes
  wait (or, failing too, take them here)."""
  if jax.process_count() > 1:
    for _ in range(count):
      ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key(ORBAX_RESTORE_BARRIER,
                                                                          prefix=BARRIER_PREFIX))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=BARRIER_PREFIX))
    # Naming the item handlers lets a fresh process read metadata before any save.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, config_dict: dict) -> None:
    """Starts an (asynchronous) save; call `wait()` before relying on it."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_dict(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self._manager.wait_until_finished()  # raises if an asynchronous save failed: say so, but still close
    finally:
      self._manager.close()

  def read_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def check_config(self, step: int, saved: dict, config_dict: dict) -> None:
    """Fails naming the keys in which the new config differs from the `saved` one where a resume must not."""
    try:
      diffs = config_lib.resume_differences(saved, config_dict)
    except (KeyError, ValueError, TypeError) as e:  # e.g. a key this version no longer knows
      raise CheckpointMismatch(f"checkpoint {self.directory}/{step} holds a config this version cannot read "
                               f"({first_line(e, 200)}); resume with the version that wrote it, or {START_FRESH}") from e
    if diffs:
      raise CheckpointMismatch(f"checkpoint {self.directory}/{step} was saved with a different config: "
                               f"{', '.join(diffs)}; resume with the saved values, or {START_FRESH}")

  def check_structure(self, step: int, abstract: TrainState) -> None:
    """Fails naming the parameter/optimiser paths whose saved shape or presence differs from the target's."""
    meta = self._manager.item_metadata(step)["state"]
    if not meta:  # state/_METADATA missing or empty: the step is damaged, not another model's
      raise FileNotFoundError(f"{self.directory}/{step}/state has no readable metadata")
    saved, want = _tree_paths(getattr(meta, "tree", meta)), _tree_paths(_state_dict(abstract))
    order = sorted(want, key=lambda p: (not p.startswith("params/"), p))  # parameters first: the likelier cause
    problems = [f"{p} has shape {saved[p]}, expected {want[p]}" for p in order if p in saved and saved[p] != want[p]]
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    fp8_problem = _fp8_mismatch(set(saved), set(want))
    if fp8_problem:  # said once, instead of listing its paths
      problems.append(fp8_problem)
      missing, extra = [p for p in missing if not _is_fp8(p)], [p for p in extra if not _is_fp8(p)]
    if missing:
      problems.append(f"{len(missing)} path(s) missing from the checkpoint ({', '.join(missing[:3])}"
                      f"{', ...' if len(missing) > 3 else ''})")
    if extra:
      problems.append(f"{len(extra)} path(s) the model lacks ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
    if problems:
      raise CheckpointMismatch(f"checkpoint {self.directory}/{step} was saved from a different model or optimiser: "
                               f"{'; '.join(problems[:4])}; {START_FRESH}")

  def restore(self, step: int, abstract: TrainState, config_dict: dict | None = None) -> tuple[TrainState, dict]:
    """(state placed as `abstract`'s shardings say, data-iterator state), after the config/structure checks.

    It makes one Orbax restore (the state's) or two (the config's first), each ending in a barrier of every
    process. A process that fails before the last of them meets the barriers it skipped, so that its next
    collective, the outcome agreement, is every other process's next one too (else the job's collectives part:
    a hang)."""
    barriers, met = 1 + (config_dict is not None), 0
    try:
      if config_dict is not None:
        saved = self.read_config(step)
        met += 1
        self.check_config(step, saved, config_dict)
      self.check_structure(step, abstract)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_state_dict(abstract)), data=ocp.args.JsonRestore()))
    except Exception:
      _meet_restore_barriers(barriers - met)
      raise
    return TrainState(**restored.state), restored.data

  def restore_latest_good(self, abstract: TrainState, step: int | None = None, *, config_dict: dict | None = None,
                          set_aside: bool = True) -> tuple[int, TrainState, dict] | None:
    """Newest restorable step at or below `step` (default: any); None only when there is no checkpoint.

    A damaged step is skipped (and with `set_aside`, renamed by process 0); an explicitly asked `step`
    that is damaged, a mismatch, or a step that keeps failing otherwise raises CheckpointError.
    """
    candidates = [s for s in reversed(self.all_steps()) if step is None or s <= step]
    if step is not None and step not in candidates:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    damaged, relists = [], 0
    while candidates:
      s = candidates.pop(0)
      found, reason = self._restore_agreed(s, abstract, config_dict)
      if found is not None:
        return (s, *found)
      if (step is None and relists < MAX_RELISTS and jax.process_count() == 1
          and not os.path.isdir(os.path.join(self.directory, str(s)))):
        # Gone, not damaged: a training writing here deleted it (max_to_keep) after a newer save. List again.
        # One process only (a notebook, sample, export): the processes of a job would each decide for themselves
        # whether the step is gone, some while process 0 renames it aside, and their collectives would part.
        log.warning("checkpoint %s/%d was deleted while being read; reading the newest step again", self.directory, s)
        self._manager.reload()
        candidates, relists = [n for n in reversed(self.all_steps()) if n not in damaged], relists + 1
        continue
      if step is not None:
        raise CheckpointError(f"checkpoint {self.directory}/{s} is damaged ({reason})")
      damaged.append(s)
      moved = f"moved to {self._set_aside(s)}" if set_aside else "left in place"
      log.warning("checkpoint %s/%d is damaged (%s); %s, trying the previous one", self.directory, s, reason, moved)
    if damaged:
      raise CheckpointError(f"no checkpoint in {self.directory} could be restored: all {len(damaged)} were damaged"
                            + (f" (set aside as N.damaged-*); {START_FRESH}" if set_aside else ""))
    set_aside_before = self.set_aside_steps()
    if set_aside_before:  # an earlier launch set every step aside: starting fresh here would train over them
      raise CheckpointError(f"no checkpoint in {self.directory} could be restored: every step was set aside as "
                            f"damaged ({', '.join(set_aside_before[:3])}{', ...' if len(set_aside_before) > 3 else ''}); "
                            f"{START_FRESH}")
    return None

  def set_aside_steps(self) -> list[str]:
    """The names of the steps set aside as damaged (`N.damaged-<time>`), newest step first."""
    names = [n for n in os.listdir(self.directory) if ".damaged-" in n and n.split(".")[0].isdigit()]
    return sorted(names, key=lambda n: -int(n.split(".")[0]))

  def _restore_agreed(self, step: int, abstract: TrainState, config_dict):
    """((state, data), None) on success, (None, reason) when the processes agree the step is damaged: every one
    finds it so, or some do on every attempt while the others read their part (a file only they read is damaged)."""
    damaged_somewhere_every_time = True
    for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
      time.sleep(delay)
      found, error, outcome = None, None, OK
      try:
        found = self.restore(step, abstract, config_dict)
      except Exception as e:  # noqa: BLE001 - classified below; only agreed damage moves anything
        error, outcome = e, MISMATCH if isinstance(e, CheckpointMismatch) else failure_kind(e)
      outcomes = _all_processes(outcome)
      if MISMATCH in outcomes:
        raise error if outcome == MISMATCH else CheckpointMismatch(
            f"checkpoint {self.directory}/{step} does not match this run on another process; {START_FRESH}")
      if all(o == OK for o in outcomes):
        return found, None
      why = first_line(error, 200) if error is not None else "it failed on another process"
      damaged_somewhere_every_time &= set(outcomes) == {OK, DAMAGED}
      if all(o == DAMAGED for o in outcomes) or (attempt == len(RETRY_DELAYS_S) and damaged_somewhere_every_time):
        return None, why
      log.warning("checkpoint %s/%d could not be read (%s); attempt %d of %d", self.directory, step, why, attempt + 1,
                  len(RETRY_DELAYS_S) + 1)
    raise CheckpointError(f"checkpoint {self.directory}/{step} could not be read after {len(RETRY_DELAYS_S) + 1} "
                          f"attempts ({why}); nothing was moved: relaunch when the cause is fixed")

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step out of Orbax's sight (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{int(time.time())}"
    if jax.process_index() == 0 and os.path.isdir(src):
      os.rename(src, dst)
    _sync(f"flowlm-set-aside-{step}")  # no process lists the steps again before the rename
    self._manager.reload()
    return dst


def _is_fp8(path: str) -> bool:
  return path.startswith("fp8/")


def _fp8_mismatch(saved: set[str], want: set[str]) -> str | None:
  """What to say when only one side has an FP8 scaling state (model.matmul_dtype differs between the runs)."""
  has_saved, has_want = any(map(_is_fp8, saved)), any(map(_is_fp8, want))
  if has_want and not has_saved:
    return "it has no FP8 scaling state (saved by a model.matmul_dtype=bfloat16 run; this run uses fp8)"
  if has_saved and not has_want:
    return "it holds an FP8 scaling state (saved by a model.matmul_dtype=fp8 run; this run uses bfloat16)"
  return None


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings, the restore target for Orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def restore_target(model_cfg, tx, shardings: TrainState) -> TrainState:
  """The restore target of a train state for this model and optimiser, allocating nothing."""
  return abstract_state(jax.eval_shape(lambda: train.init_state(model_cfg, tx, 0, shardings)), shardings)


# In the workdir: the directory launch.py ran in, where the config's relative paths (tokenizer, model, data) start.
LAUNCH_FILE = "launch.json"


def record_launch_directory(workdir: str) -> None:
  """Writes LAUNCH_FILE (whole or not at all): the directory this process runs in."""
  path = os.path.join(workdir, LAUNCH_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"cwd": os.getcwd()}, f)
  os.replace(path + ".tmp", path)


def launch_directory(workdir: str) -> str | None:
  """The directory the run at `workdir` was last launched from, or None (a run from before LAUNCH_FILE, or an
  unreadable file: its paths are then read as typed)."""
  try:
    with open(os.path.join(workdir, LAUNCH_FILE)) as f:
      cwd = json.load(f)["cwd"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return cwd if isinstance(cwd, str) else None


def resolve_resume_path(path: str, what: str = "--resume") -> tuple[str, int | None]:
  """(checkpoints directory, step or None) of a step directory (`…/checkpoints/1000`), a checkpoints directory or
  a workdir (a workdir may be named by digits: a step directory is one Orbax wrote). Symlinks are resolved."""
  path = os.path.realpath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}: no such checkpoint directory: {path}")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  base = os.path.basename(path)
  if base.isdigit() and is_step_directory(path):
    return os.path.dirname(path), int(base)
  return path, None


def is_step_directory(path: str) -> bool:
  """Whether `path` is one step Orbax saved (its metadata file, or a damaged step's item directories)."""
  return (os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))
          or any(os.path.isdir(os.path.join(path, item)) for item in ("state", "config", "data")))
