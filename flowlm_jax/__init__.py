"""Masked-diffusion language models (LLaDA and FlowLM) in JAX/Flax NNX.

`flowlm_jax.load(workdir_or_export_dir)` returns a `LoadedRun` (config, model, tokenizer, `.generate`).
It is imported on first use, so `import flowlm_jax` itself stays light (no jax, no transformers).
"""

__all__ = ["LoadedRun", "load"]

_LAZY = {"load": "flowlm_jax.loading", "LoadedRun": "flowlm_jax.loading"}


def __getattr__(name: str):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'flowlm_jax' has no attribute {name!r}")
  import importlib

  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later look-ups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
