"""`training.init_from`: a new run starting from the weights of an exported one (warm_start.py)."""

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


def test_init_from_must_be_an_export_and_not_beside_model_pretrained(exported, tmp_path):
  from flowlm_jax import config as config_lib
  from flowlm_jax import loop

  with pytest.raises(ValueError, match="training.init_from: no such directory: .*missing"):
    config_lib.validate(fine_tune_config(str(tmp_path / "missing")))
  not_export = tmp_path / "plain"
  not_export.mkdir()
  (not_export / "config.json").write_text('{"model_type": "llada"}')
  with pytest.raises(ValueError, match="^training.init_from: .*plain is not a directory written by"):
    loop.prepare(fine_tune_config(str(not_export)))
  c = fine_tune_config(exported[0])
  c.model.pretrained = c.model.tokenizer = exported[0]  # passes model.pretrained's own checks
  with pytest.raises(ValueError, match="training.init_from: set it or model.pretrained"):
    config_lib.validate(c)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model, "d_model", 48), r"parameter '.*' has shape"),
    (lambda c: setattr(c.model, "n_layers", 3), r"parameter '.*' has shape"),
    (lambda c: setattr(c.model, "tokenizer", "embedded"), "another tokenizer than model.tokenizer"),
])
def test_another_architecture_or_tokenizer_fails_in_one_line_before_any_compile(exported, change, message,
                                                                                monkeypatch):
  from flowlm_jax import loop, train

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before the check")
  monkeypatch.setattr(train, "compile_steps", no_compile)
  c = fine_tune_config(exported[0])
  change(c)
  with pytest.raises(ValueError, match=f"^training.init_from: .*{message}") as e:
    loop.prepare(c)
  assert "\n" not in str(e.value)


def test_init_from_may_change_when_a_run_resumes():
  from flowlm_jax import config as config_lib

  saved = tiny_config("llada").to_dict()
  new = tiny_config("llada")
  new.training.init_from = "/elsewhere"
  assert config_lib.resume_differences(saved, new.to_dict()) == []
  new.training.seed = 5
  assert config_lib.resume_differences(saved, new.to_dict()) == ["training.seed (0 -> 5)"]
