"""LLaDA baseline (Nie et al. 2025): 90% [MASK] / 10% random, ratios 0.15-0.99, 1/t-weighted loss.

Variants: `configs/llada.py:demo` (default), `:tasks`, `:small`, `:1b`, `:8b`.
"""

from flowlm_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.masking.strategy = "LLADA_STRATEGY"
  c.masking.min_ratio = 0.15
  c.masking.max_ratio = 0.99
  c.training.loss = "llada"
  c.inference.mode = "llada"
  c.logging.wandb.tags = ["llada"]
  return config_lib.apply_variant(c, arg)
