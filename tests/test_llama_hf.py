"""LLaDA and Dream checkpoints in their Hugging Face layouts: import, numerics, samplers, export.

The fixtures (tests/fixtures/{llada,dream}_tiny, made by scripts/make_diffusion_fixtures.py) are tiny random
models with the released config keys and tensor names, and the logits and generate-loop answers of an
independent numpy implementation of each architecture.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from flowlm_jax import config as config_lib
from flowlm_jax import data
from flowlm_jax import sampling
from flowlm_jax.formats import llama_hf
from flowlm_jax.formats import safetensors_dir as st
from flowlm_jax.models import registry
from flowlm_jax.tokenizer import load_tokenizer, vocab_of
from helpers import REPO, launch_in_process, load_preset

LLADA = os.path.join(REPO, "tests", "fixtures", "llada_tiny")
DREAM = os.path.join(REPO, "tests", "fixtures", "dream_tiny")
FIXTURES = pytest.mark.parametrize("directory", [LLADA, DREAM], ids=["llada", "dream"])


def fixture_config(directory, **overrides):
  return llama_hf.from_hf_config(llama_hf.read_hf_config(directory),
                                 **{"compute_dtype": "float32", "pretrained": directory, **overrides})


def build(cfg, params):
  graphdef, _ = nnx.split(registry.create(cfg, rngs=nnx.Rngs(params=0)))
  return graphdef, nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


@pytest.fixture(scope="module", params=[LLADA, DREAM], ids=["llada", "dream"])
def imported(request):
  """(directory, config, numpy params, graphdef, model, tokenizer, vocab, expected) of one fixture."""
  directory = request.param
  tokenizer = load_tokenizer(directory)
  cfg = fixture_config(directory, num_real_tokens=len(tokenizer))  # the rows past the tokenizer: never predicted
  params = llama_hf.load_params(cfg)
  graphdef, model = build(cfg, params)
  return dict(directory=directory, cfg=cfg, params=params, graphdef=graphdef, model=model, tokenizer=tokenizer,
              vocab=vocab_of(tokenizer), expected=dict(np.load(os.path.join(directory, "expected.npz"))))


def dream_reading(logits_BxTxV):
  """What Dream's generate loop does with its raw logits: position i reads row i - 1, position 0 its own."""
  return np.concatenate([logits_BxTxV[:, :1], logits_BxTxV[:, :-1]], axis=1)


# --- config.json and tokenizer -----------------------------------------------------------------


def test_configs_resolve_to_the_architectures_of_the_releases():
  llada, dream = fixture_config(LLADA), fixture_config(DREAM)
  assert (llada.d_model, llada.n_layers, llada.n_heads, llada.n_kv_heads, llada.d_ff, llada.vocab_size) == (
      64, 2, 4, 4, 96, 384)
  assert (llada.rope_theta, llada.norm_eps, llada.tie_embeddings, llada.qkv_bias, llada.shift_logits) == (
      500000.0, 1e-5, False, False, False)
  assert (dream.n_heads, dream.n_kv_heads, dream.rope_theta, dream.norm_eps) == (4, 2, 1e6, 1e-6)
  assert dream.qkv_bias and dream.shift_logits and not dream.tie_embeddings
  hash(llada)  # lives in the graphdef: a static argument of the compiled samplers


@pytest.mark.parametrize("key", ["bias_for_layer_norm", "multi_query_attention"])
def test_an_olmo_off_switch_spelt_false_reads_as_null(key):
  """LLaDA's OLMo-style config.json may write `false` where the release writes `null`: the same model."""
  hf = {**llama_hf.read_hf_config(LLADA), key: False}
  same = lambda cfg: dataclasses.replace(cfg, hf_config="")  # the source's text is kept as written
  assert same(llama_hf.from_hf_config(hf, compute_dtype="float32", pretrained=LLADA)) == same(fixture_config(LLADA))


@FIXTURES
def test_rope_parameters_of_transformers_5_give_the_rope_base(directory):
  """transformers >= 5 writes `rope_parameters` and no top-level rope_theta: the same model as the old spelling."""
  old = llama_hf.read_hf_config(directory)
  new = {k: v for k, v in old.items() if k != "rope_theta"} | {
      "rope_parameters": {"rope_type": "default", "rope_theta": old["rope_theta"]}}
  same = lambda cfg: dataclasses.replace(cfg, hf_config="")
  assert same(llama_hf.from_hf_config(new, compute_dtype="float32", pretrained=directory)) == same(fixture_config(directory))
  assert old["rope_theta"] != 10000.0  # the default a config without any base would read


@pytest.mark.parametrize("rope, top_level, match", [
    ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, False, "rope_parameters=.*is not supported"),
    ({"rope_type": "default"}, False, "rope_parameters=.*is not supported"),
    ({"rope_type": "default", "rope_theta": 1.0}, True, "rope_theta=1000000.0 and rope_parameters' rope_theta=1.0")],
    ids=["scaled", "no-base", "two-bases"])
def test_rope_parameters_the_port_does_not_implement_are_refused(rope, top_level, match):
  hf = {**llama_hf.read_hf_config(DREAM), "rope_parameters": rope}
  if not top_level:
    hf.pop("rope_theta")  # as transformers 5 writes it
  with pytest.raises(ValueError, match=match):
    llama_hf.from_hf_config(hf, compute_dtype="float32", pretrained=DREAM)


@FIXTURES
def test_config_json_round_trips(directory):
  cfg = fixture_config(directory)
  with open(os.path.join(directory, "config.json")) as f:
    assert llama_hf.hf_config_dict(cfg) == json.load(f)
  again = llama_hf.from_hf_config(llama_hf.hf_config_dict(cfg), compute_dtype="float32", pretrained=directory)
  assert dataclasses.replace(again, hf_config="") == dataclasses.replace(cfg, hf_config="")


@FIXTURES
def test_tokenizer_mask_and_chat_template_come_from_the_directory(directory):
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  tokenizer = load_tokenizer(directory)
  vocab = vocab_of(tokenizer)
  assert vocab.mask_id == hf["mask_token_id"]  # LLaDA's tokenizer does not declare it: config.json does
  assert vocab.eos_id == hf["eos_token_id"] == hf["pad_token_id"]
  assert vocab.pad_id != vocab.eos_id  # EOS fills answers as a target; [PAD] keys are left out of attention
  assert vocab.size <= hf.get("embedding_size", hf["vocab_size"])
  assert tokenizer.chat_template == stored_chat_template(directory) and "assistant" in tokenizer.chat_template


def stored_chat_template(directory) -> str:
  """tokenizer_config.json's `chat_template` (where the LLaDA release keeps it), else chat_template.jinja."""
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    template = json.load(f).get("chat_template")
  if template is None:
    with open(os.path.join(directory, "chat_template.jinja")) as f:
      template = f.read()
  return template


# --- chat rendering through the checkpoint's template ---------------------------------------------------

END_OF_TURN = {LLADA: "<|eot_id|>", DREAM: "<|im_end|>"}  # what each release closes an assistant turn with


def sft_records(rows, max_length=128):  # the fixtures' 320-id BPE spells text in many tokens
  import datasets

  dataset_cfg = config_lib.base_config().dataset
  dataset_cfg.name, dataset_cfg.kind, dataset_cfg.max_length = "embedded:sft_tasks", "sft", max_length
  return datasets.Dataset.from_list(rows), dataset_cfg


@FIXTURES
def test_chat_records_render_as_the_templates_prompt_then_answer_and_end_of_turn(directory):
  tokenizer = load_tokenizer(directory)
  vocab = vocab_of(tokenizer)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a king"},
              {"role": "assistant", "content": "Lear"}]
  split = data.encode_sft(*sft_records([{"messages": messages}]), tokenizer, vocab)
  prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
  answer = tokenizer.encode("Lear", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(END_OF_TURN[directory])]
  row = split.tokens[0].tolist()
  assert row == prompt + answer + [vocab.eos_id] * (128 - len(prompt) - len(answer))
  assert split.corruptible[0].tolist() == [False] * len(prompt) + [True] * (128 - len(prompt))  # only the answer
  assert split.chat


@FIXTURES
def test_the_samplers_chat_prompt_is_the_templates_user_turn(directory):
  tokenizer = load_tokenizer(directory)
  turn = [{"role": "user", "content": "Who wrote Lear?"}]
  expected = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)["input_ids"]
  assert sampling.encode_prompt(tokenizer, "Who wrote Lear?", chat=True) == expected
  # prompt/answer records read as chat are that same one-turn conversation
  records, dataset_cfg = sft_records([{"prompt": "Who wrote Lear?", "answer": "Shakespeare"}])
  dataset_cfg.prompt_format = "chat"
  split = data.encode_sft(records, dataset_cfg, tokenizer, vocab_of(tokenizer))
  assert split.tokens[0][:len(expected)].tolist() == expected and split.corruptible[0].sum() == 128 - len(expected)


@FIXTURES
def test_plain_prompts_ignore_the_template(directory):
  tokenizer = load_tokenizer(directory)
  vocab = vocab_of(tokenizer)
  records, dataset_cfg = sft_records([{"prompt": "Who wrote Lear?", "answer": "Shakespeare"}])
  split = data.encode_sft(records, dataset_cfg, tokenizer, vocab)
  prompt = tokenizer.encode("Who wrote Lear?", add_special_tokens=False) + [vocab.sep_id]
  body = prompt + tokenizer.encode("Shakespeare", add_special_tokens=False)
  assert split.tokens[0].tolist() == body + [vocab.eos_id] * (128 - len(body)) and not split.chat
  assert sampling.encode_prompt(tokenizer, "Who wrote Lear?", chat=False) == prompt


@FIXTURES
def test_decoded_chat_answers_stop_at_the_end_of_turn_training_rows_write(directory):
  """What a sampler writes past the template's end-of-turn token is not the assistant's content; rendered plain,
  the answer ends at [EOS] as before and the end-of-turn token cuts nothing."""
  tokenizer = load_tokenizer(directory)
  vocab = vocab_of(tokenizer)
  records, dataset_cfg = sft_records([{"prompt": "Who wrote Lear?", "answer": "Shakespeare"}])
  after = tokenizer.encode(" and Marlowe", add_special_tokens=False)
  end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[directory])

  def answer_row(prompt_format):  # a training row's answer part, the [EOS] fill after its end overwritten by text
    dataset_cfg.prompt_format = prompt_format
    split = data.encode_sft(records, dataset_cfg, tokenizer, vocab)
    row = split.tokens[0][split.corruptible[0]]
    end = np.flatnonzero(np.isin(row, [vocab.eos_id, end_of_turn]))[0]
    row[end + 1:] = np.resize(after, len(row) - end - 1)
    return row

  chat_row = answer_row("chat")
  assert end_of_turn in chat_row and vocab.eos_id not in chat_row  # the template's end, then only text
  assert sampling.decode_answers(tokenizer, vocab, [chat_row], chat=True) == ["Shakespeare"]
  assert sampling.decode_answers(tokenizer, vocab, [answer_row("plain")], chat=False) == ["Shakespeare"]
  # Plain decoding knows nothing of the template: the end-of-turn token does not end the answer (and shows).
  assert sampling.decode_answers(tokenizer, vocab, [chat_row], chat=False)[0].startswith(
      f"Shakespeare{tokenizer.decode([end_of_turn])} and Marlowe")


# --- numerics against the independent numpy implementation -------------------------------------------


def test_imported_logits_match_the_reference_within_1e_4(imported):
  """A full row and a right-padded one (key mask), float32. Dream's raw logits predict the next position;
  the imported model returns, at each position, the prediction for that position."""
  e, model = imported["expected"], imported["model"]
  logits = np.asarray(model(jnp.asarray(e["input_ids"]), valid_BxT=jnp.asarray(e["real"])))
  reference = e["logits"] if not imported["cfg"].shift_logits else dream_reading(e["logits"])
  real, n = e["real"], imported["cfg"].num_real_tokens
  np.testing.assert_allclose(logits[real][:, :n], reference[real][:, :n], atol=1e-4, rtol=0)
  assert np.all(logits[..., n:] == np.finfo(np.float32).min)  # the embedding's padding rows
  lengths = jnp.asarray(real.sum(-1), jnp.int32)  # training rows give padding as lengths: the same numbers
  by_lengths = np.asarray(model(jnp.asarray(e["input_ids"]), kv_lengths_B=lengths))
  np.testing.assert_allclose(by_lengths[real][:, :n], reference[real][:, :n], atol=1e-4, rtol=0)


def test_bfloat16_compute_stays_close(imported):
  cfg = dataclasses.replace(imported["cfg"], compute_dtype="bfloat16")
  _, model = build(cfg, imported["params"])
  e = imported["expected"]
  logits = np.asarray(model(jnp.asarray(e["input_ids"][:1])))[..., :cfg.num_real_tokens]
  reference = e["logits"][:1] if not cfg.shift_logits else dream_reading(e["logits"][:1])
  assert logits.dtype == np.float32 and np.median(np.abs(logits - reference[..., :cfg.num_real_tokens])) < 0.1


def test_the_samplers_row_order_gives_the_reference_logits(imported):
  """The samplers feed a row as [answer | prompt | pads] with the positions of [prompt | answer] and the real keys
  as lengths (sampling.py): the answer columns still get the reference's logits, Dream's shift included."""
  e, cfg, model = imported["expected"], imported["cfg"], imported["model"]
  n_prompt, n_pad = 10, 6
  prompt, answer = e["input_ids"][:1, :n_prompt], e["input_ids"][:1, n_prompt:]
  row = np.concatenate([answer, prompt, np.full((1, n_pad), imported["vocab"].pad_id)], axis=1)
  positions = np.concatenate([n_prompt + np.arange(answer.shape[1]), np.arange(n_prompt + n_pad)])[None]
  logits = model(jnp.asarray(row), positions_BxT=jnp.asarray(positions, jnp.int32),
                 kv_lengths_B=jnp.asarray([answer.shape[1] + n_prompt], jnp.int32))
  reference = e["logits"][:1] if not cfg.shift_logits else dream_reading(e["logits"][:1])
  n = cfg.num_real_tokens
  np.testing.assert_allclose(np.asarray(logits)[:, :answer.shape[1], :n], reference[:, n_prompt:, :n], atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize("block_length", [8, 4], ids=["one-block", "semi-autoregressive"])
def test_llada_sampler_equals_the_published_generate_loop(imported, block_length):
  """LLaDA's generate.py (greedy, low-confidence remasking, 8 steps for 8 tokens), token for token, for prompts of
  5 and 11 tokens batched together; on Dream the reference reads the logits the way Dream's generate does."""
  e = imported["expected"]
  icfg = config_lib.base_config().inference
  icfg.answer_length, icfg.steps, icfg.block_length, icfg.temperature = 8, 8, block_length, 0.0
  prompts = [list(e["prompt_short"]), list(e["prompt_long"])]
  params = nnx.to_pure_dict(nnx.state(imported["model"]))
  out = sampling.generate(imported["graphdef"], params, prompts, imported["vocab"], icfg, mode="llada")
  np.testing.assert_array_equal(out.answer, e[f"answers_block{block_length}"])


# --- streaming, sharded loading ------------------------------------------------------------------


SHARDED_SCRIPT = """
import logging, sys
import jax, numpy as np
from flax import nnx
from flowlm_jax import sharding, train
from flowlm_jax.formats import llama_hf
from flowlm_jax.formats import safetensors_dir as st
logging.basicConfig(level=logging.INFO)
assert jax.device_count() == 8, jax.devices()
cfg = llama_hf.from_hf_config(llama_hf.read_hf_config(sys.argv[1]), pretrained=sys.argv[1])
mesh = jax.make_mesh((1, 4, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
_, abstract = train.abstract_model(cfg)
shardings = sharding.param_shardings(abstract, mesh)
parts, shard = [], st._shard
def counted(t, ckpt, shape, dtype, index):  # the bytes each device's callback reads, and its part's size
  before = ckpt.bytes_read
  out = shard(t, ckpt, shape, dtype, index)
  parts.append((t.ours, ckpt.bytes_read - before, out.size))
  return out
st._shard = counted
placed = llama_hf.load_params(cfg, shardings)
st._shard = shard
whole = llama_hf.load_params(cfg)
split = {}
for name, value in placed.items():
  assert value.sharding == shardings[name], name
  assert np.asarray(value).tobytes() == whole[name].tobytes(), name
  split[name] = len({tuple(map(str, i)) for i in value.sharding.devices_indices_map(value.shape).values()})
assert split["wq"] == split["w_gate"] == split["embed"] == 8 and split["bq"] == 2, split
bad = [(name, got, 2 * size) for name, got, size in parts if got != 2 * size]  # bfloat16 in the files
assert not bad, bad
reads = {name: sum(n == name for n, _, _ in parts) for name in split}
assert reads == split, (reads, split)  # each distinct part read once, not once per device replicating it
assert {n for n, _, _ in parts} == set(whole) and sum(s for n, _, s in parts if n == "wq") == whole["wq"].size
print("ok", split)
"""


@pytest.mark.parametrize("directory", [DREAM], ids=["dream"])
def test_streaming_load_places_each_shard_on_an_8_device_mesh(directory):
  """fsdp=4 x tensor=2: every parameter arrives in its target sharding, bit for bit the whole-array load, each
  device's callback reading from the files just the elements of its part, and the load reports the peak host
  memory."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, directory], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ok" in r.stdout and "peak host memory of this process" in r.stderr


PARTS = [  # a device's part of a parameter, as fsdp x tensor shardings cut them
    ("wq", (slice(1, 2), slice(16, 32), slice(2, 4))),              # [L, D, H, Dh] <- [H·Dh, D]: both HF axes cut
    ("wk", (slice(None), slice(48, 64), slice(1, 2))),              # grouped key-value heads
    ("wo", (slice(None), slice(0, 2), slice(None), slice(32, 48))),  # [L, H, Dh, D] <- [D, H·Dh]
    ("w_down", (slice(0, 1), slice(48, 96), slice(0, 16))),
    ("bq", (slice(None), slice(2, 4))),                              # [L, H, Dh] <- [H·Dh]: heads split out
    ("embed", (slice(192, 384), slice(16, 32))),                     # not per layer
    ("unembed", (slice(0, 16), slice(0, 192))),                      # [D, V] <- [V, D]
    ("final_norm", (slice(None),)),
]


def test_a_shard_reads_only_its_own_layers_and_its_slice_of_each():
  """Each device's part reads the HF tensors of the layers it holds, and of each just the elements it holds,
  mapped back through the transposes ([out, in] -> [in, out]) and head splits; equal to the whole load's part."""
  cfg = fixture_config(DREAM)
  table = {t.ours: t for t in llama_hf.tensors(cfg)}
  template = llama_hf.abstract_params(cfg)
  ckpt, read = st.Checkpoint(DREAM), []
  whole = st.load(list(table.values()), ckpt, template)
  assert ckpt.bytes_read == 2 * sum(np.prod(t.hf_shape) * len(t.names(cfg.n_layers)) for t in table.values())
  original = ckpt.read
  ckpt.read = lambda name, index=None: read.append(name) or original(name, index)
  for name, index in PARTS:
    before = ckpt.bytes_read
    part = st._shard(table[name], ckpt, template[name].shape, np.float32, index)
    assert part.tobytes() == whole[name][index].tobytes(), name
    assert ckpt.bytes_read - before == part.size * 2, name  # bfloat16 in the file: the part's elements, no more
  assert read[:6] == ["model.layers.1.self_attn.q_proj.weight"] + [  # wq's part is of layer 1 only
      f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "ko" for i in (0, 1)] + ["model.layers.0.mlp.down_proj.weight"]


# --- export ------------------------------------------------------------------------------------------


def headers(directory) -> dict:
  """{tensor name: (shape, dtype)} of every safetensors file in a directory."""
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(directory, name), framework="np") as f:
        out.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
  return out


@FIXTURES
def test_import_export_import_is_bit_identical_with_the_original_names_shapes_and_dtypes(directory, tmp_path):
  cfg = fixture_config(directory)
  params = llama_hf.load_params(cfg)
  out = str(tmp_path / "export")
  summary = llama_hf.save_hf(params, cfg, out, max_shard_bytes=200_000)  # small shards: the index path too
  assert len(summary["files"]) > 1 and os.path.isfile(os.path.join(out, st.INDEX_FILE))
  assert headers(out) == headers(directory)
  for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
    with open(os.path.join(out, name)) as a, open(os.path.join(directory, name)) as b:
      assert json.load(a) == json.load(b), name
  exported, original = st.Checkpoint(out), st.Checkpoint(directory)
  for name in original.names():
    assert exported.read(name).tobytes() == original.read(name).tobytes(), name
  again = llama_hf.load_params(fixture_config(out))
  for name, value in params.items():
    assert again[name].tobytes() == value.tobytes(), name


def test_a_config_without_torch_dtype_keeps_the_dtype_its_tensors_are_stored_in(tmp_path):
  """Not every release's config.json says torch_dtype: the headers do (bf16 here), for loading and for export."""
  import flowlm_jax

  source = str(tmp_path / "llada")
  shutil.copytree(LLADA, source)
  with open(os.path.join(source, "config.json")) as f:
    hf = json.load(f)
  del hf["torch_dtype"]
  with open(os.path.join(source, "config.json"), "w") as f:
    json.dump(hf, f)
  assert llama_hf.stored_dtype(hf) == "float32" and llama_hf.stored_dtype(hf, source) == "bfloat16"
  assert flowlm_jax.load(source).model.cfg.param_dtype == "bfloat16"
  cfg = fixture_config(source)
  out = str(tmp_path / "export")
  llama_hf.save_hf(llama_hf.load_params(cfg), cfg, out)
  assert headers(out) == headers(LLADA)  # bf16 tensors, as the source stores them (not float32)
  for name in os.listdir(source):  # a finished run's export needs the release's config.json only
    if name.endswith(".safetensors"):
      os.remove(os.path.join(source, name))
  assert llama_hf.stored_dtype(hf, source) == "float32"


# --- errors ------------------------------------------------------------------------------------------


def _edited_copy(tmp_path, edit_tensors=None, edit_config=None) -> str:
  from safetensors.numpy import save_file

  out = tmp_path / "dream"
  shutil.copytree(DREAM, out)
  if edit_tensors:
    ckpt = st.Checkpoint(str(out))
    tensors = {name: ckpt.read(name) for name in ckpt.names()}
    edit_tensors(tensors)
    save_file(tensors, str(out / st.SINGLE_FILE), metadata={"format": "pt"})
  if edit_config:
    hf = json.loads((out / "config.json").read_text())
    edit_config(hf)
    (out / "config.json").write_text(json.dumps(hf))
  return str(out)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), r"missing 1 tensor\(s\) model.layers.1.self_attn.k_proj"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": t["model.norm.weight"]}),
     r"unexpected 1 tensor\(s\) model.layers.0.self_attn.o_proj.bias"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"][:, :32]}),
     r"tensor 'lm_head.weight' has shape \(384, 32\), config.json implies \(384, 64\)"),
])
def test_bad_tensors_fail_in_one_line_naming_them(tmp_path, edit, message):
  directory = _edited_copy(tmp_path, edit_tensors=edit)
  with pytest.raises(ValueError, match=message) as info:
    llama_hf.load_params(fixture_config(directory))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda hf: hf.update(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (lambda hf: hf.update(model_type="qwen2"), r"model_type 'qwen2', expected one of llada, dream"),
    (lambda hf: hf.pop("hidden_size"), r"lacks hidden_size"),
    (lambda hf: hf.update(num_key_value_heads=3), r"not an even head size with whole groups"),
])
def test_unsupported_configs_fail_in_one_line(tmp_path, edit, message):
  directory = _edited_copy(tmp_path, edit_config=edit)
  with pytest.raises(ValueError, match=message) as info:
    fixture_config(directory)
  assert "\n" not in str(info.value)


def test_a_missing_directory_is_a_one_line_error_before_anything_loads(tmp_path):
  c = load_preset("flowlm", "llada-8b")
  with pytest.raises(ValueError, match="model.pretrained: no such directory: .*LLaDA-8B-Base") as info:
    config_lib.validate(c)
  assert "\n" not in str(info.value)
  with pytest.raises(FileNotFoundError, match="no config.json in"):
    llama_hf.read_hf_config(str(tmp_path))


def test_dreams_own_tokenizer_class_loads_as_qwen2s_without_running_its_code(tmp_path):
  """Dream's tokenizer_config.json names DreamTokenizer (its tokenization_dream.py, through auto_map), which
  AutoTokenizer refuses without trust_remote_code; it is Qwen2's BPE, and loads as that, its code never run."""
  source = str(tmp_path / "dream")
  shutil.copytree(DREAM, source)
  with open(os.path.join(source, "tokenizer_config.json")) as f:
    tokenizer_config = json.load(f)
  tokenizer_config |= {"tokenizer_class": "DreamTokenizer",
                       "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}}
  with open(os.path.join(source, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config, f)
  with open(os.path.join(source, "tokenization_dream.py"), "w") as f:
    f.write("raise RuntimeError('checkpoint code ran')\n")
  released, fixture = load_tokenizer(source), load_tokenizer(DREAM)
  assert vocab_of(released) == vocab_of(fixture)
  text = "To be, or not to be <|mask|>"
  assert released.encode(text) == fixture.encode(text)
  assert released.chat_template == fixture.chat_template


def test_a_tokenizer_whose_mask_is_not_the_models_is_refused(tmp_path):
  """The release's tokenizer files without its config.json: LLaDA's tokenizer declares no mask token, so one is
  added, an untrained embedding row instead of the mask_token_id the model was trained with."""
  for name in os.listdir(LLADA):
    if name.startswith(("tokenizer", "chat_template")):
      shutil.copy(os.path.join(LLADA, name), tmp_path)
  c = load_preset("flowlm", "tasks")
  c.model.family, c.model.pretrained, c.model.tokenizer = "llama", LLADA, str(tmp_path)
  vocab = vocab_of(load_tokenizer(str(tmp_path)))
  cfg = registry.model_config(c.model, vocab)  # a run trained so (its row 326 trained since) still loads
  with pytest.raises(ValueError, match=r"model.tokenizer: its \[MASK\] is id 326, but .*llada_tiny's config.json "
                                       r"says mask_token_id=325 \(use the tokenizer that came with the model"):
    registry.check_pretrained(cfg, vocab)  # what a run starting from the release checks before its data


def test_mis_shaped_weights_fail_the_dry_run_before_the_data_loads_and_not_a_resume(tmp_path):
  from safetensors.numpy import load_file, save_file

  from flowlm_jax import loop

  source = str(tmp_path / "llada")
  shutil.copytree(LLADA, source)
  name = "model.transformer.blocks.0.ff_norm.weight"
  with open(os.path.join(source, "model.safetensors.index.json")) as f:
    shard = os.path.join(source, json.load(f)["weight_map"][name])
  weights = load_file(shard)
  weights[name] = weights[name][:8]
  save_file(weights, shard)
  r = launch_in_process("--config=configs/flowlm.py:tasks", f"--config.model.pretrained={source}",
                        f"--config.model.tokenizer={source}", "--dry_run")
  assert r.returncode != 0
  assert f"error: {source}: tensor '{name}' has shape (8,), config.json implies (64,)" in r.stderr
  assert "train:" not in r.stdout and "dry run: ok" not in r.stdout
  c = load_preset("flowlm", "tasks")
  c.model.pretrained = c.model.tokenizer = source
  c.dataset.max_train_examples, c.dataset.max_validation_examples = 64, 16
  assert loop.prepare(c, initialises=False).model_cfg.pretrained == source  # its weights come from a checkpoint


@pytest.mark.integration
def test_a_resumed_run_does_not_need_the_pretrained_weights_again(tmp_path):
  """Its weights come from its checkpoint: the release's files may since have been removed."""
  source, workdir = str(tmp_path / "llada"), str(tmp_path / "run")
  shutil.copytree(LLADA, source)
  args = ["--config=configs/flowlm.py:tasks", f"--config.model.pretrained={source}", f"--config.model.tokenizer={source}",
          "--config.training.batch_size=8", "--config.model.loss_chunk_size=16", "--config.evaluation.eval_batches=1",
          "--config.training.async_checkpointing=False", "--config.logging.progress_bar=False",
          "--config.logging.wandb.mode=disabled", "--config.dataset.max_train_examples=400",
          "--config.dataset.max_validation_examples=40", f"--workdir={workdir}"]
  assert launch_in_process(*args, "--config.training.max_steps=2", "--stop_at_step=1").returncode == 0
  for name in os.listdir(source):
    if name.endswith(".safetensors"):
      os.remove(os.path.join(source, name))
  dry = launch_in_process(*args, "--config.training.max_steps=2", "--dry_run")  # the relaunch's dry run agrees
  assert dry.returncode == 0 and "dry run: ok" in dry.stdout, dry.stderr[-2000:]
  r = launch_in_process(*args, "--config.training.max_steps=2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


# --- presets, the training path, loading -----------------------------------------------------------


@pytest.mark.parametrize("preset", ["flowlm", "llada"])
def test_llada_8b_presets(preset):
  c = load_preset(preset, "llada-8b")
  m, d, t = c.model, c.dataset, c.training
  assert m.family == "llama" and m.pretrained == m.tokenizer == os.path.join("pretrained", "LLaDA-8B-Base")
  assert (d.name, d.kind, d.max_length) == ("allenai/tulu-3-sft-mixture", "sft", 4096)
  assert (c.mesh.fsdp, m.remat, m.scan_unroll, m.loss_chunk_size, t.batch_size) == (4, "save_dots", 1, 256, 8)
  assert (t.learning_rate, t.warmup_steps, t.weight_decay) == (2.5e-5, 50, 0.1)
  assert t.loss == preset  # the objective stays the preset's
  m.pretrained = m.tokenizer = LLADA
  config_lib.validate(c, num_devices=4)


def test_run_config_dispatch_and_init_state_load_the_weights():
  import optax

  from flowlm_jax import sharding, train

  c = load_preset("flowlm", "llada-8b")
  c.model.pretrained = c.model.tokenizer = LLADA
  vocab = vocab_of(load_tokenizer(LLADA))
  cfg = registry.model_config(c.model, vocab)
  assert (cfg.d_model, cfg.vocab_size, cfg.num_real_tokens, cfg.remat) == (64, 384, vocab.size, "save_dots")
  assert cfg.pretrained == LLADA and cfg.compute_dtype == "bfloat16"
  tx = optax.adamw(1e-3)
  state = train.init_state(cfg, tx, 0, train.state_shardings(cfg, tx, sharding.single_device_mesh()))
  reference = llama_hf.load_params(cfg)
  for name, value in reference.items():
    np.testing.assert_array_equal(np.asarray(state.params[name]), value)


def test_flowlm_load_of_a_release_directory_samples():
  import flowlm_jax

  run = flowlm_jax.load(DREAM)
  assert run.step == 0 and run.model.cfg.shift_logits and run.model.cfg.param_dtype == "bfloat16"
  for mode in ("llada", "flowlm"):
    answers = run.generate(["To be"], mode=mode, answer_length=8, steps=8, max_steps=8)
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.integration
@pytest.mark.parametrize("matmul_dtype", ["bfloat16", "fp8"])
def test_fine_tune_from_llada_then_export_loads_back(matmul_dtype, tmp_path, caplog):
  """Two FlowLM steps from the imported LLaDA fixture on the embedded SFT tasks, exported to LLaDA's layout.
  With FP8 projections: the release has no FP8 scaling state, so the run starts a fresh one (empty amax
  histories), which the two steps fill and the checkpoint keeps. The export is plain weights either way: the
  original names, shapes and dtypes, reloading to the run's (bf16-rounded) weights."""
  import orbax.checkpoint as ocp

  from flowlm_jax import export, loading
  from flowlm_jax.models import llama

  workdir = str(tmp_path / "run")
  caplog.set_level(logging.INFO, logger=llama_hf.__name__)
  r = launch_in_process(
      "--config=configs/flowlm.py:tasks", f"--config.model.pretrained={LLADA}", f"--config.model.tokenizer={LLADA}",
      f"--config.model.matmul_dtype={matmul_dtype}",
      "--config.training.max_steps=2", "--config.training.batch_size=8", "--config.model.loss_chunk_size=16",
      "--config.training.async_checkpointing=False", "--config.evaluation.eval_batches=1",
      "--config.logging.progress_bar=False", "--config.logging.wandb.mode=disabled", f"--workdir={workdir}",
      "--config.dataset.max_train_examples=400", "--config.dataset.max_validation_examples=40")  # 2 steps of 8 rows
  assert r.returncode == 0, r.stderr[-3000:]
  assert "peak host memory" in caplog.text  # the streaming load reported itself
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
  assert int(saved["nonfinite_count"]) == 0
  if matmul_dtype == "bfloat16":
    assert "fp8" not in saved
  else:
    metas = jax.tree.leaves(saved["fp8"], is_leaf=lambda m: "amax_history" in m)
    assert len(metas) == len(llama.FP8_ACTIVATIONS) + 2 * len(llama.FP8_MATMULS)  # weights' and gradients' each
    for meta in metas:
      assert np.all(np.count_nonzero(np.asarray(meta["amax_history"]), axis=1) == 2)  # each layer: the 2 steps
  run = loading.load(workdir)
  out = str(tmp_path / "hf")
  assert export.main([workdir, "--out", out, "--format=hf"]) == 0
  assert headers(out) == headers(LLADA)
  reloaded = llama_hf.load_params(fixture_config(out))
  for name, value in reloaded.items():
    trained = np.asarray(run.params[name])
    np.testing.assert_array_equal(value, trained.astype(jnp.bfloat16).astype(np.float32))
  assert not np.array_equal(reloaded["wq"], llama_hf.load_params(fixture_config(LLADA))["wq"])  # it trained


def test_flowlm_export_of_a_dream_run_is_self_contained(tmp_path):
  """The run's architecture comes from `model.pretrained`; its flowlm-format export loads without it, and keeps
  what the architecture needs (biases, the shift) and the source config.json for a later HF export."""
  import flowlm_jax
  from flowlm_jax import export
  from test_export import write_checkpoint

  source = str(tmp_path / "dream")
  shutil.copytree(DREAM, source)
  c = load_preset("flowlm", "tasks")
  c.model.pretrained = c.model.tokenizer = source
  saved, _ = write_checkpoint(str(tmp_path / "run"), c, step=3)
  export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  shutil.rmtree(source)
  loaded = flowlm_jax.load(str(tmp_path / "out"))
  cfg = loaded.model.cfg
  assert cfg.pretrained == "" and cfg.shift_logits and cfg.qkv_bias and json.loads(cfg.hf_config)["model_type"] == "Dream"
  for name, value in saved.items():
    np.testing.assert_array_equal(np.asarray(loaded.params[name]), value)
  # ... and it still becomes an HF release (weights, config.json, the run's tokenizer), the source long gone.
  assert export.main([str(tmp_path / "out"), "--out", str(tmp_path / "hf"), "--format=hf"]) == 0
  released = flowlm_jax.load(str(tmp_path / "hf"))
  for name, value in saved.items():
    np.testing.assert_array_equal(np.asarray(released.params[name], np.float32),
                                  np.asarray(value).astype(released.params[name].dtype).astype(np.float32), err_msg=name)


@pytest.mark.integration
def test_a_dream_derived_export_starts_a_fine_tune_once_the_run_names_its_architecture(tmp_path):
  """qkv_bias and shift_logits come from model.pretrained's release; a run started from such an export
  (training.init_from) names them with model.qkv_bias / model.shift_logits, as the refusal says."""
  from flowlm_jax import export, loop
  from helpers import tiny_config
  from test_export import write_checkpoint
  from test_warm_start import params_at

  source = str(tmp_path / "dream")
  shutil.copytree(DREAM, source)
  c = load_preset("flowlm", "tasks")
  c.model.pretrained = c.model.tokenizer = source
  saved, _ = write_checkpoint(str(tmp_path / "run"), c, step=3)
  out = str(tmp_path / "out")
  export.export(str(tmp_path / "run"), out)
  shape = json.load(open(os.path.join(out, "config.json")))["model_shape"]
  fine_tune = tiny_config("flowlm", "tasks", learning_rate=1e-12, max_steps=1, save_steps=1)
  fine_tune.model.tokenizer = fine_tune.training.init_from = out
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta", "norm_eps", "tie_embeddings",
              "vocab_size"):
    fine_tune.model[key] = shape[key]
  with pytest.raises(ValueError, match=r"qkv_bias=True \(the run's: False\), shift_logits=True"):
    loop.run(fine_tune, str(tmp_path / "refused"))
  fine_tune.model.qkv_bias = fine_tune.model.shift_logits = True
  loop.run(fine_tune, str(tmp_path / "ft"))
  started = params_at(str(tmp_path / "ft"), 1)
  for name, value in saved.items():
    np.testing.assert_allclose(started[name], value, rtol=0, atol=1e-9, err_msg=name)


def test_an_hf_export_ships_the_runs_tokenizer_when_it_differs_from_the_sources(tmp_path):
  """A run whose model.tokenizer adds a token to the release's: the exported release's tokenizer is the run's,
  whose ids its embedding rows were trained with, not the source's copied along."""
  from flowlm_jax import export
  from flowlm_jax.tokenizer import load_tokenizer
  from test_export import write_checkpoint

  tokenizer = load_tokenizer(DREAM)
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
  tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
  c = load_preset("flowlm", "tasks")
  c.model.pretrained, c.model.tokenizer = DREAM, str(tmp_path / "tokenizer")
  write_checkpoint(str(tmp_path / "run"), c, step=3)
  assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format=hf"]) == 0
  shipped = load_tokenizer(str(tmp_path / "hf"))
  assert shipped.get_vocab() == load_tokenizer(str(tmp_path / "tokenizer")).get_vocab()
  assert "<|tool|>" in shipped.get_vocab() and "<|tool|>" not in load_tokenizer(DREAM).get_vocab()


def test_a_resume_from_a_release_that_resolves_to_another_model_is_refused_naming_the_field(tmp_path):
  """model.pretrained may move on a resume (the checkpoint has the weights), but the architecture it sets must
  not change: same shapes with another rope_theta trained a different model for the rest of the run."""
  from flowlm_jax import checkpoint, loop
  from helpers import tiny_config

  same, other = str(tmp_path / "same"), str(tmp_path / "other")
  shutil.copytree(LLADA, same)
  shutil.copytree(LLADA, other)
  hf = json.load(open(os.path.join(other, "config.json")))
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump({**hf, "rope_theta": hf["rope_theta"] / 50}, f)

  def config(pretrained, steps):
    c = tiny_config("flowlm", "tasks", max_steps=steps, save_steps=1)
    c.model.pretrained, c.model.tokenizer = pretrained, LLADA
    c.dataset.max_train_examples, c.dataset.max_validation_examples = 64, 8
    return c

  workdir = str(tmp_path / "run")
  loop.run(config(LLADA, 1), workdir)
  with pytest.raises(checkpoint.CheckpointMismatch,
                     match=rf"model.pretrained='{re.escape(other)}' resolves to another model: rope_theta "):
    loop.run(config(other, 2), workdir)
  resumed = loop.run(config(same, 2), workdir)  # the release moved: the same model resumes
  assert resumed["checkpoint"].endswith(os.path.join("checkpoints", "2"))
