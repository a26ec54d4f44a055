"""Building blocks every model family shares: norms, RoPE, attention, the layer loop, remat policies.

Pure functions of arrays (plus `normal_param`, the one initialiser). Families (`llama.py`,
`modernbert.py`, ...) compose these; this module imports no family, so a new family is one new file.
Attention keeps `sharding.constrain_attention_inputs` on its inputs: on a mesh every family's q, k, v
then share one layout (cuDNN's partitioner requires it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowlm_jax import sharding


def normal_param(key, shape, std, dtype, axes) -> nnx.Param:
  """N(0, std^2) weights carrying their logical axes (sharding.py maps them onto the mesh)."""
  return nnx.Param(jax.random.normal(key, shape, dtype) * std, logical_axes=axes)


def with_bias(x, b):
  """x + b, or x where the layer has no such bias."""
  return x if b is None else x + b


def rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions_BxT, head_dim: int, theta: float):
  """sin/cos [B, T, 1, head_dim/2] for rotary embeddings (Su et al. 2021), computed in float32."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x_BxTxHxK, sin, cos):
  """Rotates pairs (first half, second half) of each head — the LLaMA/NeoX layout."""
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def attention_implementation(requested: str) -> str | None:
  """cuDNN flash attention on GPU, XLA elsewhere (CPU/TPU have no cuDNN)."""
  if requested == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "xla"
  return requested


def attention(q, k, v, mask, kv_lengths, implementation: str, local_window: int | None = None):
  impl = attention_implementation(implementation)
  if impl == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16) or mask is not None):
    impl = "xla"  # cuDNN's fused kernel needs half precision, and takes padding as lengths, not a [B,1,1,T] mask
  window = None if local_window is None else (local_window, local_window)
  q, k, v = sharding.constrain_attention_inputs(q, k, v)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=impl, local_window_size=window)


class KVCache(NamedTuple):
  """Keys and values [B, T, Hkv, Dh] of whole rows, one pair per layer, for decoding a slice of each row.

  A pass over columns start..start+Q of the rows computes fresh keys/values for those columns, writes
  them in (`into_cache`) and attends over the whole row: the other columns keep the keys/values of the
  pass that filled the cache (Fast-dLLM's block-wise approximate cache, Wu et al. 2025).
  """
  keys: tuple
  values: tuple
  start: jax.Array | int = 0


def into_cache(cached_BxTxHxK, fresh_BxQxHxK, start):
  """The cached keys (or values) with a slice's fresh ones written in at column `start`."""
  return jax.lax.dynamic_update_slice_in_dim(cached_BxTxHxK, fresh_BxQxHxK.astype(cached_BxTxHxK.dtype), start, 1)


def run_layers_collecting(layer, x, layers: list[dict]):
  """(x, [y of each layer]) after `layer(x, p) -> (x, y)` over unstacked layers (decoding passes that
  hand back each layer's keys/values)."""
  ys = []
  for p in layers:
    x, y = layer(x, p)
    ys.append(y)
  return x, ys


def run_layers(layer, x, layers: dict | list[dict], remat_policy: str, unroll: int = 1):
  """x after `layer(x, p) -> (x, None)` for each layer's inputs p.

  `layers` stacked (a dict of [L, ...] arrays): one `lax.scan`, remat per layer. Unstacked (a list of
  per-layer dicts, see `unstack`): straight-line code on those arrays. A decoding loop unstacks once,
  before the loop: slicing the stacked weights inside it would copy every weight at every step (XLA
  does not hoist those copies out of the loop).
  """
  if isinstance(layers, dict):
    return jax.lax.scan(remat(layer, remat_policy), x, layers, unroll=unroll)[0]
  for p in layers:
    x, _ = layer(x, p)
  return x


def unstack(stacked: dict) -> list[dict]:
  """[{name: array[i]} for each layer i] from stacked per-layer arrays."""
  n = len(next(iter(stacked.values())))
  return [{name: w[i] for name, w in stacked.items()} for i in range(n)]


def remat(fn, policy: str):
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  if policy == "save_dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"model.remat: unknown policy {policy!r}")


def mask_padded_vocab(logits_BxTxV, num_real_tokens: int):
  V = logits_BxTxV.shape[-1]
  if num_real_tokens >= V:
    return logits_BxTxV
  real = jnp.arange(V) < num_real_tokens
  return jnp.where(real, logits_BxTxV, jnp.finfo(logits_BxTxV.dtype).min)


def layer_norm(x, scale, bias, eps):
  """torch.nn.LayerNorm (biased variance, eps inside the root), computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def window_mask(positions_BxT, half_window: int):
  """bool [B, 1, T, T]: key j within `half_window` positions of query i (HF: |i - j| <= local_attention // 2)."""
  distance = jnp.abs(positions_BxT[:, :, None] - positions_BxT[:, None, :])
  return (distance <= half_window)[:, None]
