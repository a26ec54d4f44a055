"""The config schema, presets and variants, command-line and YAML overrides, and validation."""

import functools
import importlib.util
import pathlib
import re

import ml_collections
import pytest
import yaml
from absl import flags
from ml_collections import config_flags

from flowlm_jax import config as config_lib

# ml_collections' config_flags imports the preset with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = ("llada", "flowlm")
VARIANTS = (None, "demo", "tasks", "small", "1b", "8b")

# The original PyTorch system's README example; it must load unchanged.
README_YAML = """\
masking:
  strategy: "FLOWLM_STRATEGY"
  min_ratio: 0.2
training:
  batch_size: 64
  learning_rate: 1e-4
logging:
  wandb:
    name: "my-experiment"
    tags: ["custom", "experiment"]
"""


@functools.cache
def _preset_module(name):
  spec = importlib.util.spec_from_file_location(f"_test_preset_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def preset(name="flowlm", variant=None):
  return _preset_module(name).get_config(variant)


def flatten(d, prefix=""):
  """{"a": {"b": 1}} -> {"a.b": 1}"""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def changed(before, after):
  """Dotted keys whose values differ, with the new values."""
  a, b = flatten(before.to_dict()), flatten(after.to_dict())
  assert a.keys() == b.keys()
  return {k: b[k] for k in a if a[k] != b[k]}


def with_value(c, dotted, value):
  """A copy of `c` with `dotted` set to `value`, rebuilt from a dict so that a wrong type survives
  (assigning to a ConfigDict field is itself type-checked)."""
  d = c.to_dict()
  *sections, leaf = dotted.split(".")
  node = d
  for section in sections:
    node = node[section]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


def parse_flags(*args):
  """Parses a launch.py-style command line in-process, as launch.py's `--config` flag does."""
  argv = ["launch.py", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "flowlm.py"), flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def write_yaml(tmp_path, text):
  path = tmp_path / "overlay.yaml"
  path.write_text(text)
  return str(path)


# --- presets and variants --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_variant_loads_and_validates(name, variant):
  c = preset(name, variant)
  assert config_lib.validate(c, num_devices=1) is c
  assert set(c.keys()) == set(config_lib.SECTIONS)


@pytest.mark.parametrize("name", PRESETS)
def test_default_variant_is_demo(name):
  assert preset(name, None).to_dict() == preset(name, "demo").to_dict()


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("variant, d_model, n_layers, n_heads, d_ff, max_length", [
    ("demo", 128, 2, 4, 384, 128),
    ("small", 768, 12, 12, 2048, 1024),
    ("1b", 2048, 22, 16, 5632, 2048),
    ("8b", 4096, 32, 32, 12288, 4096),
])
def test_size_variant_sets_model_shape_and_sequence_length(name, variant, d_model, n_layers, n_heads, d_ff,
                                                           max_length):
  c = preset(name, variant)
  assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff) == (d_model, n_layers, n_heads, d_ff)
  assert c.dataset.max_length == max_length


@pytest.mark.parametrize("variant, vocab_size", [("demo", 0), ("tasks", 0), ("small", 0), ("1b", 0), ("8b", 126464)])
def test_only_8b_fixes_the_vocab_size_to_lladas(variant, vocab_size):
  assert preset("llada", variant).model.vocab_size == vocab_size


@pytest.mark.parametrize("name", PRESETS)
def test_tasks_variant_is_a_4_layer_demo_model_on_the_embedded_sft_tasks(name):
  c = preset(name, "tasks")
  assert (c.dataset.name, c.dataset.kind, c.dataset.max_length) == ("embedded:sft_tasks", "sft", 24)
  assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff) == (128, 4, 4, 384)
  assert c.training.batch_size == 64
  assert c.inference.answer_length == 16
  assert c.dataset.max_length - c.inference.answer_length == 8  # room for the longest task prompt + [SEP]


@pytest.mark.parametrize("variant, compute_dtype, remat, learning_rate", [
    ("demo", "float32", "none", 2e-3),
    ("tasks", "float32", "none", 1e-3),
    ("small", "bfloat16", "save_dots", 3e-4),
    ("1b", "bfloat16", "save_dots", 3e-4),
    ("8b", "bfloat16", "save_dots", 3e-4),
])
def test_cpu_variants_compute_in_float32_and_large_ones_in_bfloat16_with_remat(variant, compute_dtype, remat,
                                                                              learning_rate):
  c = preset("flowlm", variant)
  assert (c.model.compute_dtype, c.model.remat, c.training.learning_rate) == (compute_dtype, remat, learning_rate)


def test_llada_preset_uses_llada_masking_ratios_and_loss():
  c = preset("llada")
  assert c.masking.strategy == "LLADA_STRATEGY"
  assert (c.masking.min_ratio, c.masking.max_ratio) == (0.15, 0.99)
  assert c.training.loss == "llada"
  assert c.inference.mode == "llada"


def test_flowlm_preset_uses_flowlm_masking_and_plain_loss():
  c = preset("flowlm")
  assert c.masking.strategy == "FLOWLM_STRATEGY"
  assert (c.masking.min_ratio, c.masking.max_ratio) == (0.15, 0.99)
  assert (c.training.loss, c.training.loss_weighting) == ("flowlm", "none")
  assert c.inference.mode == "flowlm"


@pytest.mark.parametrize("name", PRESETS)
def test_unknown_variant_raises_naming_it(name):
  with pytest.raises(ValueError, match="'huge'"):
    preset(name, "huge")


# --- command-line overrides -------------------------------------------------------------------


def test_command_line_override_changes_exactly_that_value():
  c = parse_flags(f"--config={ROOT}/configs/flowlm.py", "--config.training.batch_size=64")
  assert changed(preset("flowlm"), c) == {"training.batch_size": 64}


def test_command_line_override_applies_on_top_of_a_variant():
  c = parse_flags(f"--config={ROOT}/configs/llada.py:small", "--config.training.learning_rate=1e-4")
  assert changed(preset("llada", "small"), c) == {"training.learning_rate": 1e-4}


def test_command_line_override_of_a_nested_section_changes_exactly_that_value():
  c = parse_flags(f"--config={ROOT}/configs/flowlm.py", "--config.logging.wandb.mode=disabled")
  assert changed(preset("flowlm"), c) == {"logging.wandb.mode": "disabled"}


def test_misspelled_command_line_override_key_fails():
  with pytest.raises((AttributeError, KeyError, flags.Error), match="batch_sz"):
    parse_flags(f"--config={ROOT}/configs/flowlm.py", "--config.training.batch_sz=64")


def test_command_line_override_with_a_wrong_type_fails():
  with pytest.raises(flags.IllegalFlagValueError, match="training.batch_size"):
    parse_flags(f"--config={ROOT}/configs/flowlm.py", "--config.training.batch_size=abc")


# --- YAML overlays --------------------------------------------------------------------------


def test_original_readme_yaml_changes_exactly_its_values(tmp_path):
  c = preset("llada")  # llada, so that the strategy line is a change too
  c.lock()  # as launch.py's flag leaves it
  before = preset("llada")
  config_lib.apply_yaml(c, write_yaml(tmp_path, README_YAML))
  assert changed(before, c) == {
      "masking.strategy": "FLOWLM_STRATEGY",
      "masking.min_ratio": 0.2,
      "training.batch_size": 64,
      "training.learning_rate": 1e-4,
      "logging.wandb.name": "my-experiment",
      "logging.wandb.tags": ("custom", "experiment"),  # list fields are tuples
  }
  config_lib.validate(c, num_devices=1)


def test_yaml_scientific_notation_becomes_a_float(tmp_path):
  # PyYAML reads `1e-4` (no dot) as the string "1e-4".
  c = config_lib.apply_yaml(preset(), write_yaml(tmp_path, "training:\n  learning_rate: 1e-4\n"))
  assert type(c.training.learning_rate) is float
  assert c.training.learning_rate == 1e-4


def test_yaml_integer_for_a_float_field_becomes_a_float(tmp_path):
  c = config_lib.apply_yaml(preset(), write_yaml(tmp_path, "training:\n  num_epochs: 3\n"))
  assert type(c.training.num_epochs) is float
  assert c.training.num_epochs == 3.0


@pytest.mark.parametrize("text, dotted", [
    ("training:\n  batch_sz: 64\n", "training.batch_sz"),
    ("logging:\n  wandb:\n    nam: x\n", "logging.wandb.nam"),
    ("optimizer:\n  lr: 0.1\n", "optimizer"),
])
def test_unknown_yaml_key_raises_naming_its_dotted_path(tmp_path, text, dotted):
  with pytest.raises(KeyError, match=re.escape(repr(dotted))):
    config_lib.apply_yaml(preset(), write_yaml(tmp_path, text))


@pytest.mark.parametrize("text", ["- masking\n- training\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path, text):
  with pytest.raises(ValueError, match="mapping"):
    config_lib.apply_yaml(preset(), write_yaml(tmp_path, text))


def test_yaml_giving_a_value_where_a_section_is_expected_is_an_error(tmp_path):
  with pytest.raises(TypeError, match="'training' is a section"):
    config_lib.apply_yaml(preset(), write_yaml(tmp_path, "training: 3\n"))


def test_yaml_is_loaded_safely_and_python_tags_never_execute(tmp_path):
  marker = tmp_path / "executed"
  text = f"training: !!python/object/apply:os.system ['touch {marker}']\n"
  with pytest.raises(yaml.YAMLError, match="python/object"):
    config_lib.apply_yaml(preset(), write_yaml(tmp_path, text))
  assert not marker.exists()


def test_empty_yaml_changes_nothing(tmp_path):
  c = config_lib.apply_yaml(preset(), write_yaml(tmp_path, ""))
  assert changed(preset(), c) == {}


def test_missing_yaml_file_raises_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such.yaml"):
    config_lib.apply_yaml(preset(), str(tmp_path / "no_such.yaml"))


def test_yaml_bool_for_a_float_field_is_rejected_naming_the_key(tmp_path):
  with pytest.raises(TypeError, match=re.escape("training.learning_rate")):
    config_lib.apply_yaml(preset(), write_yaml(tmp_path, "training:\n  learning_rate: true\n"))


def test_wrong_typed_yaml_value_is_rejected_naming_the_dotted_key(tmp_path):
  with pytest.raises(TypeError, match=re.escape("dataloader.seed")):
    config_lib.apply_yaml(preset(), write_yaml(tmp_path, "dataloader:\n  seed: seven\n"))


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("section, key, dotted", [
    ("training", "foo", "training.foo"),
    ("logging.wandb", "nam", "logging.wandb.nam"),
    ("", "optimizer", "optimizer"),
])
def test_validate_rejects_an_unknown_key_naming_it(section, key, dotted):
  c = preset()
  c.unlock()
  node = c
  for part in filter(None, section.split(".")):
    node = node[part]
  node[key] = 1
  with pytest.raises(KeyError, match=re.escape(repr(dotted))):
    config_lib.validate(c)


def test_validate_rejects_a_missing_key_naming_it():
  d = preset().to_dict()
  del d["training"]["seed"]
  with pytest.raises(KeyError, match=re.escape("'training.seed'")):
    config_lib.validate(ml_collections.ConfigDict(d))


@pytest.mark.parametrize("dotted, value", [
    ("training.batch_size", "32"),
    ("training.batch_size", 32.0),
    ("training.batch_size", True),
    ("masking.min_ratio", True),
    ("training.learning_rate", "1e-4"),
    ("dataloader.shuffle", 1),
    ("model.tokenizer", 5),
    ("inference.test_prompts", "add 1 2"),
])
def test_validate_rejects_a_wrong_type_naming_the_key(dotted, value):
  c = with_value(preset(), dotted, value)
  with pytest.raises(TypeError, match=re.escape(repr(dotted))):
    config_lib.validate(c)


def test_validate_accepts_an_int_for_a_float_field():
  c = with_value(preset(), "training.learning_rate", 1)
  config_lib.validate(c)


@pytest.mark.parametrize("key", ["min_ratio", "max_ratio", "mask_prob", "random_prob", "keep_prob",
                                 "clean_prefix_prob", "mix_prob"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_validate_rejects_a_masking_ratio_outside_0_1(key, value):
  c = preset()
  c.masking[key] = value
  with pytest.raises(ValueError, match=re.escape(f"masking.{key}: must be in [0, 1]")):
    config_lib.validate(c)


@pytest.mark.parametrize("changes, message", [
    ({"masking.eps": 1.0}, "masking.eps: must be in [0, 1), got 1.0"),
    ({"masking.eps": -0.1}, "masking.eps: must be in [0, 1), got -0.1"),
    ({"masking.min_ratio": 0.0, "masking.max_ratio": 0.0, "masking.eps": 0.0},
     "masking.max_ratio: is 0 and so is masking.eps: t = 0 always"),
    ({"training.adam_beta1": 1.0}, "training.adam_beta1: must be in [0, 1), got 1.0"),
    ({"training.adam_beta2": 1.0}, "training.adam_beta2: must be in [0, 1), got 1.0"),
    ({"training.adam_eps": 0.0}, "training.adam_eps: must be > 0"),
    ({"training.stop_check_every": 0}, "training.stop_check_every: must be >= 1, got 0"),
    ({"inference.block_length": -1}, "inference.block_length: must be >= 0 (0: the whole answer), got -1"),
    ({"dataset.max_train_examples": -5}, "dataset.max_train_examples: must be >= 0 (0 = all), got -5"),
    ({"dataset.text_sample_by": "sentence"}, "dataset.text_sample_by: 'sentence' is not one of paragraph, line"),
    ({"masking.mix_prob": 0.25}, "masking.mix_strategy: must name a strategy when mix_prob=0.25"),
    ({"masking.mix_strategy": "LLADA"}, "masking.mix_strategy: 'LLADA' is not one of"),
    ({"masking.mix_strategy": "ABSORBING_STRATEGY"},
     "masking.mix_prob: is 0, so mix_strategy='ABSORBING_STRATEGY' would mix nothing"),
    ({"masking.mix_strategy": "LLADA_STRATEGY", "masking.mix_prob": 0.25, "training.loss": "flowlm",
      "training.loss_weighting": "gidd"}, "masking.mix_prob: must be 0 with training.loss_weighting=gidd"),
])
def test_validate_rejects_settings_it_cannot_train(changes, message):
  """Before the data loads. Without these checks some corrupted nothing, made NaN weights, failed only after the
  data had loaded, divided by zero after the first step, or mixed nothing silently."""
  c = preset()
  for key, value in changes.items():
    c = with_value(c, key, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(c)


def test_validate_rejects_a_clean_prefix_block_below_one():
  c = preset()
  c.masking.clean_prefix_block = 0
  with pytest.raises(ValueError, match=re.escape("masking.clean_prefix_block: must be >= 1, got 0")):
    config_lib.validate(c)


def test_validate_rejects_min_ratio_above_max_ratio():
  c = preset()
  c.masking.min_ratio, c.masking.max_ratio = 0.8, 0.5
  with pytest.raises(ValueError, match=re.escape("masking.min_ratio: min_ratio=0.8 > max_ratio=0.5")):
    config_lib.validate(c)


def test_validate_rejects_an_unknown_masking_strategy():
  c = preset()
  c.masking.strategy = "BERT"
  with pytest.raises(ValueError, match="masking.strategy"):
    config_lib.validate(c)


def test_validate_rejects_custom_probabilities_that_do_not_sum_to_1():
  c = preset()
  c.masking.strategy = "CUSTOM"
  c.masking.mask_prob, c.masking.random_prob, c.masking.keep_prob = 0.5, 0.2, 0.2
  with pytest.raises(ValueError, match=r"masking\.mask_prob.*sum to 1"):
    config_lib.validate(c)


def test_validate_rejects_custom_probabilities_that_never_corrupt():
  c = preset()
  c.masking.strategy = "CUSTOM"
  c.masking.mask_prob, c.masking.random_prob, c.masking.keep_prob = 0.0, 0.0, 1.0
  with pytest.raises(ValueError, match=re.escape("masking.keep_prob: must be < 1")):
    config_lib.validate(c)


def test_validate_accepts_custom_probabilities_summing_to_1_up_to_rounding():
  c = preset()
  c.masking.strategy = "CUSTOM"
  c.masking.mask_prob, c.masking.random_prob, c.masking.keep_prob = 0.8, 0.1, 0.1  # 0.9999999999999999
  config_lib.validate(c)


def test_validate_rejects_a_batch_not_divisible_by_the_data_parallel_degree():
  c = preset()
  c.training.batch_size, c.mesh.data = 12, -1
  with pytest.raises(ValueError, match=r"training\.batch_size=12 .* data-parallel degree 8"):
    config_lib.validate(c, num_devices=8)


def test_validate_counts_only_data_and_fsdp_axes_in_the_data_parallel_degree():
  c = preset()
  c.training.batch_size = 12
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 2  # 2 x 2 x 2: data-parallel degree 4
  config_lib.validate(c, num_devices=8)


def test_validate_rejects_a_micro_batch_not_divisible_by_the_data_parallel_degree():
  c = preset()
  c.training.batch_size, c.training.gradient_accumulation_steps = 16, 4  # micro-batch 4 over 8 devices
  with pytest.raises(ValueError, match=r"training\.batch_size=16 / gradient_accumulation_steps=4"):
    config_lib.validate(c, num_devices=8)


def test_validate_rejects_an_eval_batch_not_divisible_by_the_data_parallel_degree():
  c = preset()
  c.training.batch_size, c.evaluation.eval_batch_size = 16, 12
  with pytest.raises(ValueError, match=r"evaluation\.eval_batch_size=12"):
    config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("max_length", [0, -1])
def test_validate_rejects_a_non_positive_sequence_length(max_length):
  c = preset()
  c.dataset.max_length = max_length
  with pytest.raises(ValueError, match=re.escape(f"dataset.max_length: must be > 0, got {max_length}")):
    config_lib.validate(c)


@pytest.mark.parametrize("key", ["train_files", "validation_files"])
def test_validate_rejects_data_files_that_do_not_exist(tmp_path, key):
  existing = tmp_path / "train.txt"
  existing.write_text("some text\n")
  c = preset()
  c.dataset.name = ""
  c.dataset.train_files = str(existing)
  c.dataset[key] = f"{existing}, {tmp_path / 'missing.txt'}"
  with pytest.raises(ValueError, match=f"dataset.{key}: no such file: .*missing.txt"):
    config_lib.validate(c)


def test_validate_accepts_existing_data_files(tmp_path):
  existing = tmp_path / "train.txt"
  existing.write_text("some text\n")
  c = preset()
  c.dataset.name, c.dataset.train_files = "", str(existing)
  config_lib.validate(c)


def test_validate_requires_a_dataset_name_or_files():
  c = preset()
  c.dataset.name, c.dataset.train_files = "", ""
  with pytest.raises(ValueError, match="dataset.name"):
    config_lib.validate(c)


@pytest.mark.parametrize("mesh, num_devices, message", [
    ((2, 1, 1), 1, "data x fsdp x tensor = 2x1x1 does not match 1 devices"),
    ((2, 2, 2), 4, "data x fsdp x tensor = 2x2x2 does not match 4 devices"),
    ((-1, 3, 1), 8, "8 devices are not divisible by the fixed axes' product 3"),
])
def test_validate_rejects_a_mesh_that_does_not_tile_the_devices(mesh, num_devices, message):
  c = preset()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  with pytest.raises(ValueError, match=re.escape(f"mesh: {message}")):
    config_lib.validate(c, num_devices=num_devices)


def test_validate_rejects_more_than_one_inferred_mesh_axis():
  c = preset()
  c.mesh.data, c.mesh.fsdp = -1, -1
  with pytest.raises(ValueError, match="mesh.data: at most one mesh axis may be -1"):
    config_lib.validate(c)


def test_validate_rejects_answer_length_not_a_multiple_of_block_length():
  c = preset()
  c.inference.answer_length, c.inference.block_length = 16, 5
  with pytest.raises(ValueError, match="inference.block_length: answer_length=16 is not a multiple of block_length=5"):
    config_lib.validate(c)


def test_validate_rejects_steps_not_divisible_by_the_number_of_blocks():
  c = preset()
  c.inference.answer_length, c.inference.block_length, c.inference.steps = 16, 4, 6
  with pytest.raises(ValueError, match="inference.steps: steps=6 is not divisible by the number of blocks 4"):
    config_lib.validate(c)


@pytest.mark.parametrize("threshold, factor, message", [
    (0.0, -0.5, "inference.parallel_factor: must be >= 0 (0 = off), got -0.5"),
    (0.9, 1.0, "inference.parallel_factor: set it or inference.parallel_threshold, not both")])
def test_validate_rejects_a_negative_factor_and_two_parallel_rules(threshold, factor, message):
  c = preset()
  c.inference.parallel_threshold, c.inference.parallel_factor = threshold, factor
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(c)
  c.inference.parallel_threshold = 0.0
  c.inference.parallel_factor = abs(factor)
  config_lib.validate(c)  # one rule, either way, is fine


def test_validate_rejects_d_model_not_divisible_by_heads():
  c = preset()
  c.model.n_heads = 3
  with pytest.raises(ValueError, match="model.n_heads: d_model=128 is not divisible by n_heads=3"):
    config_lib.validate(c)


# --- mesh shape, serialisation ----------------------------------------------------------------


@pytest.mark.parametrize("mesh, num_devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((-1, 2, 1), 6, (3, 2, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 1, -1), 4, (1, 1, 4)),
    ((2, 2, 1), 4, (2, 2, 1)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_the_inferred_axis(mesh, num_devices, expected):
  c = preset()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  assert config_lib.mesh_shape(c, num_devices) == expected
  assert config_lib.data_parallel_degree(c, num_devices) == expected[0] * expected[1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", PRESETS)
def test_from_dict_round_trips_to_dict(name, variant):
  c = preset(name, variant)
  assert config_lib.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_from_dict_fills_fields_missing_from_an_older_saved_config():
  d = preset("llada", "small").to_dict()
  del d["training"]["nonfinite"]
  c = config_lib.from_dict(d)
  assert c.training.nonfinite == "skip"
  assert changed(preset("llada", "small"), c) == {}


def test_from_dict_ignores_a_retired_field_of_an_older_saved_config():
  d = preset("llada", "small").to_dict()
  d["dataloader"]["drop_last"] = True  # dataloader.drop_last was removed: it never changed anything
  assert config_lib.from_dict(d).to_dict() == preset("llada", "small").to_dict()


def test_resume_differences_name_keys_that_change_the_run_and_ignore_those_a_resume_may_change():
  saved = preset("flowlm", None).to_dict()
  new = preset("flowlm", None)
  new.training.gradient_clip_val = 0.0
  new.masking.min_ratio = 0.2
  new.training.max_steps = 10_000         # a longer run
  new.logging.log_every = 1
  new.evaluation.eval_steps = 7
  new.mesh.fsdp = 2
  new.model.remat = "full"
  assert config_lib.resume_differences(saved, new.to_dict()) == [
      "masking.min_ratio (0.15 -> 0.2)", "training.gradient_clip_val (1.0 -> 0.0)"]
  assert config_lib.resume_differences(saved, saved) == []


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", PRESETS)
def test_to_yaml_reloads_to_the_same_dict(name, variant):
  c = preset(name, variant)
  assert config_lib.from_dict(yaml.safe_load(config_lib.to_yaml(c))).to_dict() == c.to_dict()  # lists -> tuples


def test_to_yaml_output_overlays_back_onto_the_schema_unchanged(tmp_path):
  c = preset("flowlm", "tasks")
  restored = config_lib.apply_yaml(config_lib.base_config(), write_yaml(tmp_path, config_lib.to_yaml(c)))
  assert restored.to_dict() == c.to_dict()
