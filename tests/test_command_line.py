"""Every config field can be set from launch.py's command line (`--config.section.key=value`), lists included."""

import pytest
import yaml

from flowlm_jax import config as config_lib
from helpers import REPO, parse_launch_flags

# ml_collections' config_flags imports the preset with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

PRESET = f"--config={REPO}/configs/flowlm.py"


def leaves(node, prefix=""):
  """(dotted key, value) of every field of a config."""
  for key, value in node.items():
    if isinstance(value, config_lib.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def another_value(dotted, value):
  """A value of the field's type that differs from `value` (a valid choice where the field has choices)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 3
  if isinstance(value, float):
    return value + 0.25
  if isinstance(value, tuple):
    return (f"{dotted} one", "two, with a comma")
  options = [o for o in config_lib.CHOICES.get(dotted, ()) if o != value]
  return options[0] if options else f"{value}-changed"


def as_flag(dotted, value):
  text = repr(value) if isinstance(value, (float, tuple)) else str(value)
  return f"--config.{dotted}={text}"


def test_every_schema_field_is_set_by_a_command_line_override():
  preset = dict(leaves(config_lib.preset("flowlm", None)))  # what --config=configs/flowlm.py loads
  assert preset.keys() == dict(leaves(config_lib.base_config())).keys()
  wanted = {dotted: another_value(dotted, value) for dotted, value in preset.items()}
  config, overrides = parse_launch_flags(PRESET, *(as_flag(k, v) for k, v in wanted.items()))
  got = dict(leaves(config))
  not_landed = {k: (got[k], v) for k, v in wanted.items() if got[k] != v or type(got[k]) is not type(v)}
  assert not not_landed, not_landed
  assert overrides == wanted


def test_a_number_tuple_given_as_one_bare_value_is_refused_with_the_spelling_that_works():
  """The tuple parser keeps a single value as text (a prompt may be '42'): answer_slots=8 says to write (8,)."""
  config, _ = parse_launch_flags(PRESET, "--config.dataset.answer_slots=8")
  with pytest.raises(ValueError, match=r"got \('8',\); on the command line give a tuple: "
                                       r"--config.dataset.answer_slots='\(8,\)'"):
    config_lib.validate(config, num_devices=1)
  config, _ = parse_launch_flags(PRESET, "--config.dataset.answer_slots=(8,)")
  assert config.dataset.answer_slots == (8,)
  config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize("args, expected", [
    (['--config.inference.test_prompts=("What is 3 plus 4?",)'], ("What is 3 plus 4?",)),  # issue 20's command
    (["--config.inference.test_prompts=add 1 2", "--config.inference.test_prompts=To be, or not"],
     ("add 1 2", "To be, or not")),
    (["--config.inference.test_prompts=['a', 'b']", "--config.inference.test_prompts=c"], ("a", "b", "c")),
    (["--config.logging.wandb.tags=('x', 'y')"], ("x", "y")),
    (["--config.logging.wandb.tags=()"], ()),
])
def test_a_list_field_takes_a_python_tuple_or_repeated_flags(args, expected):
  config, overrides = parse_launch_flags(PRESET, *args)
  key = args[0].split("=")[0].removeprefix("--config.")
  value = dict(leaves(config))[key]
  assert value == expected and type(value) is tuple
  assert overrides == {key: expected}
  config_lib.validate(config, num_devices=1)


def test_a_yaml_list_becomes_a_tuple_of_the_same_values_and_the_command_line_wins_over_it(tmp_path):
  overlay = tmp_path / "o.yaml"
  overlay.write_text('inference:\n  test_prompts: ["from yaml"]\nlogging:\n  wandb:\n    tags: ["y1", "y2"]\n')
  config, overrides = parse_launch_flags(PRESET, '--config.inference.test_prompts=("from the command line", "2")')
  config_lib.apply_yaml(config, str(overlay))  # launch.py's order: preset < YAML < command line
  config_lib.apply_overrides(config, overrides)
  assert config.inference.test_prompts == ("from the command line", "2")
  assert config.logging.wandb.tags == ("y1", "y2")
  config_lib.validate(config, num_devices=1)
  assert yaml.safe_load(config_lib.to_yaml(config))["logging"]["wandb"]["tags"] == ["y1", "y2"]


def test_a_config_saved_with_lists_reads_back_as_tuples():
  d = config_lib.preset("flowlm", None).to_dict()
  d["inference"]["test_prompts"] = ["a", "b"]  # as JSON stores them with a checkpoint
  c = config_lib.from_dict(d)
  assert c.inference.test_prompts == ("a", "b")
  assert config_lib.resume_differences(d, config_lib.preset("flowlm", None).to_dict()) == []
