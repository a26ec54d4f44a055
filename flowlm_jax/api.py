"""Loading a trained run in a notebook or script: `flowlm_jax.load(workdir)`.

Works on any machine (a CPU laptop included) for a checkpoint trained elsewhere: the parameters are
restored onto this process's first device, whatever mesh they were saved from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from flowlm_jax import checkpoint as ckpt_lib
from flowlm_jax import config as config_lib
from flowlm_jax import sharding, train
from flowlm_jax.model import ModelConfig
from flowlm_jax.tokenizer import load_tokenizer, vocab_of


@dataclasses.dataclass
class LoadedRun:
  config: Any
  model: Any           # the nnx Transformer with restored parameters
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

    icfg = self.config.inference.copy_and_resolve_references()
    with icfg.unlocked():
      for key, value in overrides.items():
        if key not in icfg:
          raise KeyError(f"unknown inference option {key!r}")
        icfg[key] = value
    return sampling.generate_texts(self.graphdef, self.params, self.tokenizer, self.vocab, list(prompts), icfg,
                                   mode=mode or icfg.mode, chat=self.config.dataset.prompt_format == "chat")


def load(workdir: str, step: int | None = None) -> LoadedRun:
  """Config, model, tokenizer and a `generate` helper from the newest (or given) checkpoint of a run."""
  directory, resume_step = ckpt_lib.resolve_resume_path(workdir)
  step = resume_step if step is None else step
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {directory}")
    config = config_lib.from_dict(checkpointer.read_config(step if step is not None else steps[-1]))
    tokenizer = load_tokenizer(config.model.tokenizer)
    vocab = vocab_of(tokenizer)
    model_cfg = ModelConfig.from_config(config.model, vocab)
    graphdef, abstract_model_state = train.abstract_model(model_cfg)
    tx, _ = train.make_optimizer(config.training, 1000, abstract_model_state)
    mesh = sharding.single_device_mesh()
    shardings = train.state_shardings(model_cfg, tx, mesh)
    shapes = jax.eval_shape(lambda: train.init_state(model_cfg, tx, 0, shardings))
    found = checkpointer.restore_latest_good(ckpt_lib.abstract_state(shapes, shardings), step)
  finally:
    checkpointer.close()
  if found is None:
    raise FileNotFoundError(f"no restorable checkpoint in {directory}")
  restored_step, state, _ = found
  from flax import nnx
  model = nnx.merge(graphdef, state.params)
  return LoadedRun(config=config, model=model, tokenizer=tokenizer, vocab=vocab, step=restored_step,
                   graphdef=graphdef, params=state.params)
