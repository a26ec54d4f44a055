"""FlowLM any-position diffusion: 30% [MASK] / 70% random tokens, every corrupted position in the loss;
at inference any answer position may be re-predicted and replaced when the model is confident enough.

Variants: `configs/flowlm.py:demo` (default), `:tasks`, `:tasks_long`, `:small`, `:1b`, `:8b`, `:modernbert-large`, `:llada-8b`
(fine-tunes LLaDA-8B-Base, docs/pretrained.md).
The method's settings are `flowlm_jax.config.METHODS["flowlm"]`; sizes and data are in `apply_variant`.
"""

from flowlm_jax import config as config_lib


def get_config(arg=None):
  return config_lib.preset("flowlm", arg)
