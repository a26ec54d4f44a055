"""`python -m flowlm_jax.sample`: where prompts come from, bad input, batching (the samplers faked here;
tests/test_run_output.py runs the command on a trained run)."""

import types

import pytest

from flowlm_jax import sample, sampling


def parse(*argv):
  return sample.parse_args(["--workdir=w", *argv])


def test_prompts_come_from_positionals_then_repeated_flags_then_the_file_in_that_order(tmp_path):
  lines = tmp_path / "prompts.txt"
  lines.write_text("add 1 2\n\n  spaced prompt  \nROMEO.\n")
  args = sample.parse_args(["ROMEO:", "--workdir=w", "To be, or not", "--prompt", "a b", "--prompt=c",
                            f"--prompts_file={lines}"])
  assert args.prompts == ["ROMEO:", "To be, or not", "a b", "c", "add 1 2", "  spaced prompt  ", "ROMEO."]


def test_a_jsonl_file_gives_the_prompt_field_of_each_record(tmp_path):
  records = tmp_path / "p.jsonl"
  records.write_text('{"prompt": "add 1 2", "answer": "3"}\n\n{"prompt": "line\\nbreak", "id": 7}\n')
  assert parse(f"--prompts_file={records}").prompts == ["add 1 2", "line\nbreak"]


def test_no_prompts_at_all_leaves_the_choice_to_the_run():
  assert parse().prompts == []  # main() then answers the run's inference.test_prompts


@pytest.mark.parametrize("name, text, message", [
    ("missing.txt", None, "no such file"),
    ("empty.txt", "\n\n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "ok"}\nnot json\n', "line 2 is not JSON"),
    ("noprompt.jsonl", '{"text": "x"}\n', "line 1 has no string field 'prompt'"),
])
def test_a_bad_prompts_file_is_one_error_line_naming_it_before_anything_loads(tmp_path, capsys, name, text, message):
  path = tmp_path / name
  if text is not None:
    path.write_text(text)
  with pytest.raises(SystemExit) as exit_info:
    parse(f"--prompts_file={path}")
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in last and str(path) in last, last


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "--batch_size must be > 0"),
    ("--cache=full", "--cache: invalid choice: 'full'"),
    ("--cache_refresh=-1", "--cache_refresh must be >= 0, got -1"),
    ("--parallel_threshold=1.5", "--parallel_threshold must be in [0, 1], got 1.5"),
    ("--parallel_factor=-1", "--parallel_factor must be >= 0, got -1.0"),
    ("--parallel_factor=nan", "--parallel_factor must be >= 0, got nan"),
    ("--parallel_threshold=0.9 --parallel_factor=1", "set --parallel_threshold or --parallel_factor, not both"),
    ("--steps=0", "--steps must be >= 1, got 0"),
    ("--gen_length=0", "--gen_length must be >= 1, got 0"),
    ("--block_length=-1", "--block_length must be >= 0 (0 = one block), got -1"),
    ("--temperature=-1", "--temperature must be >= 0, got -1.0"),
    ("--temperature=nan", "--temperature must be >= 0, got nan"),
    ("--cfg_scale=-2", "--cfg_scale must be >= 0, got -2.0"),
    ("--threshold=1.5", "--threshold must be in [0, 1], got 1.5"),
    ("--max_replacements=0", "--max_replacements must be >= 1, got 0"),
    ("--max_steps=0", "--max_steps must be >= 1, got 0"),
    ("--out=.", "--out . is a folder: name the .jsonl file to write"),
])
def test_a_bad_option_is_one_error_line_naming_it(capsys, flag, message):
  with pytest.raises(SystemExit) as exit_info:
    parse(*flag.split())
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_fast_decoding_flags_reach_both_samplers_specs():
  from flowlm_jax import config as config_lib

  args = parse("--cache=dual", "--cache_refresh=4", "--parallel_threshold=0.9", "--gen_length=8", "--steps=8")
  icfg = sampling.run_config(config_lib.base_config().inference, **sample.overrides_of(args))
  vocab = sampling.Vocab(size=16, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3))
  for spec in (sampling.LladaSpec.from_config(icfg, vocab), sampling.FlowSpec.from_config(icfg, vocab)):
    assert (spec.cache, spec.cache_refresh, spec.parallel_threshold) == ("dual", 4, 0.9), spec
  args = parse("--parallel_factor=1.5", "--gen_length=8", "--steps=8")
  icfg = sampling.run_config(config_lib.base_config().inference, **sample.overrides_of(args))
  for spec in (sampling.LladaSpec.from_config(icfg, vocab), sampling.FlowSpec.from_config(icfg, vocab)):
    assert (spec.parallel_factor, spec.parallel_threshold) == (1.5, 0.0), spec
  assert not {"cache", "cache_refresh", "parallel_threshold", "parallel_factor"} & set(sample.overrides_of(parse()))


@pytest.mark.parametrize("configured, flag, expected", [
    (dict(parallel_threshold=0.9), "--parallel_factor=1", (0.0, 1.0)),
    (dict(parallel_factor=1.0), "--parallel_threshold=0.95", (0.95, 0.0)),
    (dict(parallel_factor=1.0), "--parallel_threshold=0", (0.0, 1.0))])  # 0 = off: the run's rule stays
def test_one_parallel_rule_on_the_command_line_replaces_the_runs_other_rule(configured, flag, expected):
  """A run configured with one rule, sampled with the other: the flag's rule, not an error about both being set."""
  from flowlm_jax import config as config_lib

  icfg = config_lib.base_config().inference
  icfg.update(configured)
  icfg = sampling.run_config(icfg, **sample.overrides_of(parse(flag, "--gen_length=8", "--steps=8")))
  vocab = sampling.Vocab(size=16, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3))
  spec = sampling.LladaSpec.from_config(icfg, vocab)
  assert (spec.parallel_threshold, spec.parallel_factor) == expected


def test_prompts_are_decoded_in_batches_and_each_answer_stays_with_its_prompt(monkeypatch):
  """Each mode decodes every prompt in batches of --batch_size (sampling.generate_batched: one compiled sampler
  for all of them, tested in test_sampling.py), and each answer row names its own prompt."""
  calls = []

  def fake_generate_texts(graphdef, params, tokenizer, vocab, prompts, icfg, *, mode, chat, batch_size):
    calls.append((mode, list(prompts), batch_size))
    return [f"{mode}:{p[::-1]}" for p in prompts]

  monkeypatch.setattr(sampling, "generate_texts", fake_generate_texts)
  run = types.SimpleNamespace(config=types.SimpleNamespace(dataset=types.SimpleNamespace(prompt_format="plain")),
                              graphdef=None, params=None, tokenizer=None, vocab=None)
  prompts = ["p1", "p2", "p3", "p4", "p5"]
  rows = sample.answer(run, prompts, icfg=None, modes=("llada", "flowlm"), batch_size=2)
  assert calls == [("llada", prompts, 2), ("flowlm", prompts, 2)]
  assert rows == [{"prompt": p, "mode": m, "answer": f"{m}:{p[::-1]}"} for p in prompts for m in ("llada", "flowlm")]


def test_settings_that_fit_no_sampler_of_the_run_fail_in_one_line_before_anything_decodes(monkeypatch, capsys):
  """--steps=3 with the run's blocks of 4 in 8: only the run can tell. Checked for every mode before the first
  decodes (before, --mode=both decoded all prompts the LLaDA way, then failed on FlowLM's settings)."""
  from flowlm_jax import config as config_lib
  from flowlm_jax import loading

  icfg = config_lib.base_config().inference
  icfg.answer_length, icfg.block_length, icfg.steps = 8, 4, 8
  run = types.SimpleNamespace(config=types.SimpleNamespace(inference=icfg), vocab=sampling_vocab())
  monkeypatch.setattr(loading, "load", lambda *a, **k: run)
  monkeypatch.setattr(sample, "answer", lambda *a, **k: pytest.fail("decoded before the settings were checked"))
  assert sample.main(["--workdir=w", "--steps=3", "--mode=both", "p"]) == 2
  assert "steps=3 is not divisible by the number of blocks 2" in capsys.readouterr().err.strip().splitlines()[-1]
  assert sample.main(["--workdir=w", "--strategy=below_threshold", "--max_replacements=1", "--mode=both",
                      "--gen_length=6", "p"]) == 2
  assert "answer_length=6 is not a multiple of block_length=4" in capsys.readouterr().err


def sampling_vocab():
  from flowlm_jax.vocab import Vocab

  return Vocab(size=60, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))
