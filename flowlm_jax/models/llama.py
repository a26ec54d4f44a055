"""The "llama" family: bidirectional LLaMA-style transformer (Flax NNX), RoPE, RMSNorm, SwiGLU, no causal mask.

The layers' parameters are stacked along a leading `layers` axis and the forward pass runs them with
`jax.lax.scan`, so compile time does not grow with depth and remat wraps one layer body. Every
parameter carries `logical_axes` metadata (`embed`, `heads`, `mlp`, `vocab`, ...); `sharding.py` maps
those names onto mesh axes, so the model never mentions devices. The building blocks are `layers.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flowlm_jax.models import fp8
from flowlm_jax.models.layers import (KVCache, apply_rope, attention, into_cache, mask_padded_vocab, normal_param,
                                      rms_norm, rope_tables, run_layers, run_layers_collecting, with_bias)
from flowlm_jax.tokenizer import padded_vocab_size
from flowlm_jax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int            # embedding rows (padded)
  num_real_tokens: int       # ids >= this are padding rows: never predicted
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  matmul_dtype: str = "bfloat16"  # "fp8": the layers' projections in FP8 while training (fp8.py, `hidden`)
  remat: str = "none"
  attention: str = "auto"
  scan_unroll: int = 1       # layers per scan iteration; n_layers = a straight-line program
  # Architecture of imported checkpoints (formats/llada_hf.py, formats/dream_hf.py):
  qkv_bias: bool = False     # q/k/v projections carry biases (Qwen2, hence Dream)
  shift_logits: bool = False  # position p is predicted from the output at position p - 1 (Dream, see `hidden`)
  pretrained: str = ""       # HF checkpoint directory whose weights train.init_state loads ("" = random init)
  hf_config: str = ""        # its config.json as JSON text: export writes it back in the same layout

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_config(cls, model_cfg, vocab: Vocab) -> "ModelConfig":
    """The architecture a run config's `model` section describes (models.registry picks the family)."""
    return cls(
        vocab_size=padded_vocab_size(model_cfg, vocab), num_real_tokens=vocab.size,
        d_model=model_cfg.d_model, n_layers=model_cfg.n_layers, n_heads=model_cfg.n_heads,
        n_kv_heads=model_cfg.n_kv_heads or model_cfg.n_heads, d_ff=model_cfg.d_ff,
        rope_theta=model_cfg.rope_theta, norm_eps=model_cfg.norm_eps, init_std=model_cfg.init_std,
        tie_embeddings=model_cfg.tie_embeddings, qkv_bias=model_cfg.qkv_bias, shift_logits=model_cfg.shift_logits,
        param_dtype=model_cfg.param_dtype,
        compute_dtype=model_cfg.compute_dtype, matmul_dtype=model_cfg.matmul_dtype, remat=model_cfg.remat,
        attention=model_cfg.attention, scan_unroll=model_cfg.scan_unroll)


class Transformer(nnx.Module):
  FLOAT32_PARAMS = ()  # every parameter is cast to the compute dtype where the forward pass uses it

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, H, K, Dh, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            cfg.d_ff, cfg.vocab_size)
    dtype = jnp.dtype(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / (2 * L) ** 0.5  # GPT-2 style: residual writes scaled
    p = functools.partial(normal_param, dtype=dtype)
    self.embed = p(rngs.params(), (V, D), std, axes=("vocab", "embed"))
    self.attn_norm = nnx.Param(jnp.ones((L, D), dtype), logical_axes=("layers", "norm"))
    self.wq = p(rngs.params(), (L, D, H, Dh), std, axes=("layers", "embed", "heads", "head_dim"))
    self.wk = p(rngs.params(), (L, D, K, Dh), std, axes=("layers", "embed", "kv_heads", "head_dim"))
    self.wv = p(rngs.params(), (L, D, K, Dh), std, axes=("layers", "embed", "kv_heads", "head_dim"))
    self.wo = p(rngs.params(), (L, H, Dh, D), out_std, axes=("layers", "heads", "head_dim", "embed"))
    if cfg.qkv_bias:  # a "bias" axis keeps them replicated and out of weight decay
      self.bq = nnx.Param(jnp.zeros((L, H, Dh), dtype), logical_axes=("layers", "heads", "bias"))
      self.bk = nnx.Param(jnp.zeros((L, K, Dh), dtype), logical_axes=("layers", "kv_heads", "bias"))
      self.bv = nnx.Param(jnp.zeros((L, K, Dh), dtype), logical_axes=("layers", "kv_heads", "bias"))
    self.mlp_norm = nnx.Param(jnp.ones((L, D), dtype), logical_axes=("layers", "norm"))
    self.w_gate = p(rngs.params(), (L, D, F), std, axes=("layers", "embed", "mlp"))
    self.w_up = p(rngs.params(), (L, D, F), std, axes=("layers", "embed", "mlp"))
    self.w_down = p(rngs.params(), (L, F, D), out_std, axes=("layers", "mlp", "embed"))
    self.final_norm = nnx.Param(jnp.ones((D,), dtype), logical_axes=("norm",))
    if not cfg.tie_embeddings:
      self.unembed = p(rngs.params(), (D, V), std, axes=("embed", "vocab"))

  # -- pieces ---------------------------------------------------------------------------------

  def output_matrix(self) -> jax.Array:
    """[D, V] projection from final hidden states to logits (compute dtype)."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
    return w.astype(self.cfg.compute_dtype)

  def logits_from_hidden(self, hidden_BxTxD: jax.Array, w_DxV: jax.Array | None = None) -> jax.Array:
    """float32 logits; padding rows of the vocabulary get -inf so they are never predicted."""
    w = self.output_matrix() if w_DxV is None else w_DxV
    logits = jnp.einsum("btd,dv->btv", hidden_BxTxD, w, preferred_element_type=jnp.float32)
    return mask_padded_vocab(logits, self.cfg.num_real_tokens)

  def layer_inputs(self) -> dict:
    """Per-layer parameters, stacked on axis 0: what the layer scan runs over."""
    return {name: getattr(self, name)[...] for name in LAYER_PARAMS if hasattr(self, name)}

  def hidden(self, tokens_BxT: jax.Array, valid_BxT: jax.Array | None = None,
             positions_BxT: jax.Array | None = None, kv_lengths_B: jax.Array | None = None,
             layers: list[dict] | None = None, kv_cache: KVCache | None = None, return_kv: bool = False,
             fp8_meta: dict | None = None):
    """Final (normed) hidden states [B, T, D] in the compute dtype.

    Padding: `valid_BxT` masks keys anywhere (left-padded prompts in sampling); `kv_lengths_B` says
    the first n keys are real (right padding, training rows) and keeps cuDNN's fast padded kernel.
    `layers`: `unstack(layer_inputs())` prepared outside a decoding loop (see `run_layers`).
    Decoding with a key/value cache (unstacked `layers`; `hidden_and_kv`, `hidden_from_cache`): with
    `return_kv` every layer's keys/values come back too, as a `KVCache`; given `kv_cache`, the tokens are
    the columns from `kv_cache.start` of the rows it caches, and (hidden, the updated cache) come back.
    `fp8_meta` (training with matmul_dtype "fp8": `initial_fp8_meta`, stacked per layer): the layers'
    projections run in FP8 with this scaling state (fp8.py). Without it they run in the compute dtype,
    whatever matmul_dtype says: evaluation and the samplers use the master weights in bf16.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    B, T = tokens_BxT.shape
    explicit_positions = positions_BxT is not None
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    sin, cos = rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta)
    mask = None if valid_BxT is None else valid_BxT[:, None, None, :]
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dtype)
    collect = return_kv or kv_cache is not None
    inputs = layers or self.layer_inputs()
    if kv_cache is not None and cfg.shift_logits:  # the slice's first column reads a hidden state not computed
      raise NotImplementedError("decoding with a key/value cache: not for shift_logits models (Dream)")
    if kv_cache is not None:
      inputs = [dict(p, cached_k=k, cached_v=v) for p, k, v in zip(inputs, kv_cache.keys, kv_cache.values)]
    if fp8_meta is not None:
      inputs = {**inputs, "fp8": fp8_meta}  # stacked like the weights: each layer scans over its own state

    def layer(x, p):
      meta = p.get("fp8")
      p = jax.tree.map(lambda w: w.astype(dtype), {name: w for name, w in p.items() if name != "fp8"})

      def operand(x, name):  # an activation as its projections take it: in FP8, quantized once for all of them
        return x if meta is None else fp8.quantize(x, meta["activations"][name])

      def project(equation, x, name):
        if meta is None:
          return jnp.einsum(equation, x, p[name])
        return fp8.einsum(equation, x, p[name], meta["weights"][name], meta["gradients"][name])

      h = operand(rms_norm(x, p["attn_norm"], cfg.norm_eps), "attn_in")
      q = apply_rope(with_bias(project("btd,dhk->bthk", h, "wq"), p.get("bq")), sin, cos)
      k = apply_rope(with_bias(project("btd,dhk->bthk", h, "wk"), p.get("bk")), sin, cos)
      v = with_bias(project("btd,dhk->bthk", h, "wv"), p.get("bv"))
      if kv_cache is not None:  # the slice's keys/values into its rows' cached ones; attend over whole rows
        k, v = into_cache(p["cached_k"], k, kv_cache.start), into_cache(p["cached_v"], v, kv_cache.start)
      a = attention(q, k, v, mask, kv_lengths_B, cfg.attention)
      x = x + project("bthk,hkd->btd", operand(a, "attn_out"), "wo")
      h = operand(rms_norm(x, p["mlp_norm"], cfg.norm_eps), "mlp_in")
      gate = project("btd,df->btf", h, "w_gate")
      up = project("btd,df->btf", h, "w_up")
      x = x + project("btf,fd->btd", operand(jax.nn.silu(gate) * up, "mlp_hidden"), "w_down")
      return x, ((k, v) if collect else None)

    if collect:
      x, kv = run_layers_collecting(layer, x, inputs)
    else:
      x = run_layers(layer, x, inputs, cfg.remat, cfg.scan_unroll)
    x = rms_norm(x, self.final_norm[...].astype(dtype), cfg.norm_eps)
    if cfg.shift_logits:
      x = from_previous_position(x, positions_BxT if explicit_positions else None,
                                 _real_keys(valid_BxT, kv_lengths_B, T))
    if collect:
      return x, KVCache(tuple(k for k, _ in kv), tuple(v for _, v in kv), 0 if kv_cache is None else kv_cache.start)
    return x

  def __call__(self, tokens_BxT, valid_BxT=None, positions_BxT=None, kv_lengths_B=None) -> jax.Array:
    """float32 logits [B, T, V]."""
    return self.logits_from_hidden(self.hidden(tokens_BxT, valid_BxT, positions_BxT, kv_lengths_B))

  def hidden_and_kv(self, tokens_BxT, positions_BxT, kv_lengths_B, layers: list[dict]) -> tuple[jax.Array, KVCache]:
    """(hidden [B, T, D], every layer's keys/values of these rows): what fills a decoding cache."""
    return self.hidden(tokens_BxT, None, positions_BxT, kv_lengths_B, layers, return_kv=True)

  def hidden_from_cache(self, tokens_BxQ, positions_BxQ, kv_cache: KVCache, kv_lengths_B,
                        layers: list[dict]) -> tuple[jax.Array, KVCache]:
    """(hidden [B, Q, D], the cache with this slice's keys/values written in) for the columns from
    kv_cache.start of rows whose other keys/values the cache holds (kv_lengths_B: real keys per row)."""
    return self.hidden(tokens_BxQ, None, positions_BxQ, kv_lengths_B, layers, kv_cache=kv_cache)


# Stacked per-layer parameters (the q/k/v biases exist only with `qkv_bias`).
LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
# The products that run in FP8 with matmul_dtype "fp8": every projection inside the layers. The vocabulary
# projection stays in the compute dtype: the logits' small differences decide the cross-entropy, FP8
# training recipes keep the first and last layers in higher precision (Micikevicius et al. 2022), and the
# fused chunked cross-entropy (losses.py) computes that product outside this module.
FP8_MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The activations they take, each quantized once: the normed input of q/k/v, the attention output, the normed
# input of gate/up, and the SwiGLU product.
FP8_ACTIVATIONS = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")


def initial_fp8_meta(cfg: ModelConfig) -> dict:
  """The FP8 scaling state a training run with matmul_dtype "fp8" starts from, stacked per layer."""
  return fp8.init_state(FP8_ACTIVATIONS, FP8_MATMULS, (cfg.n_layers,))


def from_previous_position(hidden_BxTxD, positions_BxT, real_BxT):
  """Each column's hidden state replaced by that of the real column one RoPE position earlier.

  Dream (initialised from the autoregressive Qwen2.5) predicts the token at position p from the output at
  p - 1: its generate loop reads `logits[:, i - 1]` for position i and position 0 reads its own. Doing the
  shift here means `hidden()` / the logits at a column always predict that column's token, so the
  losses and both samplers work unchanged. The previous position is looked up, not the previous array
  column: the samplers feed rows as [answer | prompt | pads] with explicit positions (decoding_passes.py), where
  the first answer token's predecessor is the last prompt token. Without explicit positions (training
  rows: position = column) it is a plain shift by one column.
  """
  if positions_BxT is None:
    return jnp.concatenate([hidden_BxTxD[:, :1], hidden_BxTxD[:, :-1]], axis=1)
  # [B, T, T] comparisons: cheap at sampling lengths (training rows pass no positions).
  previous_BxTxT = (positions_BxT[:, None, :] == positions_BxT[:, :, None] - 1) & real_BxT[:, None, :]
  own_T = jnp.arange(positions_BxT.shape[1])
  source_BxT = jnp.where(previous_BxTxT.any(-1), jnp.argmax(previous_BxTxT, axis=-1), own_T)
  return jnp.take_along_axis(hidden_BxTxD, source_BxT[..., None], axis=1)


def _real_keys(valid_BxT, kv_lengths_B, T: int):
  """bool [B or 1, T]: the columns that hold real tokens (not padding)."""
  if valid_BxT is not None:
    return valid_BxT
  if kv_lengths_B is not None:
    return jnp.arange(T)[None, :] < kv_lengths_B[:, None]
  return jnp.ones((1, T), bool)
