import os

import jax
import numpy as np
import pytest

from flowlm_jax import checkpoint as ckpt_lib
from flowlm_jax import loop, train
from flowlm_jax.model import ModelConfig
from helpers import tiny_config


@pytest.fixture(scope="module")
def setup():
  return loop.prepare(tiny_config("flowlm"))


def make_state(setup, model_cfg=None, seed=0):
  model_cfg = model_cfg or setup.model_cfg
  _, abstract = train.abstract_model(model_cfg)
  tx, _ = train.make_optimizer(setup.config.training, 20, abstract)
  shardings = train.state_shardings(model_cfg, tx, setup.mesh)
  state = train.init_state(model_cfg, tx, seed, shardings)
  return state, ckpt_lib.restore_target(model_cfg, tx, shardings)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_then_restore_is_exact(setup, tmp_path):
  state, abstract = make_state(setup, seed=3)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=True)
  ckpt.save(5, state, {"epoch": 1, "position": 7}, {"note": "x"})
  ckpt.wait()
  restored, data_state = ckpt.restore(5, abstract)
  ckpt.close()
  assert data_state == {"epoch": 1, "position": 7}
  assert_trees_equal(state, restored)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path, caplog):
  state, abstract = make_state(setup)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state, {"epoch": 0, "position": 1}, {})
  ckpt.save(2, state, {"epoch": 0, "position": 2}, {})
  ckpt.wait()
  state_dir = tmp_path / "ckpt" / "2" / "state"
  for root, _, files in os.walk(state_dir):  # truncate every data file of the newest step
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)
  found = ckpt.restore_latest_good(abstract)
  ckpt.close()
  assert found is not None and found[0] == 1 and found[2]["position"] == 1
  assert any("checkpoint" in r.message and "damaged" in r.message for r in caplog.records)


def test_checkpoint_of_a_different_model_is_rejected_naming_the_parameter(setup, tmp_path):
  state, _ = make_state(setup)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state, {"epoch": 0, "position": 0}, {})
  ckpt.wait()
  wider = ModelConfig(**{**setup.model_cfg.__dict__, "d_ff": setup.model_cfg.d_ff * 2})
  _, abstract = make_state(setup, wider)
  with pytest.raises(ckpt_lib.CheckpointError, match="w_gate|w_up|w_down"):
    ckpt.restore_latest_good(abstract)
  ckpt.close()


def test_resume_path_accepts_step_dirs_checkpoint_dirs_and_workdirs(tmp_path):
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  assert ckpt_lib.resolve_resume_path(str(tmp_path / "checkpoints" / "40")) == (str(tmp_path / "checkpoints"), 40)
  assert ckpt_lib.resolve_resume_path(str(tmp_path)) == (str(tmp_path / "checkpoints"), None)
  assert ckpt_lib.resolve_resume_path(str(tmp_path / "checkpoints")) == (str(tmp_path / "checkpoints"), None)
  with pytest.raises(FileNotFoundError, match="--resume"):
    ckpt_lib.resolve_resume_path(str(tmp_path / "nowhere"))
