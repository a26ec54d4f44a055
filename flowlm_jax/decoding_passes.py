"""The model passes a sampler makes: over whole rows, or over a slice of them against a key/value cache.

A row is conceptually [left-padded prompt (ending in [SEP]) | answer of `answer_length`], with RoPE
positions counted from the first real prompt token, so a row computes what it would alone. The model
is fed the same tokens and positions in the order [answer | prompt | [PAD]s]: a bidirectional
transformer with explicit positions does not care where a token sits in the array, and this order
makes the padding trailing, which `kv_lengths` expresses (cuDNN's fast padded kernel on GPU, no
[B, T] key mask), with the answer in the same columns of every row.

Key/value cache (Fast-dLLM's block-wise approximate cache, Wu et al. 2025). A bidirectional model has
no exact cache: every position's keys/values depend on the whole row, answer included. A *refresh*
runs the whole row and keeps every layer's keys/values; until the next refresh, a pass runs only a
slice of the answer columns, writes the slice's fresh keys/values into the cache and attends over the
whole cached row. The columns outside the slice keep the keys/values of the refresh, computed while
the answer held other tokens: that is the approximation. `sampling.py` chooses the slice:
- `prefix`: the answer from the current block on (the block and every later one); cached: the prompt
  and the finished blocks;
- `dual`: only the current block; the later blocks' keys/values come from the cache too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flowlm_jax.models.layers import KVCache, unstack

CACHES = ("none", "prefix", "dual")


def decoding_model(graphdef, params):
  """(model, its layers unstacked) prepared once, before a decoding loop.

  The forward pass casts each weight where it uses it, and a layer scan slices each layer out of the
  stacked weights; inside a loop both would run again, copying every weight at every step (XLA does not
  hoist them). So the samplers cast to the compute dtype (except what the model reads in float32) and
  unstack the layers once: the same casts the forward pass makes, done earlier.
  """
  model = nnx.merge(graphdef, params)
  dtype, keep = jnp.dtype(model.cfg.compute_dtype), model.FLOAT32_PARAMS

  def cast(path, w):
    floating = jnp.issubdtype(w.dtype, jnp.floating)
    return w.astype(dtype) if floating and path[0].key not in keep else w

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, params))
  return model, unstack(model.layer_inputs())


@dataclasses.dataclass(frozen=True)
class Rows:
  """The decoding model and the prompts of its rows ([B, P] of `length_B` real tokens, then [PAD]s)."""
  model: Any
  layers: list[dict]
  prompt_BxP: jax.Array
  length_B: jax.Array
  padded: bool  # some prompt has [PAD]s: attention needs the real key counts

  def _answer_positions(self, first, count: int):
    return self.length_B[:, None] + first + jnp.arange(count, dtype=jnp.int32)

  def _kv_lengths(self, answer_length: int):
    return answer_length + self.length_B if self.padded else None  # no padding: no mask at all

  def _whole_rows(self, answer_BxA):
    """(tokens, positions) [B, A + P] of whole rows in the fed order [answer | prompt | pads]."""
    (B, P), A = self.prompt_BxP.shape, answer_BxA.shape[1]
    tokens_BxT = jnp.concatenate([answer_BxA, self.prompt_BxP], axis=1)
    positions_BxT = jnp.concatenate([self._answer_positions(0, A),
                                     jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))], axis=1)
    return tokens_BxT, positions_BxT

  def _logits(self, hidden_BxQxD, count: int):
    """float32 logits of the first `count` columns: only those go through the vocabulary projection."""
    return self.model.logits_from_hidden(hidden_BxQxD[:, :count])

  def full(self, answer_BxA, first=0, count: int | None = None):
    """float32 logits [B, count, V] of answer columns first..first+count (default: all) from whole rows."""
    count = count or answer_BxA.shape[1]
    tokens_BxT, positions_BxT = self._whole_rows(answer_BxA)
    hidden = self.model.hidden(tokens_BxT, positions_BxT=positions_BxT,
                               kv_lengths_B=self._kv_lengths(answer_BxA.shape[1]), layers=self.layers)
    return self.model.logits_from_hidden(jax.lax.dynamic_slice_in_dim(hidden, first, count, axis=1))

  def refresh(self, answer_BxA, first, count: int):
    """(logits as `full`, the cache of every layer's keys/values of the whole rows)."""
    tokens_BxT, positions_BxT = self._whole_rows(answer_BxA)
    hidden, cache = self.model.hidden_and_kv(tokens_BxT, positions_BxT, self._kv_lengths(answer_BxA.shape[1]),
                                             self.layers)
    logits = self.model.logits_from_hidden(jax.lax.dynamic_slice_in_dim(hidden, first, count, axis=1))
    return logits, cache._replace(start=jnp.int32(0))

  def from_cache(self, answer_BxA, cache: KVCache, start, query: int, count: int):
    """(logits [B, count, V] of answer columns start..start+count, the updated cache) from a pass over
    the `query` answer columns from `start` against the cached rows."""
    tokens_BxQ = jax.lax.dynamic_slice_in_dim(answer_BxA, start, query, axis=1)
    hidden, cache = self.model.hidden_from_cache(
        tokens_BxQ, self._answer_positions(start, query), cache._replace(start=jnp.asarray(start, jnp.int32)),
        self._kv_lengths(answer_BxA.shape[1]), self.layers)
    return self._logits(hidden, count), cache

  def empty_cache(self, answer_BxA) -> KVCache:
    """A cache of zeros shaped like a refresh's (the initial carry of a decoding loop)."""
    shapes = jax.eval_shape(lambda: self.refresh(answer_BxA, 0, 1)[1])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def check_cacheable(model, cache: str) -> None:
  """A one-line error, before compiling, when `cache` needs entry points the model family lacks."""
  if cache == "none":
    return
  if not hasattr(model, "hidden_from_cache"):
    raise ValueError(f"inference.cache={cache!r}: model family {type(model).__name__} has no cached decoding "
                     "(hidden_and_kv / hidden_from_cache); use cache=none")
  if getattr(model.cfg, "shift_logits", False):
    raise ValueError(f"inference.cache={cache!r}: a model that predicts from the previous position (shift_logits) "
                     "would need the column before each slice; use cache=none")
