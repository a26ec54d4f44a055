"""`python -m flowlm_jax.export` and `flowlm_jax.load` of workdirs and exported directories."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, tiny_config, tree_hashes
from mesh_worker import cpu_env


def write_checkpoint(workdir: str, config, step: int = 7, seed: int = 3, mesh=None) -> tuple[dict, dict]:
  """A checkpoint as loop.py saves it (train state, data state, resolved config) without training.

  Returns ({name: parameter as a numpy array}, {name: number of devices holding a shard of it})."""
  from flowlm_jax import checkpoint as ckpt_lib
  from flowlm_jax import sharding, train
  from flowlm_jax.models import registry
  from flowlm_jax.tokenizer import load_tokenizer, vocab_of

  vocab = vocab_of(load_tokenizer(config.model.tokenizer))
  model_cfg = registry.model_config(config.model, vocab)
  mesh = mesh if mesh is not None else sharding.single_device_mesh()
  _, abstract = train.abstract_model(model_cfg)
  tx, _ = train.make_optimizer(config.training, 20, abstract)
  state = train.init_state(model_cfg, tx, seed, train.state_shardings(model_cfg, tx, mesh))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(step, state, {"epoch": 0, "position": 0}, config.to_dict())
  checkpointer.close()
  return ({k: np.asarray(jax.device_get(v)) for k, v in state.params.items()},
          {k: len({s.device for s in v.addressable_shards if s.data.size < v.size}) for k, v in state.params.items()})


def logits(run, tokens):
  return np.asarray(jax.jit(lambda t: run.model.logits_from_hidden(run.model.hidden(t)))(tokens))


def fixed_tokens(vocab, B=2, T=24):
  return (np.arange(B * T, dtype=np.int32).reshape(B, T) * 37 + 5) % vocab.size


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("export") / "run")
  write_checkpoint(path, tiny_config("flowlm"))
  return path


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  from flowlm_jax import export

  out = str(tmp_path_factory.mktemp("export") / "exported")
  summary = export.export(workdir, out)
  assert summary["step"] == 7
  return out


def test_export_writes_safetensors_config_and_tokenizer(workdir, exported):
  from safetensors.numpy import load_file

  import flowlm_jax

  run = flowlm_jax.load(workdir)
  tensors = load_file(os.path.join(exported, "model.safetensors"))
  assert set(tensors) == set(run.params)
  for name, value in run.params.items():
    assert tensors[name].dtype == np.float32
    np.testing.assert_array_equal(tensors[name], np.asarray(value))
  with open(os.path.join(exported, "config.json")) as f:
    meta = json.load(f)
  assert meta["format"] == "flowlm_jax" and meta["step"] == 7
  assert meta["model"] == run.config.model.to_dict()
  assert meta["training"]["loss"] == run.config.training.loss
  shape = meta["model_shape"]
  assert (shape["d_model"], shape["n_layers"], shape["n_heads"], shape["d_ff"]) == (32, 2, 2, 64)
  assert shape["vocab_size"] == run.model.cfg.vocab_size and shape["head_dim"] == 16
  assert shape["num_parameters"] == sum(v.size for v in tensors.values())
  assert meta["vocab"]["mask_id"] == run.vocab.mask_id
  assert os.path.isfile(os.path.join(exported, "tokenizer.json"))
  assert os.path.isfile(os.path.join(exported, "tokenizer_config.json"))


def test_loading_the_export_gives_identical_logits(workdir, exported):
  import flowlm_jax

  a, b = flowlm_jax.load(workdir), flowlm_jax.load(exported)
  assert b.step == a.step == 7
  assert b.vocab == a.vocab and b.model.cfg == a.model.cfg
  assert b.config.training.to_dict() == a.config.training.to_dict()
  assert b.config.model.tokenizer == os.path.abspath(exported)
  tokens = fixed_tokens(a.vocab)
  la, lb = logits(a, tokens), logits(b, tokens)
  assert la.dtype == np.float32 and np.isfinite(la[..., :a.vocab.size]).all()
  np.testing.assert_array_equal(la, lb)
  # The exported tokenizer encodes as the run's did.
  assert b.tokenizer("To be, or not to be")["input_ids"] == a.tokenizer("To be, or not to be")["input_ids"]


def test_load_of_an_export_checks_step_and_weights(exported, tmp_path):
  import shutil

  from safetensors.numpy import load_file, save_file

  import flowlm_jax

  with pytest.raises(ValueError, match="not step 3"):
    flowlm_jax.load(exported, step=3)
  broken = str(tmp_path / "broken")
  shutil.copytree(exported, broken)
  tensors = load_file(os.path.join(broken, "model.safetensors"))
  del tensors["wq"]
  save_file(tensors, os.path.join(broken, "model.safetensors"))
  with pytest.raises(ValueError, match="missing \\['wq'\\]"):
    flowlm_jax.load(broken)


def test_export_refuses_a_non_empty_out(workdir, tmp_path):
  from flowlm_jax import export

  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    export.export(workdir, str(tmp_path / "out"))


def test_a_damaged_export_is_a_one_line_error_naming_what_is_wrong(exported, tmp_path):
  """Truncated weights name their file (safetensors' message does not); a config.json that no longer reads as an
  export says so, instead of "no checkpoints in" the directory."""
  import shutil

  import flowlm_jax

  weights, config = str(tmp_path / "weights"), str(tmp_path / "config")
  for copy in (weights, config):
    shutil.copytree(exported, copy)
  with open(os.path.join(weights, "model.safetensors"), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(weights, "model.safetensors")) - 100)
  with pytest.raises(ValueError, match=r"weights/model.safetensors does not read") as info:
    flowlm_jax.load(weights)
  assert "\n" not in str(info.value)
  with open(os.path.join(config, "config.json"), "w") as f:
    f.write('{"format": "flowlm_jax", "st')
  with pytest.raises(ValueError, match=r"config holds a config.json but is neither a whole export"):
    flowlm_jax.load(config)


@pytest.mark.parametrize("damage, message", [
    (lambda meta: meta.pop("step"), r"config.json is incomplete or damaged \(KeyError: 'step'\)"),
    (lambda meta: meta.pop("model_shape"), r"config.json is incomplete or damaged \(KeyError: 'model_shape'\)"),
    (lambda meta: meta["training"].update(new_knob=1),
     r"config.json cannot be read by this version \(.*training.new_knob.*\); load it with the version"),
])
def test_an_export_config_this_version_cannot_read_is_a_one_line_error(exported, tmp_path, damage, message):
  """A newer export's extra config key, or a config.json missing what loading needs, named before any weights load."""
  import json
  import shutil

  import flowlm_jax

  copy = str(tmp_path / "export")
  shutil.copytree(exported, copy)
  with open(os.path.join(copy, "config.json")) as f:
    meta = json.load(f)
  damage(meta)
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match=message) as info:
    flowlm_jax.load(copy)
  assert "\n" not in str(info.value)


def test_overwrite_replaces_only_an_earlier_export_never_the_run_or_other_files(workdir, tmp_path):
  """`staged` swaps the whole --out: with --out=WORKDIR (or a folder above it) that would delete the checkpoints."""
  from flowlm_jax import export

  before = tree_hashes(workdir)
  for out in (workdir, os.path.dirname(workdir)):
    with pytest.raises(FileExistsError, match="the run being exported; choose another directory"):
      export.export(workdir, out, overwrite=True)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="is not a whole earlier export"):
    export.export(workdir, str(tmp_path / "notes"), overwrite=True)
  assert tree_hashes(workdir) == before and (tmp_path / "notes" / "keep.txt").read_text() == "x"


def test_overwrite_replaces_the_export_whole_and_a_failure_leaves_the_old_one(workdir, tmp_path, monkeypatch):
  import flowlm_jax
  from flowlm_jax import export
  from flowlm_jax.formats import flowlm_export

  out = str(tmp_path / "out")
  export.export(workdir, out)
  (tmp_path / "out" / "chat_template.jinja").write_text("{{ another model's template }}")
  export.export(workdir, out, overwrite=True)
  assert not os.path.exists(os.path.join(out, "chat_template.jinja"))  # no file of the old export left behind
  before = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(out)}

  def write_then_fail(path, params, meta):
    flowlm_export_write(path, params, meta)
    raise OSError(28, "No space left on device")

  flowlm_export_write = flowlm_export.write
  monkeypatch.setattr(flowlm_export, "write", write_then_fail)
  with pytest.raises(OSError, match="No space left"):
    export.export(workdir, out, overwrite=True)
  assert {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial directory left either
  assert flowlm_jax.load(out).step == 7
  # The last rename failing (after the old export was moved aside) puts the old export back.
  monkeypatch.setattr(flowlm_export, "write", flowlm_export_write)
  real_rename = os.rename

  def rename(src, dst):  # the new export's move into place fails; putting the old one back works
    if dst == out and not src.endswith(".replaced"):
      raise OSError(5, "Input/output error")
    real_rename(src, dst)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="Input/output"):
    export.export(workdir, out, overwrite=True)
  monkeypatch.setattr(os, "rename", real_rename)
  assert {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_bfloat16_parameters_round_trip_exactly(tmp_path):
  import flowlm_jax
  from flowlm_jax import export

  c = tiny_config("flowlm")
  c.model.param_dtype = "bfloat16"
  write_checkpoint(str(tmp_path / "run"), c, step=2)
  export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  a, b = flowlm_jax.load(str(tmp_path / "run")), flowlm_jax.load(str(tmp_path / "out"))
  for name, value in a.params.items():
    assert b.params[name].dtype == value.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(b.params[name]), np.asarray(value))


def test_import_flowlm_jax_is_light_and_load_is_lazy():
  code = ("import sys, flowlm_jax; heavy = [m for m in ('jax', 'transformers', 'orbax', 'flax') if m in sys.modules]; "
          "assert not heavy, heavy; from flowlm_jax import loading; assert flowlm_jax.load is loading.load; "
          "assert flowlm_jax.LoadedRun is loading.LoadedRun; assert 'load' in dir(flowlm_jax)")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


MESH_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import jax, numpy as np
from flowlm_jax import sharding
from helpers import tiny_config
from test_export import write_checkpoint
assert jax.device_count() == 4, jax.devices()
c = tiny_config("flowlm")
c.mesh.fsdp, c.mesh.tensor = 2, 2
params, split_over = write_checkpoint(sys.argv[1], c, step=5, mesh=sharding.make_mesh(c))
assert split_over["wq"] == 4 and split_over["w_up"] == 4, split_over  # fsdp x tensor: really sharded
np.savez(sys.argv[2], **params)
"""


@pytest.mark.integration
def test_checkpoint_from_a_4_device_mesh_loads_and_exports_on_one_device(tmp_path):
  """A run trained elsewhere (here: fsdp=2 x tensor=2 on 4 devices) loads onto this process's one device."""
  import flowlm_jax
  from flowlm_jax import export

  workdir, saved = str(tmp_path / "run"), str(tmp_path / "params.npz")
  env = {**os.environ, **cpu_env(4)}
  r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, workdir, saved], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-3000:]
  run = flowlm_jax.load(workdir)
  assert run.step == 5
  expected = np.load(saved)
  for name, value in run.params.items():
    assert len(value.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(value), expected[name])
  out = str(tmp_path / "exported")
  export.export(workdir, out)
  tokens = fixed_tokens(run.vocab)
  np.testing.assert_array_equal(logits(run, tokens), logits(flowlm_jax.load(out), tokens))


@pytest.mark.integration
def test_export_cli_on_a_trained_run(reference_run, tmp_path, capsys):
  import flowlm_jax

  out = str(tmp_path / "exported")
  from flowlm_jax import export

  assert export.main([reference_run, "--out", out, "--step", "4"]) == 0  # in-process: `-m` adds nothing
  assert "exported step 4" in capsys.readouterr().out
  a, b = flowlm_jax.load(reference_run, step=4), flowlm_jax.load(out)
  assert a.step == b.step == 4
  tokens = fixed_tokens(a.vocab)
  np.testing.assert_array_equal(logits(a, tokens), logits(b, tokens))
  assert b.generate(["add 12 30"], mode="llada") == a.generate(["add 12 30"], mode="llada")
  assert export.main([reference_run, "--out", out]) == 2 and "not empty" in capsys.readouterr().err


MODERNBERT_FIXTURE = os.path.join(REPO, "tests", "fixtures", "modernbert_tiny")


@pytest.mark.skipif(not os.path.isfile(os.path.join(MODERNBERT_FIXTURE, "config.json")), reason="no ModernBERT fixture")
def test_modernbert_export_is_self_contained(tmp_path):
  """A ModernBERT run's architecture comes from `model.pretrained`; its export must load without it."""
  import shutil

  import flowlm_jax
  from flowlm_jax import export

  pytest.importorskip("flowlm_jax.models.modernbert")
  source = str(tmp_path / "pretrained")
  shutil.copytree(MODERNBERT_FIXTURE, source)
  c = tiny_config("flowlm")
  c.model.family = "modernbert"
  c.model.pretrained = c.model.tokenizer = source
  c.model.compute_dtype = "float32"
  write_checkpoint(str(tmp_path / "run"), c, step=3)
  run = flowlm_jax.load(str(tmp_path / "run"))
  tokens = fixed_tokens(run.vocab, T=16)
  expected = logits(run, tokens)
  export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  shutil.rmtree(source)  # the pretrained source is gone: the export alone must do
  loaded = flowlm_jax.load(str(tmp_path / "out"))
  assert type(loaded.model) is type(run.model) and loaded.model.cfg.pretrained == ""
  np.testing.assert_array_equal(logits(loaded, tokens), expected)


def test_exports_that_name_the_config_classes_by_their_old_paths_still_load():
  """Exports written before models/ existed name flowlm_jax.model.ModelConfig / flowlm_jax.modernbert.*."""
  import dataclasses

  from flowlm_jax import loading
  from flowlm_jax.models import modernbert, registry
  from flowlm_jax.models.llama import ModelConfig

  cfg = ModelConfig(vocab_size=64, num_real_tokens=60, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64)
  shape = {**dataclasses.asdict(cfg), "head_dim": cfg.head_dim, "num_parameters": 1}
  assert loading.model_config({"model_class": "flowlm_jax.model.ModelConfig", "model_shape": shape}) == cfg
  assert loading.model_config({"model_class": registry.class_path(ModelConfig), "model_shape": shape}) == cfg
  assert registry.config_class("flowlm_jax.modernbert.ModernBertConfig") is modernbert.ModernBertConfig
  with pytest.raises(ValueError, match="not a flowlm_jax model config"):
    loading.model_config({"model_class": "os.path.join", "model_shape": shape})


TRANSFER = os.path.join(REPO, "scripts", "device_transfer.sh")


def transfer(*args, cwd=None):
  env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # its python3
  return subprocess.run(["bash", TRANSFER, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_an_export_packed_on_the_device_unpacks_here_and_loads_the_same(workdir, tmp_path):
  """scripts/device_transfer.sh export (on the GPU machine) then unpack (here): the same model."""
  import flowlm_jax

  packed = transfer("export", workdir, str(tmp_path / "out" / "run-export"))
  assert packed.returncode == 0, packed.stderr
  unpacked = transfer("unpack", str(tmp_path / "out" / "run-export"), str(tmp_path / "models"))
  assert unpacked.returncode == 0, unpacked.stderr
  a, b = flowlm_jax.load(workdir), flowlm_jax.load(str(tmp_path / "models" / "run-export"))
  tokens = fixed_tokens(a.vocab)
  np.testing.assert_array_equal(logits(a, tokens), logits(b, tokens))


def test_device_transfer_packs_within_the_device_limits_and_refuses_damage(tmp_path):
  """A call brings back 8 files of 16 MiB: a 40 MiB directory comes as 3 parts + SHA256SUMS and unpacks
  byte for byte; a damaged or missing part, an existing target, and a directory too big for one call are
  refused with a one-line reason."""
  src = tmp_path / "model"
  src.mkdir()
  payload = np.random.default_rng(0).bytes(40 * 2**20)
  (src / "model.safetensors").write_bytes(payload)
  (src / "config.json").write_text("{}\n")
  out = tmp_path / "out" / "model"
  assert transfer("pack", str(src), str(out)).returncode == 0
  files = sorted(os.listdir(out))
  assert files == ["SHA256SUMS", "model.tar.part00", "model.tar.part01", "model.tar.part02"]
  assert all(os.path.getsize(out / f) <= 16 * 2**20 for f in files)
  assert sum(os.path.getsize(out / f) for f in files) <= 61 * 2**20  # 64 MiB a call, its logs included
  assert transfer("unpack", str(out), str(tmp_path / "models")).returncode == 0
  assert (tmp_path / "models" / "model" / "model.safetensors").read_bytes() == payload
  again = transfer("unpack", str(out), str(tmp_path / "models"))
  assert again.returncode == 1 and "exists" in again.stderr

  def flip_a_byte():
    with open(out / "model.tar.part01", "r+b") as f:
      f.seek(1000)
      byte = f.read(1)
      f.seek(1000)
      f.write(bytes([byte[0] ^ 1]))

  flip_a_byte()
  damaged = transfer("unpack", str(out), str(tmp_path / "elsewhere"))
  assert damaged.returncode == 1 and "damaged" in damaged.stderr
  assert not (tmp_path / "elsewhere" / "model").exists()
  flip_a_byte()  # back as packed
  os.rename(out / "model.tar.part02", tmp_path / "part02")  # a part missing, then one that is not listed
  missing = transfer("unpack", str(out), str(tmp_path / "elsewhere"))
  assert missing.returncode == 1 and "missing" in missing.stderr
  os.rename(tmp_path / "part02", out / "model.tar.part02")
  (out / "model.tar.part03").write_bytes(b"more")
  unlisted = transfer("unpack", str(out), str(tmp_path / "elsewhere"))
  assert unlisted.returncode == 1 and "does not list" in unlisted.stderr
  assert not (tmp_path / "elsewhere").exists()  # nothing written by a refused unpack

  (src / "more.bin").write_bytes(payload[:25 * 2**20])  # 65 MiB: more than one call brings back
  big = transfer("pack", str(src), str(tmp_path / "out" / "big"))
  assert big.returncode == 1 and "more than 4 parts" in big.stderr and not (tmp_path / "out" / "big").exists()
