"""`flowlm_jax.load`: how a loaded model's prompts are rendered (`dataset.prompt_format`).

A released Instruct model was fine-tuned on rows rendered by its chat template, so `generate`, sample and
evaluate must prompt it through that template; a base release, and a run trained here, keep what they were
trained on. The releases are the tiny fixtures of tests/fixtures (Instruct-style tokenizers: the template's
tokens are tokens of their vocabularies), edited in copies into base-style ones.
"""

from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pytest

import flowlm_jax
from flowlm_jax import sampling
from flowlm_jax.formats import llama_hf
from flowlm_jax.tokenizer import load_tokenizer
from helpers import REPO, load_preset

LLADA = os.path.join(REPO, "tests", "fixtures", "llada_tiny")
DREAM = os.path.join(REPO, "tests", "fixtures", "dream_tiny")
RELEASES = pytest.mark.parametrize("directory", [LLADA, DREAM], ids=["llada", "dream"])
PROMPT = "Who wrote Lear?"


def prompt_sent(run, monkeypatch) -> list[int]:
  """The ids `run.generate([PROMPT])` hands the sampler (which is not run: the encoding is what is tested)."""
  sent = []

  def sampler(graphdef, params, prompt_ids, vocab, icfg, **kwargs):
    sent.extend(prompt_ids)
    return types.SimpleNamespace(answer=np.full((len(prompt_ids), 2), vocab.eos_id))

  monkeypatch.setattr(sampling, "generate", sampler)
  run.generate([PROMPT])
  return sent[0]


def templated(tokenizer) -> list[int]:
  """PROMPT as one user turn of the tokenizer's chat template, the assistant's header last."""
  turn = [{"role": "user", "content": PROMPT}]
  return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)["input_ids"]


def plain(run) -> list[int]:
  return run.tokenizer.encode(PROMPT, add_special_tokens=False) + [run.vocab.sep_id]


def base_llada(tmp_path) -> str:
  """LLaDA as the Base release ships it: Instruct's chat template, but <|start_header_id|>, <|end_header_id|> and
  <|eot_id|> are not tokens of the vocabulary (their ids hold reserved tokens), so the template spells them in
  ordinary pieces. The directory's name says nothing."""
  out = tmp_path / "llada_release"
  shutil.copytree(LLADA, out)
  tokenizer_json = json.loads((out / "tokenizer.json").read_text())
  names = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
  turn_tokens = [t for t in tokenizer_json["added_tokens"] if t["content"] in names]
  assert len(turn_tokens) == 3
  for i, token in enumerate(turn_tokens):
    token["content"] = f"<|reserved_token_{i}|>"
  (out / "tokenizer.json").write_text(json.dumps(tokenizer_json))
  return str(out)


@RELEASES
def test_an_instruct_release_is_prompted_through_its_chat_template(directory, monkeypatch):
  run = flowlm_jax.load(directory)
  assert run.config.dataset.prompt_format == "chat"
  expected = templated(run.tokenizer)
  assert prompt_sent(run, monkeypatch) == expected and expected != plain(run)


def test_a_base_release_that_ships_the_template_without_its_tokens_stays_plain(tmp_path, monkeypatch):
  run = flowlm_jax.load(base_llada(tmp_path))
  assert run.tokenizer.chat_template == load_tokenizer(LLADA).chat_template  # the template alone is no signal
  assert "<|eot_id|>" not in run.tokenizer.get_added_vocab()
  assert run.config.dataset.prompt_format == "plain"
  assert prompt_sent(run, monkeypatch) == plain(run)


def test_an_instruct_release_whose_eos_is_its_end_of_turn_token_is_prompted_through_its_template(tmp_path):
  """Llama-3-style Instruct tokenizers name <|eot_id|> as EOS: the end-of-turn marker is still a token of its own."""
  directory = tmp_path / "llada-tiny-instruct"
  shutil.copytree(LLADA, directory)
  config_path = directory / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config["eos_token"] = "<|eot_id|>"
  config_path.write_text(json.dumps(config))
  tokenizer = load_tokenizer(str(directory))
  assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
  assert flowlm_jax.load(str(directory)).config.dataset.prompt_format == "chat"


@pytest.mark.parametrize("name, expected", [
    ("Dream-v0-Base-7B", "plain"),
    ("Dream-v0-Instruct-7B", "chat"),
    ("models--Dream-org--Dream-v0-Base-7B/snapshots/0123abc", "plain"),  # the hub cache's layout
    ("database", "chat"),                                                 # "base" only as a word of the name
])
def test_a_release_named_base_stays_plain(tmp_path, name, expected):
  """Dream's Qwen2.5 vocabulary holds ChatML's tokens in its Base release too: there the name decides."""
  directory = tmp_path / name
  shutil.copytree(DREAM, directory)
  assert flowlm_jax.load(str(directory)).config.dataset.prompt_format == expected


def test_a_tokenizer_without_a_chat_template_stays_plain(tmp_path):
  shutil.copytree(DREAM, tmp_path / "dream")
  os.remove(tmp_path / "dream" / "chat_template.jinja")
  format_, why = llama_hf.prompt_format_of(str(tmp_path / "dream"), load_tokenizer(str(tmp_path / "dream")))
  assert (format_, why) == ("plain", "its tokenizer has no chat template")


def test_an_explicit_prompt_format_wins(tmp_path, monkeypatch):
  instruct = flowlm_jax.load(LLADA, prompt_format="plain")
  assert instruct.config.dataset.prompt_format == "plain" and prompt_sent(instruct, monkeypatch) == plain(instruct)
  base = flowlm_jax.load(base_llada(tmp_path), prompt_format="chat")
  assert base.config.dataset.prompt_format == "chat" and prompt_sent(base, monkeypatch) == templated(base.tokenizer)
  assert flowlm_jax.load(LLADA, prompt_format="auto").config.dataset.prompt_format == "chat"  # auto: the rule


def test_a_run_keeps_the_prompt_format_it_recorded_unless_one_is_given(tmp_path):
  """A run fine-tuned from an Instruct release on plain records was trained on plain rows: loading it does not
  apply the release rule. Loop.py records the resolved format with every checkpoint."""
  from test_export import write_checkpoint

  c = load_preset("flowlm", "tasks")
  c.model.pretrained = c.model.tokenizer = LLADA
  c.dataset.prompt_format = "plain"
  write_checkpoint(str(tmp_path / "run"), c, step=2)
  assert flowlm_jax.load(str(tmp_path / "run")).config.dataset.prompt_format == "plain"
  assert flowlm_jax.load(str(tmp_path / "run"), prompt_format="chat").config.dataset.prompt_format == "chat"


def test_a_bad_prompt_format_is_a_one_line_error_before_anything_loads(tmp_path):
  with pytest.raises(ValueError, match=r"prompt_format='Chat': expected one of auto, plain, chat") as info:
    flowlm_jax.load(str(tmp_path / "absent"), prompt_format="Chat")
  assert "\n" not in str(info.value)


def test_a_damaged_newest_config_is_read_from_the_previous_step_and_a_step_is_never_silently_swapped(tmp_path):
  """load() skips damage as a resuming trainer does: the newest step whose config is unreadable still loads (its
  weights are fine; the config is the run's, read from the step before). An explicit step that contradicts the
  directory named, or a step of a release (always step 0), is refused instead of quietly replaced."""
  from test_export import write_checkpoint

  c = load_preset("llada", "demo")
  for step in (2, 4):
    write_checkpoint(str(tmp_path / "run"), c, step=step)
  (tmp_path / "run" / "checkpoints" / "4" / "config" / "metadata").write_text("{trunc")
  assert flowlm_jax.load(str(tmp_path / "run")).step == 4
  with pytest.raises(ValueError, match=r"checkpoints/4 is the directory of step 4, not step 2"):
    flowlm_jax.load(str(tmp_path / "run" / "checkpoints" / "4"), step=2)
  with pytest.raises(ValueError, match=r"is a released checkpoint \(step 0\), not a run with a step 500"):
    flowlm_jax.load(LLADA, step=500)


def test_a_run_launched_elsewhere_finds_its_relative_tokenizer_model_and_data(tmp_path, monkeypatch):
  """A run launched from a project directory with relative paths (as typed) loads from another directory, e.g. a
  notebook's, also through a symlinked runs/ (a cluster's scratch disk): the paths start where the run was
  launched (checkpoint.LAUNCH_FILE, which loop.py writes; here written as it would be)."""
  from test_export import write_checkpoint

  from flowlm_jax import checkpoint as ckpt_lib

  project, scratch = tmp_path / "project", tmp_path / "scratch"
  shutil.copytree(LLADA, project / "release")
  (project / "data").mkdir()
  (project / "data" / "valid.jsonl").write_text("")
  scratch.mkdir()
  (project / "runs").symlink_to(scratch, target_is_directory=True)
  c = load_preset("flowlm", "tasks")
  c.model.pretrained = c.model.tokenizer = "release"
  c.dataset.name, c.dataset.validation_files = "", "data/valid.jsonl"
  monkeypatch.chdir(project)
  write_checkpoint("runs/r", c, step=2)
  (project / "notebooks").mkdir()
  monkeypatch.chdir(project / "notebooks")
  with pytest.raises(FileNotFoundError, match=r"model.tokenizer: cannot load 'release'"):
    flowlm_jax.load("../runs/r")  # a run from before the launch directory was recorded: paths as typed
  monkeypatch.chdir(project)
  ckpt_lib.record_launch_directory("runs/r")
  monkeypatch.chdir(project / "notebooks")
  run = flowlm_jax.load("../runs/r")
  assert run.config.model.tokenizer == run.config.model.pretrained == str(project / "release")
  assert run.config.dataset.validation_files == str(project / "data" / "valid.jsonl")
  assert run.step == 2


def test_a_relative_path_that_names_the_run_itself_stays_what_it_was(tmp_path):
  """`--workdir=gpt2 --config.model.tokenizer=gpt2` launched in runs/: `gpt2` is the hub name, not the run."""
  from flowlm_jax.loading import _from_launch_directory

  run = tmp_path / "runs" / "gpt2"
  run.mkdir(parents=True)
  assert _from_launch_directory("gpt2", str(tmp_path / "runs"), str(run)) == "gpt2"
  (tmp_path / "runs" / "tok").mkdir()
  assert _from_launch_directory("tok", str(tmp_path / "runs"), str(run)) == str(tmp_path / "runs" / "tok")
  assert _from_launch_directory("tok", None, str(run)) == "tok"  # nothing recorded: as typed


def test_training_records_the_directory_it_was_launched_from(tmp_path, monkeypatch):
  from flowlm_jax import checkpoint as ckpt_lib
  from flowlm_jax import loop
  from helpers import tiny_config

  monkeypatch.chdir(tmp_path)
  loop.run(tiny_config("llada", max_steps=2), "w")
  assert ckpt_lib.launch_directory("w") == str(tmp_path)
  assert not os.path.exists(os.path.join("w", ckpt_lib.LAUNCH_FILE + ".tmp"))
