import copy
import json
import errno
import os
import shutil

import jax
import numpy as np
import pytest

from flowlm_jax import checkpoint as ckpt_lib
from flowlm_jax import config as config_lib
from flowlm_jax import loop, train
from flowlm_jax.models.llama import ModelConfig
from helpers import metrics_rows, tiny_config, tree_hashes


@pytest.fixture(scope="module")
def setup():
  return loop.prepare(tiny_config("flowlm"))


def make_state(setup, model_cfg=None, seed=0, **training):
  model_cfg = model_cfg or setup.model_cfg
  tcfg = setup.config.training.to_dict() | training
  _, abstract = train.abstract_model(model_cfg)
  tx, _ = train.make_optimizer(config_lib.from_dict({"training": tcfg}).training, 20, abstract)
  shardings = train.state_shardings(model_cfg, tx, setup.mesh)
  state = train.init_state(model_cfg, tx, seed, shardings)
  return state, ckpt_lib.restore_target(model_cfg, tx, shardings)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved_steps(setup, directory, steps, config_dict=None):
  """A Checkpointer holding `steps` of one state; data position = step."""
  state, abstract = make_state(setup)
  ckpt = ckpt_lib.Checkpointer(str(directory), async_save=False)
  for step in steps:
    ckpt.save(step, state, {"epoch": 0, "position": step}, config_dict or {})
  ckpt.wait()
  return ckpt, state, abstract


def truncate_state(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)


@pytest.fixture
def no_backoff(monkeypatch):
  monkeypatch.setattr(ckpt_lib, "RETRY_DELAYS_S", (0.0, 0.0))


def test_save_then_restore_is_exact(setup, tmp_path):
  state, abstract = make_state(setup, seed=3)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=True)
  ckpt.save(5, state, {"epoch": 1, "position": 7}, {"note": "x"})
  ckpt.wait()
  restored, data_state = ckpt.restore(5, abstract)
  ckpt.close()
  assert data_state == {"epoch": 1, "position": 7}
  assert_trees_equal(state, restored)


def damage_step(step_dir, damage: str) -> None:
  if damage == "truncate":
    truncate_state(step_dir)
  elif damage == "garble_sharding":  # tensorstore: FAILED_PRECONDITION ... Invalid JSON
    (step_dir / "state" / "_sharding").write_text("{not json")
  elif damage == "no_state_metadata":  # Orbax reads no metadata at all: not "a different model"
    os.remove(step_dir / "state" / "_METADATA")
  else:  # delete_state, delete_data, delete_config: an item directory gone
    shutil.rmtree(step_dir / damage.removeprefix("delete_"))


@pytest.mark.parametrize("damage", ["truncate", "delete_state", "delete_data", "delete_config", "garble_sharding",
                                    "no_state_metadata"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(setup, tmp_path, caplog, damage, no_backoff):
  """Damage is recognised at once (no retries: `no_backoff` only shortens them) and the step set aside; the config
  is checked as a resuming trainer checks it."""
  config_dict = setup.config.to_dict()
  ckpt, _, abstract = saved_steps(setup, tmp_path / "ckpt", [1, 2], config_dict=config_dict)
  damage_step(tmp_path / "ckpt" / "2", damage)
  before = tree_hashes(tmp_path / "ckpt" / "1")
  found = ckpt.restore_latest_good(abstract, config_dict=config_dict)
  assert ckpt.all_steps() == [1]
  ckpt.close()
  assert found is not None and found[0] == 1 and found[2]["position"] == 1
  assert [d.name.split(".")[1].split("-")[0] for d in (tmp_path / "ckpt").iterdir() if d.name.startswith("2.")] == ["damaged"]
  assert tree_hashes(tmp_path / "ckpt" / "1") == before
  assert any("checkpoint" in r.message and "damaged" in r.message for r in caplog.records)
  assert not any("could not be read" in r.message for r in caplog.records), "damage was retried as an I/O error"


def test_an_io_error_is_not_damage_whatever_the_paths_in_its_message_say():
  """Marker words are read in the error, not in the paths it names: `runs/corruption_study` is a workdir name."""
  eio = OSError(5, "Input/output error", "/runs/uniform_corruption/checkpoints/4/state/manifest.ocdbt")
  assert ckpt_lib.failure_kind(eio) == ckpt_lib.OTHER
  assert ckpt_lib.failure_kind(ValueError("DATA_LOSS: /runs/a/checkpoints/4/state: checksum mismatch")) == ckpt_lib.DAMAGED
  assert ckpt_lib.failure_kind(FileNotFoundError(2, "No such file", "/runs/a/4/state")) == ckpt_lib.DAMAGED


def test_a_saved_config_this_version_cannot_read_is_a_mismatch_not_an_io_error(setup, tmp_path):
  """A key written by another version: refused in one line at once, nothing retried or moved."""
  ckpt, _, abstract = saved_steps(setup, tmp_path / "ckpt", [1], config_dict={"training": {"some_removed_key": 1}})
  before = tree_hashes(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"holds a config this version cannot read .*some_removed_key"):
    ckpt.restore_latest_good(abstract, config_dict=setup.config.to_dict())
  ckpt.close()
  assert tree_hashes(tmp_path / "ckpt") == before


def test_a_reader_skips_a_damaged_checkpoint_without_moving_it(setup, tmp_path):
  ckpt, _, abstract = saved_steps(setup, tmp_path / "ckpt", [1, 2])
  truncate_state(tmp_path / "ckpt" / "2")
  found = ckpt.restore_latest_good(abstract, set_aside=False)
  ckpt.close()
  assert found[0] == 1 and sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]


def test_a_reader_whose_step_a_training_deletes_meanwhile_reads_the_new_newest(setup, tmp_path, monkeypatch):
  """A notebook loading a run that is training: the trainer saves step 3 and its max_to_keep deletes step 2
  between the reader's listing and its read. Gone is not damaged: the reader lists again and restores step 3."""
  ckpt, state, abstract = saved_steps(setup, tmp_path / "ckpt", [2])
  writer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1, async_save=False)
  check_structure = ckpt_lib.Checkpointer.check_structure

  def save_in_between(self, step, target):
    if self is ckpt and step == 2 and writer.all_steps() == [2]:
      writer.save(3, state, {"epoch": 0, "position": 3}, {})
      writer.wait()
      assert sorted(os.listdir(tmp_path / "ckpt")) == ["3"]
    return check_structure(self, step, target)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "check_structure", save_in_between)
  found = ckpt.restore_latest_good(abstract, set_aside=False)
  writer.close()
  ckpt.close()
  assert found[0] == 3 and found[2]["position"] == 3


def test_when_every_checkpoint_is_damaged_restore_fails_instead_of_starting_fresh(setup, tmp_path):
  """... and so does every later launch, once they are set aside (Orbax lists no step any more)."""
  ckpt, _, abstract = saved_steps(setup, tmp_path / "ckpt", [1, 2])
  for step in (1, 2):
    truncate_state(tmp_path / "ckpt" / str(step))
  with pytest.raises(ckpt_lib.CheckpointError, match="all 2 were damaged"):
    ckpt.restore_latest_good(abstract)
  ckpt.close()
  relaunched = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert relaunched.all_steps() == []
  with pytest.raises(ckpt_lib.CheckpointError, match=r"every step was set aside as damaged \(2\.damaged-\d+, 1\.damaged"):
    relaunched.restore_latest_good(abstract)
  relaunched.close()


def test_checkpoint_of_a_different_model_is_rejected_naming_the_parameter(setup, tmp_path):
  ckpt, _, _ = saved_steps(setup, tmp_path / "ckpt", [1])
  wider = ModelConfig(**{**setup.model_cfg.__dict__, "d_ff": setup.model_cfg.d_ff * 2})
  _, abstract = make_state(setup, wider)
  before = tree_hashes(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="params/w_gate has shape"):
    ckpt.restore_latest_good(abstract)
  ckpt.close()
  assert tree_hashes(tmp_path / "ckpt") == before


def test_checkpoint_of_a_different_optimiser_is_rejected_and_left_untouched(setup, tmp_path):
  ckpt, _, _ = saved_steps(setup, tmp_path / "ckpt", [1, 2])  # gradient clipping on: one more optimiser stage
  _, unclipped = make_state(setup, gradient_clip_val=0.0)
  before = tree_hashes(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"different model or optimiser: .*opt_state/"):
    ckpt.restore_latest_good(unclipped)
  ckpt.close()
  assert tree_hashes(tmp_path / "ckpt") == before


def test_saved_config_that_differs_in_a_key_the_run_must_keep_is_rejected_naming_it(setup, tmp_path):
  saved = setup.config.to_dict()
  ckpt, state, abstract = saved_steps(setup, tmp_path / "ckpt", [1], config_dict=saved)
  changed = copy.deepcopy(saved)
  changed["training"]["learning_rate"] *= 2
  changed["logging"]["log_every"] += 1  # may change on resume
  before = tree_hashes(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"training\.learning_rate") as e:
    ckpt.restore_latest_good(abstract, config_dict=changed)
  assert "log_every" not in str(e.value) and "\n" not in str(e.value) and "--workdir" in str(e.value)
  assert tree_hashes(tmp_path / "ckpt") == before
  changed["training"]["learning_rate"] = saved["training"]["learning_rate"]
  step, restored, _ = ckpt.restore_latest_good(abstract, config_dict=changed)
  ckpt.close()
  assert step == 1
  assert_trees_equal(state, restored)


def test_out_of_memory_while_restoring_is_retried_then_reported_without_moving_anything(setup, tmp_path, no_backoff,
                                                                                        monkeypatch):
  ckpt, _, abstract = saved_steps(setup, tmp_path / "ckpt", [1, 2])
  calls = []

  def out_of_memory(*args, **kwargs):
    calls.append(args)
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes")

  monkeypatch.setattr(ckpt._manager, "restore", out_of_memory)
  before = tree_hashes(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint .*/2 could not be read after 3 attempts"):
    ckpt.restore_latest_good(abstract)
  assert len(calls) == 3 and tree_hashes(tmp_path / "ckpt") == before
  monkeypatch.undo()
  ckpt.close()


def test_a_read_error_that_goes_away_is_retried_and_restores_the_newest_step(setup, tmp_path, no_backoff,
                                                                             monkeypatch):
  ckpt, _, abstract = saved_steps(setup, tmp_path / "ckpt", [1, 2])
  real, failures = ckpt._manager.restore, [OSError(errno.EIO, "Input/output error")]

  def flaky(*args, **kwargs):
    if failures:
      raise failures.pop()
    return real(*args, **kwargs)

  monkeypatch.setattr(ckpt._manager, "restore", flaky)
  found = ckpt.restore_latest_good(abstract)
  monkeypatch.undo()
  ckpt.close()
  assert found[0] == 2 and sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]


def test_resume_path_accepts_step_dirs_checkpoint_dirs_and_workdirs(tmp_path):
  tmp_path = tmp_path.resolve()
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "checkpoints" / "40" / "_CHECKPOINT_METADATA").write_text("{}")  # what Orbax writes into a step
  assert ckpt_lib.resolve_resume_path(str(tmp_path / "checkpoints" / "40")) == (str(tmp_path / "checkpoints"), 40)
  assert ckpt_lib.resolve_resume_path(str(tmp_path)) == (str(tmp_path / "checkpoints"), None)
  assert ckpt_lib.resolve_resume_path(str(tmp_path / "checkpoints")) == (str(tmp_path / "checkpoints"), None)
  (tmp_path / "latest").symlink_to(tmp_path / "checkpoints" / "40")  # a link to a step is that step
  assert ckpt_lib.resolve_resume_path(str(tmp_path / "latest")) == (str(tmp_path / "checkpoints"), 40)
  dated = tmp_path / "runs" / "20241130"  # a workdir named by digits is a workdir, not step 20241130 of runs/
  (dated / "checkpoints").mkdir(parents=True)
  assert ckpt_lib.resolve_resume_path(str(dated)) == (str(dated / "checkpoints"), None)
  with pytest.raises(FileNotFoundError, match="--resume"):
    ckpt_lib.resolve_resume_path(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="^load: no such checkpoint directory"):
    ckpt_lib.resolve_resume_path(str(tmp_path / "nowhere"), what="load")


@pytest.mark.integration
def test_a_relaunch_with_resume_goes_on_from_the_workdirs_own_checkpoints(tmp_path, capsys):
  """`--workdir=y --resume=x/checkpoints/2` relaunched as it was (a requeue) resumes y's own newest step, not x's
  step 2 again, and ends where one uninterrupted run from x/2 ends."""
  config = tiny_config("llada", max_steps=6, save_steps=2)
  source, split, whole = (str(tmp_path / name) for name in ("x", "y", "z"))
  loop.run(tiny_config("llada", max_steps=2, save_steps=2), source)
  resume = os.path.join(source, "checkpoints", "2")
  loop.run(config, whole, resume=resume)
  loop.run(config, split, resume=resume, stop_at_step=4)
  capsys.readouterr()
  loop.run(config, split, resume=resume)
  out = capsys.readouterr().out
  assert f"--resume={os.path.join(source, 'checkpoints')} ignored" in out
  assert f"resumed from {os.path.join(split, 'checkpoints')}/4" in out
  state = {}
  for name in (split, whole):
    ckpt = ckpt_lib.Checkpointer(os.path.join(name, "checkpoints"))
    assert ckpt.all_steps()[-1] == 6
    state[name] = ckpt._manager.restore(6).state["params"]
    ckpt.close()
  assert_trees_equal(state[split], state[whole])


def test_resume_of_a_workdir_without_checkpoints_is_an_error_even_when_it_is_the_run_own(tmp_path):
  workdir = tmp_path / "w"
  (workdir / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="--resume: no checkpoints in"):
    loop.run(tiny_config("llada", max_steps=2), str(workdir), resume=str(workdir))


def evaluation_dies_at(monkeypatch, step: int | None = None):
  """loop.evaluate raising MemoryError at `step` (every step when None), as a process dying in an evaluation;
  returns the real one, to put back for the relaunch."""
  evaluate = loop.evaluate

  def dies(eval_step, params, setup, at):
    if step is None or at == step:
      raise MemoryError("evaluation ran out of memory")
    return evaluate(eval_step, params, setup, at)

  monkeypatch.setattr(loop, "evaluate", dies)
  return evaluate


def evaluated_steps(workdir: str) -> list[int]:
  """The steps of metrics.jsonl's evaluation rows, in file order (a repeated one shows twice)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row["step"] for row in map(json.loads, f) if "eval_loss" in row]


def test_an_evaluation_a_crash_cut_off_mid_run_runs_on_relaunch(tmp_path, monkeypatch):
  """The checkpoint of step 2 is saved before its evaluation; the process dies in that evaluation. The relaunch
  resumes at step 2 and runs the evaluation first, so no evaluation row is lost for good (nor run twice)."""
  evaluate = evaluation_dies_at(monkeypatch, 2)
  workdir, config = str(tmp_path / "w"), tiny_config("llada", max_steps=4, save_steps=2)
  config.evaluation.eval_steps = 2
  with pytest.raises(MemoryError):
    loop.run(config, workdir)
  monkeypatch.setattr(loop, "evaluate", evaluate)
  loop.run(config, workdir)
  assert evaluated_steps(workdir) == [2, 4]
  # A fork from that step (--resume into a new workdir) does not evaluate it again: it ran in the source.
  fork = str(tmp_path / "fork")
  loop.run(config, fork, resume=os.path.join(workdir, "checkpoints", "2"))
  assert evaluated_steps(fork) == [4]


def test_a_save_between_log_steps_writes_the_row_of_the_steps_it_saved(tmp_path, monkeypatch):
  """log_every=4, save_steps=3: the process dies after saving step 3 (in its evaluation). The relaunch resumes
  at 3, so steps 1-3 would never be logged unless the save wrote their row."""
  evaluate = evaluation_dies_at(monkeypatch, 3)
  workdir, config = str(tmp_path / "w"), tiny_config("llada", max_steps=8, save_steps=3)
  config.logging.log_every, config.evaluation.eval_steps = 4, 3
  with pytest.raises(MemoryError):
    loop.run(config, workdir)
  monkeypatch.setattr(loop, "evaluate", evaluate)
  loop.run(config, workdir)
  assert sorted(metrics_rows(workdir)) == [3, 4, 6, 8]  # 3 and 6: saves; 4 and 8: log steps (8 the last)


@pytest.mark.integration
def test_a_failure_in_evaluation_or_sampling_after_the_last_step_keeps_its_checkpoint(tmp_path, monkeypatch):
  evaluate = evaluation_dies_at(monkeypatch)  # evaluation runs at the last step
  workdir, config = str(tmp_path / "w"), tiny_config("llada", max_steps=2, save_steps=100)  # saves at the last step
  with pytest.raises(MemoryError):
    loop.run(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [2]
  ckpt.close()
  # The relaunch has nothing to train; it runs the final evaluation that failed (once: a third launch does not).
  monkeypatch.setattr(loop, "evaluate", evaluate)
  assert loop.run(config, workdir)["eval"]["step"] == 2
  assert "eval" not in loop.run(config, workdir)
  assert evaluated_steps(workdir) == [2]


@pytest.mark.integration
def test_resume_does_not_train_over_a_workdir_whose_steps_were_all_set_aside(tmp_path):
  config = tiny_config("llada", max_steps=2, save_steps=2)
  source, workdir = str(tmp_path / "x"), str(tmp_path / "y")
  loop.run(config, source)
  loop.run(config, workdir)
  truncate_state(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(ckpt_lib.CheckpointError, match="all 1 were damaged"):
    loop.run(config, workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"every step was set aside as damaged \(2\.damaged-"):
    loop.run(config, workdir, resume=source)
  assert [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()] == []


@pytest.mark.integration
def test_resume_of_an_earlier_step_of_the_run_own_workdir_is_refused_before_touching_it(tmp_path):
  """Training from step 2 in a workdir that holds step 4 would fail at the save of step 4, after dropping the
  metrics past step 2: refused at once, nothing changed."""
  config = tiny_config("llada", max_steps=4, save_steps=2)
  workdir = str(tmp_path / "w")
  loop.run(config, workdir)
  before = tree_hashes(tmp_path / "w")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"later steps \(4\) .* resume it into a new --workdir"):
    loop.run(config, workdir, resume=os.path.join(workdir, "checkpoints", "2"))
  os.symlink(workdir, tmp_path / "link")  # the same workdir under another name is the same workdir
  with pytest.raises(ckpt_lib.CheckpointError, match=r"later steps \(4\)"):
    loop.run(config, str(tmp_path / "link"), resume=os.path.join(workdir, "checkpoints", "2"))
  assert tree_hashes(tmp_path / "w") == before
  other = str(tmp_path / "branch")
  assert loop.run(config, other, resume=os.path.join(workdir, "checkpoints", "2"))["checkpoint"].endswith("4")
