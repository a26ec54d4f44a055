"""LLaDA baseline (Nie et al. 2025): 90% [MASK] / 10% random, ratios 0.15-0.99, 1/t-weighted loss.

Variants: `configs/llada.py:demo` (default), `:tasks`, `:tasks_long`, `:small`, `:1b`, `:8b`, `:modernbert-large`, `:llada-8b`
(fine-tunes LLaDA-8B-Base, docs/pretrained.md).
The method's settings are `flowlm_jax.config.METHODS["llada"]`; sizes and data are in `apply_variant`.
"""

from flowlm_jax import config as config_lib


def get_config(arg=None):
  return config_lib.preset("llada", arg)
