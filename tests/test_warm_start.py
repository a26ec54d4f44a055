"""`training.init_from`: a new run starting from the weights of an exported one (warm_start.py)."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from helpers import tiny_config


def params_at(workdir: str, step: int) -> dict:
  from flowlm_jax import load

  run = load(workdir, step=step)
  return {k: np.asarray(jax.device_get(v)) for k, v in run.params.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny export of random weights (seed 3) that no fresh run of tiny_config would draw (seed 0)."""
  from test_export import write_checkpoint

  from flowlm_jax import export

  root = tmp_path_factory.mktemp("warm")
  weights, _ = write_checkpoint(str(root / "source"), tiny_config("flowlm"), step=7, seed=3)
  export.export(str(root / "source"), str(root / "exported"))
  return str(root / "exported"), weights


def fine_tune_config(source: str, **training):
  c = tiny_config("llada", **training)  # another objective than the source's: only the weights carry over
  c.training.init_from = source
  return c


@pytest.mark.integration
def test_a_run_with_init_from_starts_from_the_exported_weights(exported, tmp_path, capsys):
  from flowlm_jax import loop

  source, weights = exported
  # A learning rate of 1e-12 moves no weight by more than ~1e-11 in one step: what is saved is where it started.
  loop.run(fine_tune_config(source, learning_rate=1e-12, max_steps=1, save_steps=1), str(tmp_path / "ft"))
  assert f"initial weights: {source} (exported at its step 7)" in capsys.readouterr().out
  loop.run(tiny_config("llada", learning_rate=1e-12, max_steps=1, save_steps=1), str(tmp_path / "scratch"))
  started, scratch = params_at(str(tmp_path / "ft"), 1), params_at(str(tmp_path / "scratch"), 1)
  assert started.keys() == weights.keys()
  for name, want in weights.items():
    np.testing.assert_allclose(started[name], want, rtol=0, atol=1e-9, err_msg=name)
  # ... and a run without the option is not (norms start at 1 either way; every matrix differs)
  assert [n for n in weights if np.abs(scratch[n] - weights[n]).max() > 1e-3] == [
      n for n in weights if np.ptp(weights[n]) > 0]


@pytest.mark.integration
def test_a_sharded_run_starts_from_the_exported_weights(exported, tmp_path):
  """On 4 simulated devices (fsdp 2 x tensor 2) each device's shards hold the export's values."""
  from helpers import diff_yaml, launch
  from mesh_worker import cpu_env

  source, weights = exported
  overlay = diff_yaml("llada", None, fine_tune_config(source, learning_rate=1e-12, max_steps=1, save_steps=1),
                      str(tmp_path / "tiny.yaml"))
  r = launch("--config=configs/llada.py", f"--config_yaml={overlay}", f"--workdir={tmp_path / 'ft'}",
             "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", env=cpu_env(4))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh: {'data': 1, 'fsdp': 2, 'tensor': 2}" in r.stdout
  started = params_at(str(tmp_path / "ft"), 1)
  for name, want in weights.items():
    np.testing.assert_allclose(started[name], want, rtol=0, atol=1e-9, err_msg=name)


@pytest.mark.integration
def test_a_resumed_fine_tune_continues_from_its_checkpoint_not_from_the_export(exported, tmp_path):
  from flowlm_jax import loop

  source, _ = exported
  config = fine_tune_config(source, max_steps=4, save_steps=2)
  loop.run(config, str(tmp_path / "whole"))
  loop.run(config, str(tmp_path / "split"), stop_at_step=2)
  loop.run(config, str(tmp_path / "split"))  # resumes at step 2 with init_from still set
  whole, split = params_at(str(tmp_path / "whole"), 4), params_at(str(tmp_path / "split"), 4)
  for name in whole:
    np.testing.assert_array_equal(split[name], whole[name], err_msg=name)
  at_two = params_at(str(tmp_path / "split"), 2)
  assert any(np.abs(whole[n] - at_two[n]).max() > 0 for n in whole)  # steps 3-4 trained


def test_init_from_and_model_pretrained_are_refused_together(exported):
  from flowlm_jax import config as config_lib

  c = fine_tune_config(exported[0])
  c.model.pretrained = c.model.tokenizer = exported[0]  # passes model.pretrained's own checks
  with pytest.raises(ValueError, match="^training.init_from: set it or model.pretrained"):
    config_lib.validate(c)


def _damaged_weights(path):
  with open(os.path.join(path, "model.safetensors"), "r+b") as f:
    f.truncate(100)


def _not_an_export(path):
  os.remove(os.path.join(path, "config.json"))


def _config_without(key):
  def damage(path):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
      meta = json.load(f)
    del meta[key]
    with open(config_path, "w") as f:
      json.dump(meta, f)
  return damage


def _no_tokenizer(path):
  for name in os.listdir(path):
    if name.startswith(("tokenizer", "special_tokens")):
      os.remove(os.path.join(path, name))


@pytest.mark.parametrize("change, damage, message", [
    (lambda c: setattr(c.model, "d_model", 48), None, r"another architecture: .*d_model=32 \(the run's: 48\)"),
    (lambda c: setattr(c.model, "rope_theta", 5e5), None, r"another architecture: rope_theta=10000.0"),
    (lambda c: setattr(c.model, "tokenizer", "embedded"), None, "another tokenizer than model.tokenizer"),
    (None, _damaged_weights, "model.safetensors"),
    (None, _not_an_export, "is not a directory written by `python -m flowlm_jax.export`"),
    (None, _no_tokenizer, "its tokenizer files do not load"),
    (None, _config_without("step"), r"config.json is incomplete or damaged \(KeyError: 'step'\)"),
    (None, _config_without("model_shape"), r"config.json is incomplete or damaged \(KeyError: 'model_shape'\)"),
    (lambda c: setattr(c.training, "init_from", "/no/such/export"), None, "/no/such/export is not a directory"),
])
def test_what_cannot_start_the_run_fails_in_one_line_before_anything_compiles(exported, change, damage, message,
                                                                               tmp_path, caplog):
  import shutil

  from flowlm_jax import loop

  source = str(tmp_path / "export")
  shutil.copytree(exported[0], source)
  if damage:
    damage(source)
  c = fine_tune_config(source)
  if change:
    change(c)
  with jax.log_compiles(), caplog.at_level(logging.WARNING), pytest.raises(
      ValueError, match=f"^training.init_from: .*{message}") as e:
    loop.run(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert [r.getMessage()[:60] for r in caplog.records if r.getMessage().startswith("Compiling jit(")] == []
  assert not os.path.isdir(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")


@pytest.mark.integration
def test_a_resume_needs_the_export_no_more(exported, tmp_path):
  import shutil

  from flowlm_jax import loop

  source = str(tmp_path / "export")
  shutil.copytree(exported[0], source)
  config = fine_tune_config(source, max_steps=2, save_steps=1)
  loop.run(config, str(tmp_path / "run"), stop_at_step=1)
  shutil.rmtree(source)
  assert loop.run(config, str(tmp_path / "run"))["checkpoint"].endswith(os.path.join("checkpoints", "2"))


def test_init_from_may_change_when_a_run_resumes():
  from flowlm_jax import config as config_lib

  saved = tiny_config("llada").to_dict()
  new = tiny_config("llada")
  new.training.init_from = "/elsewhere"
  assert config_lib.resume_differences(saved, new.to_dict()) == []
  new.training.seed = 5
  assert config_lib.resume_differences(saved, new.to_dict()) == ["training.seed (0 -> 5)"]
