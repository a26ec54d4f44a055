"""Loading a trained run in a notebook or script: `flowlm_jax.load(workdir)`.

Works on any machine (a CPU laptop included) for a checkpoint trained elsewhere: the parameters are
restored onto this process's first device, whatever mesh they were saved from. `load` also takes a
directory written by `python -m flowlm_jax.export` (model.safetensors + config.json + tokenizer), and a
released diffusion LM in its Hugging Face layout (a LLaDA or Dream directory, formats/llama_hf.py), to sample
from or evaluate before any fine-tuning.
The one place that turns a directory into a model: checkpoints (checkpoint.py), exported directories
(formats/flowlm_export.py), HF checkpoints (models/registry.py, which train.init_state also uses).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from flowlm_jax import checkpoint as ckpt_lib
from flowlm_jax import config as config_lib
from flowlm_jax import sharding, train
from flowlm_jax.formats import flowlm_export as exported
from flowlm_jax.formats import llama_hf
from flowlm_jax.models import registry
from flowlm_jax.tokenizer import EMBEDDED, load_tokenizer, vocab_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedRun:
  config: Any
  model: Any           # the nnx network (any family) with restored parameters
  tokenizer: Any
  vocab: Any
  step: int
  graphdef: Any
  params: dict

  def generate(self, prompts: list[str], mode: str | None = None, **overrides) -> list[str]:
    """Answers for `prompts`, decoded the LLaDA or FlowLM way (default: the config's inference.mode).

    `overrides` replace inference fields for this call, e.g. `steps=32, temperature=0.5`.
    """
    from flowlm_jax import sampling

    icfg = sampling.run_config(self.config.inference, **overrides)
    return sampling.generate_texts(self.graphdef, self.params, self.tokenizer, self.vocab, list(prompts), icfg,
                                   mode=mode or icfg.mode, chat=self.config.dataset.prompt_format == "chat")


def load(workdir: str, step: int | None = None, prompt_format: str | None = None) -> LoadedRun:
  """Config, model, tokenizer and a `generate` helper from the newest (or given) checkpoint of a run.

  `workdir` may be a run directory, its `checkpoints/` directory, one step's directory, or an exported
  directory (`python -m flowlm_jax.export`; `step`, if given, must be the exported step), or an HF LLaDA /
  Dream directory (step 0).
  `prompt_format` ("plain" or "chat") sets how `generate`, sample and evaluate render prompts. Unset (or "auto"),
  a run keeps the format its training resolved and recorded, and an HF directory gets "chat" when it holds an
  instruction-tuned release (`llama_hf.prompt_format_of`: LLaDA-8B-Instruct, Dream-v0-Instruct-7B), else "plain".
  """
  choices = config_lib.CHOICES["dataset.prompt_format"]
  if prompt_format is not None and prompt_format not in choices:
    raise ValueError(f"prompt_format={prompt_format!r}: expected one of {', '.join(choices)}")
  explicit = prompt_format if prompt_format in ("plain", "chat") else None
  if exported.is_exported(workdir):
    run = _load_exported(workdir, step)
  elif llama_hf.is_checkpoint(workdir):
    if step not in (None, 0):
      raise ValueError(f"{workdir} is a released checkpoint (step 0), not a run with a step {step}")
    run = _load_hf_checkpoint(workdir, resolve_prompt_format=explicit is None)
  elif os.path.isfile(os.path.join(workdir, exported.CONFIG_FILE)):
    raise ValueError(f"{workdir} holds a {exported.CONFIG_FILE} but is neither a whole export (config.json with "
                     f"\"format\": \"{exported.FORMAT}\" and {exported.WEIGHTS_FILE}) nor a LLaDA/Dream release")
  else:
    run = _load_run(workdir, step)
  if explicit:
    run.config.dataset.prompt_format = explicit
  return run


def _load_run(workdir: str, step: int | None) -> LoadedRun:
  """A LoadedRun from a run's Orbax checkpoints (its config as recorded, prompt_format included)."""
  directory, resume_step = ckpt_lib.resolve_resume_path(workdir, what="load")
  if step is not None and resume_step is not None and step != resume_step:
    raise ValueError(f"{workdir} is the directory of step {resume_step}, not step {step}")
  step = resume_step if step is None else step
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {directory}")
    saved = _newest_readable_config(checkpointer, [step] if step is not None else steps[::-1])
    config = _config_from(saved, f"{directory}: the saved config")
    _resolve_recorded_paths(config, os.path.dirname(directory))  # the workdir holds checkpoints/
    tokenizer = load_tokenizer(config.model.tokenizer)
    vocab = vocab_of(tokenizer)
    model_cfg = registry.model_config(config.model, vocab)
    graphdef, abstract_model_state = train.abstract_model(model_cfg)
    tx, _ = train.make_optimizer(config.training, 1000, abstract_model_state)
    mesh = sharding.single_device_mesh()
    shardings = train.state_shardings(model_cfg, tx, mesh)
    # A reader never renames anything (a run may be writing here): damaged steps are only skipped.
    found = checkpointer.restore_latest_good(ckpt_lib.restore_target(model_cfg, tx, shardings), step,
                                             set_aside=False)
  finally:
    checkpointer.close()
  if found is None:
    raise FileNotFoundError(f"no restorable checkpoint in {directory}")
  restored_step, state, _ = found
  from flax import nnx
  model = nnx.merge(graphdef, state.params)
  return LoadedRun(config=config, model=model, tokenizer=tokenizer, vocab=vocab, step=restored_step,
                   graphdef=graphdef, params=state.params)


def _from_launch_directory(path: str, launch_directory: str | None, run_directory: str, exists=os.path.isdir) -> str:
  """A local path as the run recorded it, relative to where launch.py ran (checkpoint.LAUNCH_FILE; a notebook
  loads from elsewhere): itself if it exists from here or is no relative local path, else below the launch
  directory if it exists there, else unchanged (a hub name, or a path that is gone: the reader says so). A
  match that is the run itself or holds it is refused: `--workdir=gpt2` launched in runs/ keeps the hub name
  `gpt2` a hub name."""
  if not path or not launch_directory or os.path.isabs(path) or path.startswith("~") or path in EMBEDDED \
      or exists(path):
    return path
  candidate = os.path.join(launch_directory, path)
  real_candidate, real_run = os.path.realpath(candidate), os.path.realpath(run_directory)
  if not exists(candidate) or os.path.commonpath([real_candidate, real_run]) == real_candidate:
    return path
  return candidate


def _resolve_recorded_paths(config, run_directory: str) -> None:
  """The run's relative local paths (model, tokenizer, data files) from its launch directory, if recorded."""
  launch = ckpt_lib.launch_directory(run_directory)
  resolve = lambda path, exists=os.path.isdir: _from_launch_directory(path, launch, run_directory, exists)
  for key in ("tokenizer", "pretrained"):
    config.model[key] = resolve(config.model[key])
  d = config.dataset
  for key in ("train_files", "validation_files"):
    d[key] = ",".join(resolve(f, os.path.isfile) for f in config_lib.split_files(d[key]))
  d.name = resolve(d.name)


def _newest_readable_config(checkpointer, steps: list[int]) -> dict:
  """The saved config of the first of `steps` whose config reads; a damaged one is skipped, as
  restore_latest_good skips its weights (the run's config is the same in every step)."""
  for step in steps[:-1]:
    try:
      return checkpointer.read_config(step)
    except Exception as e:  # noqa: BLE001 - classified: only damage moves on to an older step
      if ckpt_lib.failure_kind(e) != ckpt_lib.DAMAGED:
        raise
      log.warning("checkpoint %s/%d: its config is damaged (%s); reading the previous step's",
                  checkpointer.directory, step, type(e).__name__)
  return checkpointer.read_config(steps[-1])


def _config_from(saved: dict, what: str):
  """The config of a checkpoint or export, or a one-line error naming `what` where this version cannot read it."""
  try:
    return config_lib.from_dict(saved)
  except (KeyError, ValueError, TypeError) as e:  # e.g. a key this version no longer knows, or a newer one's
    raise ValueError(f"{what} cannot be read by this version ({e}); load it with the version that wrote it") from e


def _load_exported(path: str, step: int | None) -> LoadedRun:
  """A LoadedRun from model.safetensors + config.json + tokenizer files (no Orbax, no optimiser state)."""
  from flax import nnx

  path = os.path.abspath(path)
  meta = exported.read_config_json(path)
  if step is not None and step != meta["step"]:
    raise ValueError(f"{path} holds the export of step {meta['step']}, not step {step}")
  config = _config_from(exported.config_sections(meta), f"{path}/config.json")
  with config.unlocked():
    config.model.tokenizer = path  # the exported tokenizer files, not the run's original source
  tokenizer = load_tokenizer(path)
  vocab = vocab_of(tokenizer)
  if "vocab" in meta and [meta["vocab"][k] for k in ("size", "mask_id", "pad_id", "eos_id", "sep_id")] != [
      vocab.size, vocab.mask_id, vocab.pad_id, vocab.eos_id, vocab.sep_id]:
    raise ValueError(f"{path}: the tokenizer files do not match config.json's vocab ({vocab} vs {meta['vocab']})")
  model_cfg = model_config(meta)  # from config.json alone: no pretrained source or hub needed
  if model_cfg.num_real_tokens != vocab.size:
    raise ValueError(f"{path}: the tokenizer has {vocab.size} tokens, the exported model {model_cfg.num_real_tokens}")
  graphdef, abstract_model_state = train.abstract_model(model_cfg)
  shardings = sharding.param_shardings(abstract_model_state, sharding.single_device_mesh())
  params = exported.read_params(path, nnx.to_pure_dict(abstract_model_state), shardings)
  model = nnx.merge(graphdef, params)
  return LoadedRun(config=config, model=model, tokenizer=tokenizer, vocab=vocab, step=int(meta["step"]),
                   graphdef=graphdef, params=params)


def _load_hf_checkpoint(path: str, resolve_prompt_format: bool = True) -> LoadedRun:
  """A LoadedRun of a released LLaDA/Dream directory: its weights, tokenizer and [MASK]; the default inference
  settings, and prompts as the release expects them (`resolve_prompt_format`). Parameters stay in the dtype they
  are stored in; compute is bfloat16 on accelerators, float32 on CPUs (which emulate bfloat16 slowly)."""
  path = os.path.abspath(path)
  stored = llama_hf.stored_dtype(llama_hf.read_hf_config(path), path)
  config = config_lib.base_config()
  m = config.model
  m.pretrained = m.tokenizer = path
  m.param_dtype = stored if stored in config_lib.CHOICES["model.param_dtype"] else "float32"
  m.compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  tokenizer = load_tokenizer(path)
  if resolve_prompt_format:
    # An Instruct release fed a raw prompt is not prompted the way it was trained (its SFT rows were templated).
    config.dataset.prompt_format, why = llama_hf.prompt_format_of(path, tokenizer)
    log.info("%s: %s prompts, as %s (flowlm_jax.load(..., prompt_format=...) to choose)", path,
             config.dataset.prompt_format, why)
  vocab = vocab_of(tokenizer)
  model_cfg = registry.model_config(m, vocab)
  graphdef, abstract_model_state = train.abstract_model(model_cfg)
  shardings = sharding.param_shardings(abstract_model_state, sharding.single_device_mesh())
  params = registry.pretrained_params(model_cfg, shardings)
  from flax import nnx
  return LoadedRun(config=config, model=nnx.merge(graphdef, params), tokenizer=tokenizer, vocab=vocab, step=0,
                   graphdef=graphdef, params=params)


def model_config(meta: dict):
  """The resolved model config (ModelConfig, or another family's) rebuilt from config.json's `model_shape`.

  Self-contained: nothing is read from `model.pretrained` or the hub. A pretrained source is cleared, so
  building the model never loads weights other than the exported ones.
  """
  cls = registry.config_class(meta.get("model_class", "flowlm_jax.model.ModelConfig"))
  fields = {f.name for f in dataclasses.fields(cls)}
  shape = meta["model_shape"]
  unknown = set(shape) - fields - set(exported.DERIVED_SHAPE_KEYS)
  if unknown:
    raise ValueError(f"config.json: model_shape has fields {sorted(unknown)} that {cls.__name__} lacks "
                     "(exported by a newer flowlm_jax?)")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in shape.items() if k in fields}
  if "pretrained" in fields:
    values["pretrained"] = ""
  return cls(**values)
