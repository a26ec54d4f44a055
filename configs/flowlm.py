"""FlowLM any-position diffusion: 30% [MASK] / 70% random tokens, every corrupted position in the loss.

At inference any answer position may be re-predicted and replaced when the model is confident enough.
Variants: `configs/flowlm.py:demo` (default), `:tasks`, `:small`, `:1b`, `:8b`.
"""

from flowlm_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.masking.strategy = "FLOWLM_STRATEGY"
  c.masking.min_ratio = 0.15
  c.masking.max_ratio = 0.99
  c.training.loss = "flowlm"
  c.training.loss_weighting = "none"  # the original FlowLM: plain masked-LM cross-entropy
  c.inference.mode = "flowlm"
  c.logging.wandb.tags = ["flowlm"]
  return config_lib.apply_variant(c, arg)
