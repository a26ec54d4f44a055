"""ModernBERT: the NNX model against HF transformers' PyTorch outputs, weight import/export, config, fine-tuning.

The fixture (tests/fixtures/modernbert_tiny, made by scripts/make_modernbert_fixture.py where torch is
installed) holds tiny random ModernBERTs in HF layout with the logits PyTorch computed; no torch is needed here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowlm_jax import config as config_lib
from flowlm_jax import export, losses, sampling, train
from flowlm_jax.formats import modernbert_hf
from flowlm_jax.models import modernbert, registry
from flowlm_jax.vocab import Vocab
from helpers import REPO, launch_in_process, load_preset, tiny_config

FIXTURE = os.path.join(REPO, "tests", "fixtures", "modernbert_tiny")
ALL_BIASES = os.path.join(FIXTURE, "all_biases")
N_TOKENS = 8192  # the fixture's tokenizer (the embedded one); its embedding has 64 padding rows more


def fixture_config(directory=FIXTURE, **overrides) -> modernbert.ModernBertConfig:
  hf = modernbert_hf.read_hf_config(directory)
  real = N_TOKENS if directory == FIXTURE else None
  return modernbert_hf.from_hf_config(hf, num_real_tokens=real, **{"compute_dtype": "float32", "pretrained": directory,
                                                                **overrides})


def build(cfg, params=None):
  """The model `cfg` describes: random, or with `params` (a pure dict)."""
  model = registry.create(cfg, rngs=nnx.Rngs(params=0))
  if params is None:
    return model
  graphdef, _ = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


@pytest.fixture(scope="module")
def main_model():
  cfg = fixture_config()
  return build(cfg, modernbert_hf.load_params(cfg))


def expected(directory=FIXTURE):
  e = dict(np.load(os.path.join(directory, "expected.npz")))
  e["valid"] = e["attention_mask"].astype(bool)
  return e


@nnx.jit
def _encode_and_logits(model, tokens_BxT, valid_BxT, positions_BxT):
  kw = dict(valid_BxT=valid_BxT, positions_BxT=positions_BxT)
  return model.encode(tokens_BxT, **kw), model(tokens_BxT, **kw)


def forward(model, e):
  """(encoder output, logits) of the fixture's inputs, as numpy."""
  out = _encode_and_logits(model, jnp.asarray(e["input_ids"]), jnp.asarray(e["valid"]), jnp.asarray(e["position_ids"]))
  return tuple(np.asarray(x) for x in out)


# --- numerics against HF transformers -------------------------------------------------------


def test_fixture_config_resolves_the_hub_layout():
  """The fixture's config.json is in the hub's pre-transformers-5 layout (global_attn_every_n_layers etc.)."""
  cfg = fixture_config()
  assert cfg.global_layers == (True, False, True, False)
  assert cfg.local_window == 4  # local_attention 8: 4 positions each side
  assert (cfg.global_rope_theta, cfg.local_rope_theta) == (160000.0, 10000.0)
  assert (cfg.vocab_size, cfg.num_real_tokens, cfg.tie_embeddings, cfg.decoder_bias) == (8256, 8192, True, True)


def test_older_layout_nulls_read_as_transformers_4_reads_them():
  """local_rope_theta: null is the global base for the local layers too (transformers 4.x's ModernBertAttention);
  a global_attn_every_n_layers that is not a positive integer is a one-line error, not a TypeError."""
  hf = modernbert_hf.read_hf_config(FIXTURE)
  cfg = modernbert_hf.from_hf_config({**hf, "local_rope_theta": None}, pretrained=FIXTURE)
  assert (cfg.global_rope_theta, cfg.local_rope_theta) == (160000.0, 160000.0)
  no_key = {k: v for k, v in hf.items() if k != "local_rope_theta"}
  assert modernbert_hf.from_hf_config(no_key, pretrained=FIXTURE).local_rope_theta == 10000.0  # HF's default
  with pytest.raises(ValueError, match=r"global_attn_every_n_layers must be a positive integer, got None"):
    modernbert_hf.from_hf_config({**hf, "global_attn_every_n_layers": None}, pretrained=FIXTURE)
  with pytest.raises(ValueError, match=r"the global RoPE base \(rope_theta\) must be a number, got None"):
    modernbert_hf.from_hf_config({**hf, "global_rope_theta": None}, pretrained=FIXTURE)


def test_matches_hf_pytorch_logits_with_and_without_padding(main_model):
  """Rows: full, right-padded, left-padded (positions from the first real token); float32, within 1e-4."""
  e = expected()
  hidden, logits = forward(main_model, e)
  valid = e["valid"]
  np.testing.assert_allclose(hidden[valid], e["last_hidden_state"][valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits[..., e["logit_columns"]][valid], e["logits"][valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(jax.nn.logsumexp(logits, axis=-1)[valid], e["logsumexp"][valid], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(logits.argmax(-1)[valid], e["argmax"][valid])
  assert np.all(logits[..., N_TOKENS:] == np.finfo(np.float32).min)  # padding rows are never predicted


def test_every_optional_bias_and_untied_decoder_match_hf():
  """all_biases/: norm/attention/MLP/head biases, untied decoder, tanh GELU, SiLU head, odd layer pattern."""
  cfg = fixture_config(ALL_BIASES)
  assert cfg.global_layers == (False, True, False, False) and not cfg.tie_embeddings
  model = build(cfg, modernbert_hf.load_params(cfg))
  e = expected(ALL_BIASES)
  hidden, logits = forward(model, e)
  valid = e["valid"]
  np.testing.assert_allclose(hidden[valid], e["last_hidden_state"][valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits[valid], e["logits"][valid], atol=1e-4, rtol=0)


def test_kv_lengths_equal_a_key_mask_for_right_padding(main_model):
  e = expected()
  tokens = jnp.asarray(e["input_ids"][:2])
  by_mask = main_model(tokens, valid_BxT=jnp.asarray(e["valid"][:2]))
  by_lengths = main_model(tokens, kv_lengths_B=jnp.asarray(e["valid"][:2].sum(-1), jnp.int32))
  valid = e["valid"][:2]
  np.testing.assert_allclose(np.asarray(by_mask)[valid], np.asarray(by_lengths)[valid], atol=1e-5)


def test_samplers_reordered_rows_see_the_same_window(main_model):
  """The window is measured in positions: feeding [answer | prompt] with explicit positions (sampling.py)
  gives the outputs of the row in order, local layers included."""
  e = expected()
  tokens = jnp.asarray(e["input_ids"][:1])
  in_order = np.asarray(main_model(tokens))
  order = np.concatenate([np.arange(20, 32), np.arange(20)])
  positions = jnp.asarray(order[None], jnp.int32)
  reordered = np.asarray(main_model(tokens[:, order], positions_BxT=positions))
  np.testing.assert_allclose(reordered, in_order[:, order], atol=1e-4)


def test_bfloat16_compute_stays_close():
  cfg = fixture_config(compute_dtype="bfloat16")
  model = build(cfg, modernbert_hf.load_params(cfg))
  e = expected()
  _, logits = forward(model, e)
  assert logits.dtype == np.float32
  close = np.abs(logits[..., e["logit_columns"]] - e["logits"])[e["valid"]]
  assert np.median(close) < 0.1


# --- the model interface the trainer and samplers use ----------------------------------------


def test_logical_axes_on_every_parameter_and_no_decay_on_biases():
  cfg = fixture_config(ALL_BIASES)
  model = build(cfg)
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for var in leaves:
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim
  decays = jax.tree.leaves(train.decay_mask(state))
  pure = nnx.to_pure_dict(state)
  names = jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), pure))
  decayed = {n.strip("[]'") for n, d in zip(names, decays) if d}
  assert decayed == {"wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out", "head_dense", "unembed"}


def test_fused_chunked_cross_entropy_with_an_output_bias():
  key = jax.random.split(jax.random.key(0), 5)
  hidden, w = jax.random.normal(key[0], (2, 10, 16)), jax.random.normal(key[1], (16, 40))
  bias = jax.random.normal(key[4], (40,))
  targets = jax.random.randint(key[2], (2, 10), 0, 37)
  weight = jax.random.uniform(key[3], (2, 10)) * (jnp.arange(10) % 3 != 0)

  def full(h, w, b):
    logits = jnp.where(jnp.arange(40) < 37, jnp.einsum("bld,dv->blv", h, w) + b, jnp.finfo(jnp.float32).min)
    return losses.weighted_nll_sum(losses.token_nll_and_correct(logits, targets)[0], weight)

  fused = lambda h, w, b: losses.fused_weighted_cross_entropy(h, w, targets, weight, 37, 4, b)[0]
  a, ga = jax.value_and_grad(full, argnums=(0, 1, 2))(hidden, w, bias)
  b, gb = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(hidden, w, bias)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_chunked_loss_equals_full_logits_loss_with_the_decoder_bias(main_model):
  cfg = main_model.cfg
  graphdef, state = nnx.split(main_model)
  params = nnx.to_pure_dict(state)
  e = expected()
  batch = {"tokens": jnp.asarray(e["input_ids"][:2]), "corruptible": jnp.asarray(e["valid"][:2])}
  vocab = Vocab(size=N_TOKENS, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))
  from flowlm_jax import masking

  spec = masking.MaskingSpec.from_config(load_preset("flowlm").masking, vocab)
  step = lambda chunk: train.StepConfig(model=cfg, masking=spec, loss="flowlm", loss_weighting="none", grad_accum=1,
                                        loss_chunk_size=chunk, pad_id=0)
  grad = lambda chunk: jax.jit(jax.value_and_grad(lambda p: train.batch_loss(graphdef, p, batch, jax.random.key(3),
                                                                             step(chunk))[0]))(params)
  (full, g_full), (chunked, g_chunked) = grad(0), grad(8)
  np.testing.assert_allclose(full, chunked, rtol=1e-5)
  np.testing.assert_allclose(g_full["decoder_bias"], g_chunked["decoder_bias"], rtol=1e-4, atol=1e-7)
  assert np.abs(g_chunked["decoder_bias"]).max() > 0


def test_dispatch_from_the_run_config(tokenizer, vocab):
  c = load_preset("flowlm", "tasks")
  c.model.family, c.model.pretrained, c.model.tokenizer = "modernbert", FIXTURE, FIXTURE
  cfg = registry.model_config(c.model, vocab)
  assert isinstance(cfg, modernbert.ModernBertConfig) and cfg.compute_dtype == "float32"
  assert isinstance(registry.create(cfg, rngs=nnx.Rngs(params=0)), modernbert.ModernBert)
  hash(cfg)  # lives in the graphdef: a static argument of the compiled samplers
  bigger = dataclasses.replace(vocab, size=9000)
  with pytest.raises(ValueError, match="8256 rows"):
    registry.model_config(c.model, bigger)


def test_a_cache_the_family_lacks_is_refused_before_the_data_loads(monkeypatch):
  """The test prompts are sampled at evaluations: a cache ModernBERT has not must fail at setup, not at step 100."""
  from flowlm_jax import data, loop

  c = load_preset("flowlm", "tasks")
  c.model.family, c.model.pretrained, c.model.tokenizer = "modernbert", FIXTURE, FIXTURE
  c.inference.cache = "dual"
  monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("the data loaded before the cache check"))
  with pytest.raises(ValueError, match="inference.cache='dual': model family ModernBert has no cached decoding"):
    loop.prepare(c)
  c.inference.test_prompts = ()  # nothing is sampled during training: no sampler needs the cache
  with pytest.raises(pytest.fail.Exception, match="the data loaded"):
    loop.prepare(c)


def test_init_state_loads_the_pretrained_weights_but_not_while_traced(monkeypatch):
  import optax

  from flowlm_jax import sharding

  cfg = fixture_config()
  tx = optax.adamw(1e-3)
  shardings = train.state_shardings(cfg, tx, sharding.single_device_mesh())
  state = train.init_state(cfg, tx, 0, shardings)
  reference = modernbert_hf.load_params(cfg)
  for name, value in reference.items():
    np.testing.assert_array_equal(np.asarray(state.params[name]), value)

  def fail(_):
    raise AssertionError("weights read under eval_shape")

  monkeypatch.setattr(modernbert_hf, "load_params", fail)
  shapes = jax.eval_shape(lambda: train.init_state(cfg, tx, 0, shardings))
  assert shapes.params["embed"].shape == (8256, 32)


# --- import errors ------------------------------------------------------------------------------


def _copy_fixture(tmp_path, edit):
  from safetensors.numpy import save_file

  out = tmp_path / "mb"
  shutil.copytree(FIXTURE, out, ignore=shutil.ignore_patterns("all_biases", "*.npz"))
  tensors = modernbert_hf.read_safetensors(str(out))
  edit(tensors)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return str(out)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.2.attn.Wqkv.weight"), r"missing 1 tensor\(s\) model.layers.2.attn.Wqkv.weight"),
    (lambda t: t.update({"model.layers.0.attn_norm.weight": np.ones(32, np.float16)}),
     r"unexpected 1 tensor\(s\) model.layers.0.attn_norm.weight"),
    (lambda t: t.update({"head.dense.weight": np.ones((32, 16), np.float16)}),
     r"tensor 'head.dense.weight' has shape \(32, 16\), config.json implies \(32, 32\)"),
])
def test_bad_checkpoints_fail_in_one_line_naming_the_tensor(tmp_path, edit, message):
  directory = _copy_fixture(tmp_path, edit)
  cfg = fixture_config(pretrained=directory)
  with pytest.raises(ValueError, match=message) as info:
    modernbert_hf.load_params(cfg)
  assert "\n" not in str(info.value)


def _truncate_weights(d):
  path = os.path.join(d, "model.safetensors")
  os.truncate(path, os.path.getsize(path) // 2)


def _damaged_index(d):
  os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00001.safetensors"))
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    f.write("{ oops")


@pytest.mark.parametrize("damage, message", [
    (_truncate_weights, r"mb/model.safetensors does not read \(SafetensorError: "),
    (_damaged_index, r"mb/model.safetensors.index.json does not read as a safetensors index \(JSONDecodeError: "),
    (lambda d: open(os.path.join(d, "config.json"), "w").write('{"model_type": '),
     r"mb/config.json does not read as JSON \(JSONDecodeError: "),
])
def test_damaged_files_fail_in_one_line_naming_the_file(tmp_path, damage, message):
  directory = _copy_fixture(tmp_path, lambda t: None)
  damage(directory)
  with pytest.raises(ValueError, match=message) as info:
    modernbert_hf.load_params(modernbert_hf.from_hf_config(modernbert_hf.read_hf_config(directory),
                                                           pretrained=directory))
  assert "\n" not in str(info.value)


def test_missing_directory_and_unreachable_hub_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    modernbert_hf.resolve_pretrained(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="cannot be fetched from the hub") as info:  # HF_HUB_OFFLINE=1
    modernbert_hf.resolve_pretrained("answerdotai/ModernBERT-large-not-cached")
  assert "\n" not in str(info.value)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="expected 'modernbert'"):
    modernbert_hf.read_hf_config(str(tmp_path / "empty"))


# --- export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [FIXTURE, ALL_BIASES])
def test_export_round_trips_and_hf_accepts_the_config(tmp_path, tokenizer, directory):
  from transformers import AutoConfig

  cfg = fixture_config(directory)
  params = modernbert_hf.load_params(cfg)
  out = str(tmp_path / "export")
  modernbert_hf.save_hf(params, cfg, out, tokenizer if directory == FIXTURE else None)
  hf = AutoConfig.from_pretrained(out)
  assert hf.model_type == "modernbert" and hf.num_hidden_layers == cfg.n_layers
  assert [t == "full_attention" for t in hf.layer_types] == list(cfg.global_layers)
  # transformers 4.x reads only the older keys (its defaults otherwise): they spell the same model
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  every = written.get("global_attn_every_n_layers")  # the all-biases fixture's pattern has no such spelling
  assert (every is None) == (directory == ALL_BIASES)
  assert every is None or [i % every == 0 for i in range(cfg.n_layers)] == list(cfg.global_layers)
  assert (written["global_rope_theta"], written["local_rope_theta"]) == (cfg.global_rope_theta, cfg.local_rope_theta)
  again = modernbert_hf.from_hf_config(modernbert_hf.read_hf_config(out), num_real_tokens=cfg.num_real_tokens,
                                    compute_dtype="float32", pretrained=out)
  assert dataclasses.replace(again, hf_config="") == dataclasses.replace(cfg, hf_config="", pretrained=out)
  reloaded = modernbert_hf.load_params(again)
  for name, value in params.items():
    np.testing.assert_array_equal(reloaded[name], value)


def test_a_one_layer_model_round_trips(tmp_path):
  """Layer 0 has no attn_norm, so a one-layer model has none at all: an empty stack, not a failed np.stack."""
  cfg = dataclasses.replace(fixture_config(FIXTURE), n_layers=1, global_layers=(True,))
  rng = np.random.default_rng(0)
  params = {name: rng.normal(size=x.shape).astype(np.float32) for name, x in modernbert_hf.abstract_params(cfg).items()}
  out = str(tmp_path / "one_layer")
  modernbert_hf.save_hf(params, cfg, out, None)
  again = modernbert_hf.from_hf_config(modernbert_hf.read_hf_config(out), num_real_tokens=cfg.num_real_tokens,
                                    compute_dtype="float32", pretrained=out)
  reloaded = modernbert_hf.load_params(again)
  for name, value in params.items():
    np.testing.assert_array_equal(reloaded[name], value)


def test_a_layer_pattern_transformers_4_cannot_spell_is_left_to_layer_types():
  assert modernbert_hf.global_every([True, False, False, True, False, False]) == 3
  assert modernbert_hf.global_every([True, False, True, False]) == 2
  assert modernbert_hf.global_every([True]) == 1 and modernbert_hf.global_every([True, False]) == 2
  assert modernbert_hf.global_every([True, False, False, True, True]) is None
  assert modernbert_hf.global_every([False, True]) is None


def test_hf_names_cover_every_parameter():
  cfg = fixture_config(ALL_BIASES)
  template = modernbert_hf.abstract_params(cfg)
  covered = [name for rule in modernbert_hf.rules(cfg) for name in rule.ours]
  assert sorted(covered) == sorted(template)


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["flowlm", "llada"])
def test_modernbert_large_variant(preset):
  c = load_preset(preset, "modernbert-large")
  config_lib.validate(c)
  m, d, t, i = c.model, c.dataset, c.training, c.inference
  assert (m.family, m.pretrained, m.tokenizer) == ("modernbert", "answerdotai/ModernBERT-large",
                                                   "answerdotai/ModernBERT-large")
  assert (d.name, d.kind, d.max_length) == ("allenai/tulu-3-sft-mixture", "sft", 512)
  assert (t.batch_size, t.learning_rate, t.lr_schedule, t.warmup_ratio, t.weight_decay, t.num_epochs) == (
      32, 2e-5, "cosine", 0.06, 0.01, 1.0)
  assert (c.evaluation.eval_steps, t.save_steps) == (200, 200)
  assert (i.answer_length, i.confidence_threshold, i.max_replacements) == (16, 0.7, 2)
  assert t.loss == preset  # the method stays the preset's


def test_validation_of_the_modernbert_family(tmp_path):
  c = tiny_config("flowlm")
  c.model.family = "modernbert"
  with pytest.raises(ValueError, match="model.pretrained"):
    config_lib.validate(c)
  c.model.pretrained = str(tmp_path)
  with pytest.raises(ValueError, match="no config.json"):
    config_lib.validate(c)
  c.model.pretrained = FIXTURE
  with pytest.raises(ValueError, match="model.tokenizer"):
    config_lib.validate(c)
  c.model.tokenizer = FIXTURE
  config_lib.validate(c)


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_fine_tune_resume_sample_and_export(tmp_path):
  """The flowlm preset fine-tunes the imported tiny model on the embedded SFT tasks (chunked loss with the
  decoder bias), stops and resumes, samples both ways, and exports a directory HF's loader accepts."""
  from transformers import AutoConfig

  from flowlm_jax import loading

  workdir = str(tmp_path / "run")
  args = ["--config=configs/flowlm.py:tasks", "--config.model.family=modernbert",
          "--config.model.pretrained=tests/fixtures/modernbert_tiny",
          "--config.model.tokenizer=tests/fixtures/modernbert_tiny", "--config.training.max_steps=4",
          "--config.training.save_steps=2", "--config.training.batch_size=8", "--config.model.loss_chunk_size=16",
          "--config.training.async_checkpointing=False", "--config.evaluation.eval_batches=1",
          "--config.logging.progress_bar=False", "--config.logging.log_every=1", f"--workdir={workdir}",
          # 4 steps of 8 rows: tokenizing 400 of the 20,000 task records is enough (each launch tokenizes them)
          "--config.dataset.max_train_examples=400", "--config.dataset.max_validation_examples=40"]
  first = launch_in_process(*args, "--stop_at_step=2")
  assert first.returncode == 0, first.stderr[-3000:]
  second = launch_in_process(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stdout and "step 2" in second.stdout

  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses_by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert sorted(losses_by_step) == [1, 2, 3, 4] and all(np.isfinite(list(losses_by_step.values())))

  run = loading.load(workdir)
  assert run.step == 4 and isinstance(run.model, modernbert.ModernBert)
  for mode in ("llada", "flowlm"):
    answers = run.generate(["add 12 30", "reverse d o g"], mode=mode)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

  out = str(tmp_path / "hf")
  summary = export.export_hf(workdir, out)
  assert summary["step"] == 4
  assert AutoConfig.from_pretrained(out).model_type == "modernbert"
  cfg = modernbert_hf.from_hf_config(modernbert_hf.read_hf_config(out), num_real_tokens=N_TOKENS,
                                  compute_dtype="float32", pretrained=out)
  exported = build(cfg, modernbert_hf.load_params(cfg))
  e = expected()
  np.testing.assert_allclose(forward(exported, e)[1][e["valid"]], forward(run.model, e)[1][e["valid"]], atol=1e-5)


def _decoding(directory, compute_dtype):
  """(graphdef, pure-dict params, decoding model, its unstacked layers) of a fixture."""
  cfg = fixture_config(directory, compute_dtype=compute_dtype)
  graphdef, params = nnx.split(build(cfg, modernbert_hf.load_params(cfg)))
  params = nnx.to_pure_dict(params)
  return (graphdef, params, *sampling.decoding_model(graphdef, params))


@pytest.mark.parametrize("directory", [FIXTURE, ALL_BIASES], ids=["tied", "all-biases"])
def test_decoding_model_keeps_float32_norms_and_gives_the_same_logits(directory):
  """The samplers cast and unstack the weights before their loop; what is read in float32 stays float32."""
  _, params, model, _ = _decoding(directory, "bfloat16")
  kept = {name for name, w in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items() if w.dtype == jnp.float32}
  assert kept == set(modernbert.ModernBert.FLOAT32_PARAMS) & set(params)
  graphdef, params, model, layers = _decoding(directory, "float32")
  e = expected(directory)
  tokens, valid, positions = (jnp.asarray(e[k]) for k in ("input_ids", "valid", "position_ids"))
  reference = nnx.merge(graphdef, params)(tokens, valid_BxT=valid, positions_BxT=positions)
  decoded = model.logits_from_hidden(model.hidden(tokens, valid_BxT=valid, positions_BxT=positions, layers=layers))
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(reference), atol=1e-4, rtol=0)
