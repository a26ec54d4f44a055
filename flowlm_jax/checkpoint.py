"""Orbax checkpoints of (train state, data-iterator state, resolved config).

Orbax writes a step into a temporary directory and renames it only when every file is committed, so
a crash mid-save never replaces a good checkpoint with a partial one. On restore the newest step is
tried first; a damaged one (files missing or truncated) is reported in one line and the previous one
is used. Arrays are restored straight into the shardings of the current mesh, so a checkpoint saved on
one mesh or device count loads on another.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from flowlm_jax import train
from flowlm_jax.train import TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  pass


def _state_dict(state: TrainState) -> dict[str, Any]:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
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
    self._manager.wait_until_finished()
    self._manager.close()

  def read_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def check_shapes(self, step: int, abstract: TrainState) -> None:
    """Fails with one line naming the first parameter whose saved shape differs from the model's."""
    meta = self._manager.item_metadata(step)["state"]
    saved = getattr(meta, "tree", meta)["params"]
    expected = abstract.params
    for name, want in expected.items():
      if name not in saved:
        raise CheckpointError(f"checkpoint {self.directory}/{step} has no parameter {name!r}: it was saved from a different model")
      got = tuple(getattr(saved[name], "shape", ()))
      if got != tuple(want.shape):
        raise CheckpointError(f"checkpoint {self.directory}/{step}: parameter {name!r} has shape {got}, "
                              f"the configured model expects {tuple(want.shape)}")
    extra = set(saved) - set(expected)
    if extra:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has parameters the model lacks: {sorted(extra)}")

  def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    """(state placed as `abstract`'s shardings say, data-iterator state)."""
    self.check_shapes(step, abstract)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_dict(abstract)), data=ocp.args.JsonRestore()))
    return TrainState(**restored.state), restored.data

  def restore_latest_good(self, abstract: TrainState, step: int | None = None) -> tuple[int, TrainState, dict] | None:
    """Newest restorable step at or below `step` (default: any); damaged ones are reported and skipped."""
    candidates = [s for s in reversed(self.all_steps()) if step is None or s <= step]
    if step is not None and step not in candidates:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    for s in candidates:
      try:
        state, data_state = self.restore(s, abstract)
        return s, state, data_state
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means this step is damaged
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if step is not None:
          raise CheckpointError(f"checkpoint {self.directory}/{s} is damaged ({reason})") from None
        moved = self._set_aside(s)
        log.warning("checkpoint %s/%d is damaged (%s); moved to %s, trying the previous one", self.directory, s,
                    reason, moved)
    return None

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step out of Orbax's sight (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{int(time.time())}"
    if jax.process_index() == 0 and os.path.isdir(src):
      os.rename(src, dst)
    self._manager.reload()
    return dst


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings, the restore target for Orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def restore_target(model_cfg, tx, shardings: TrainState) -> TrainState:
  """The restore target of a train state for this model and optimiser, allocating nothing."""
  return abstract_state(jax.eval_shape(lambda: train.init_state(model_cfg, tx, 0, shardings)), shardings)


def resolve_resume_path(path: str) -> tuple[str, int | None]:
  """`--resume` accepts a step directory (`…/checkpoints/1000`), a checkpoints directory or a workdir."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--resume: no such checkpoint directory: {path}")
  base = os.path.basename(path)
  if base.isdigit():
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None
