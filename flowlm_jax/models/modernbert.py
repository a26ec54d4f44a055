"""The "modernbert" family: ModernBERT (Warner et al. 2024) in Flax NNX.

The network is HF transformers' `ModernBertForMaskedLM` (`models/modernbert/modeling_modernbert.py`):
  tok embedding -> LayerNorm -> L x [ (attn_norm) -> attention -> + ; mlp_norm -> gated GELU MLP -> + ]
  -> final LayerNorm -> head (dense, activation, LayerNorm) -> decoder (tied to the embedding) + bias.
Layer 0 has no attn_norm (HF uses an Identity there). Layers are global (full attention, RoPE theta
`global_rope_theta`) or local (a key j is visible from query i iff |i - j| <= local_attention // 2, RoPE theta
`local_rope_theta`); `layer_types` (or the older `global_attn_every_n_layers`) says which. LayerNorms have no
bias unless `norm_bias`; `attention_bias`, `mlp_bias`, `classifier_bias`, `decoder_bias` add the others.
Dropout is not implemented (ModernBERT's released configs set every dropout to 0). HF's config.json and
tensor names map onto `ModernBertConfig` and these parameters in `formats/modernbert_hf.py`.

Same interface as `llama.Transformer`: `hidden()` returns the features the decoder reads (the MLM head's
output), `output_matrix()` / `output_bias()` the decoder, `logits_from_hidden()` float32 logits with the padded
vocabulary rows at -inf. The local window is measured in RoPE positions, not array columns: the two agree
for ordinary rows (HF's definition), and the samplers' reordered rows ([answer | prompt | pads] with explicit
positions) then see exactly the window they would see in order.

Layers are stacked on a leading `layers` axis and run under `jax.lax.scan`: local and global layers differ
only in their key mask and RoPE table, both selected per layer from a static flag, so one layer body serves
all and compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flowlm_jax.models.layers import (apply_rope, attention, layer_norm, mask_padded_vocab, normal_param,
                                      rope_tables, run_layers, window_mask, with_bias)

# HF ACT2FN names -> jax; "gelu" is the exact (erf) GELU, the *_tanh/new variants the tanh approximation.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
  """The resolved architecture (from an HF config.json) plus this project's dtype/remat/attention choices.

  Hashable (it sits in the graphdef, a static argument of the compiled samplers).
  """
  vocab_size: int            # embedding rows (HF vocab_size; may exceed the tokenizer)
  num_real_tokens: int       # ids >= this are padding rows: never predicted
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int                  # HF intermediate_size (Wi projects to twice this: input and gate)
  global_layers: tuple[bool, ...]  # per layer: full attention (True) or local (False)
  local_window: int          # a local layer's keys lie within this many positions each side
  global_rope_theta: float = 160_000.0
  local_rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  norm_bias: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  classifier_bias: bool = False
  decoder_bias: bool = True
  hidden_activation: str = "gelu"
  classifier_activation: str = "gelu"
  tie_embeddings: bool = True
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  remat: str = "none"
  attention: str = "auto"
  pretrained: str = ""       # local directory whose weights train.init_state loads ("" = random init)
  hf_config: str = ""        # the source config.json as JSON text: export writes it back updated

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_kv_heads(self) -> int:  # for code written against ModelConfig (FLOP counts)
    return self.n_heads

# --- the network ------------------------------------------------------------------------------


class ModernBert(nnx.Module):
  """Random init (HF's stds, untruncated) is for shapes and tests; real use loads weights (formats.modernbert_hf)."""

  # Read in float32 by the forward pass (the rest is cast to the compute dtype where it is used).
  FLOAT32_PARAMS = ("embed_norm", "embed_norm_bias", "final_norm", "final_norm_bias", "head_norm",
                    "head_norm_bias", "decoder_bias")

  def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, H, Dh, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    dtype = jnp.dtype(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / (2 * L) ** 0.5
    normal = lambda shape, s, axes: normal_param(rngs.params(), shape, s, dtype, axes)
    ones = lambda shape, axes: nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)
    zeros = lambda shape, axes: nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)

    self.embed = normal((V, D), std, ("vocab", "embed"))
    self.embed_norm = ones((D,), ("norm",))
    self.attn_norm = ones((L - 1, D), ("layers", "norm"))  # layer 0 has none
    self.wq = normal((L, D, H, Dh), std, ("layers", "embed", "heads", "head_dim"))
    self.wk = normal((L, D, H, Dh), std, ("layers", "embed", "heads", "head_dim"))
    self.wv = normal((L, D, H, Dh), std, ("layers", "embed", "heads", "head_dim"))
    self.wo = normal((L, H, Dh, D), out_std, ("layers", "heads", "head_dim", "embed"))
    self.mlp_norm = ones((L, D), ("layers", "norm"))
    self.w_in = normal((L, D, F), std, ("layers", "embed", "mlp"))
    self.w_gate = normal((L, D, F), std, ("layers", "embed", "mlp"))
    self.w_out = normal((L, F, D), out_std, ("layers", "mlp", "embed"))
    self.final_norm = ones((D,), ("norm",))
    self.head_dense = normal((D, D), out_std, ("embed", "mlp"))
    self.head_norm = ones((D,), ("norm",))
    if not cfg.tie_embeddings:
      self.unembed = normal((D, V), out_std, ("embed", "vocab"))
    # Optional biases. A "bias" logical axis keeps them out of weight decay (train.decay_mask) and replicated.
    if cfg.norm_bias:
      for name, shape, axes in _norm_biases(L, D):
        setattr(self, name, zeros(shape, axes))
    if cfg.attention_bias:
      for name in ("bq", "bk", "bv"):
        setattr(self, name, zeros((L, H, Dh), ("layers", "heads", "bias")))
      self.bo = zeros((L, D), ("layers", "bias"))
    if cfg.mlp_bias:
      self.b_in, self.b_gate, self.b_out = (zeros((L, F), ("layers", "bias")), zeros((L, F), ("layers", "bias")),
                                            zeros((L, D), ("layers", "bias")))
    if cfg.classifier_bias:
      self.head_dense_bias = zeros((D,), ("bias",))
    if cfg.decoder_bias:
      self.decoder_bias = zeros((V,), ("vocab",))

  def _get(self, name: str):
    """A parameter's value, or None where the config has no such parameter (an absent bias)."""
    var = getattr(self, name, None)
    return None if var is None else var[...]

  # -- output head ---------------------------------------------------------------------------

  def output_matrix(self) -> jax.Array:
    """[D, V] decoder weight (tied: the embedding) in the compute dtype."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
    return w.astype(self.cfg.compute_dtype)

  def output_bias(self) -> jax.Array | None:
    """float32 [V] decoder bias, or None."""
    b = self._get("decoder_bias")
    return None if b is None else b.astype(jnp.float32)

  def logits_from_hidden(self, hidden_BxTxD: jax.Array, w_DxV: jax.Array | None = None) -> jax.Array:
    """float32 logits; padding rows of the vocabulary get -inf so they are never predicted."""
    w = self.output_matrix() if w_DxV is None else w_DxV
    logits = jnp.einsum("btd,dv->btv", hidden_BxTxD, w, preferred_element_type=jnp.float32)
    bias = self.output_bias()
    if bias is not None:
      logits = logits + bias
    return mask_padded_vocab(logits, self.cfg.num_real_tokens)

  # -- forward -------------------------------------------------------------------------------

  def encode(self, tokens_BxT: jax.Array, valid_BxT: jax.Array | None = None,
             positions_BxT: jax.Array | None = None, kv_lengths_B: jax.Array | None = None,
             layers: list[dict] | None = None) -> jax.Array:
    """The encoder's output after final_norm [B, T, D] (HF's `last_hidden_state`), compute dtype.

    `layers`: `unstack(layer_inputs())` prepared outside a decoding loop (layers.run_layers).
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dtype)
    x = layer_norm(x, self.embed_norm[...], self._get("embed_norm_bias"), cfg.norm_eps)
    rope = {kind: rope_tables(positions_BxT, cfg.head_dim, theta)
            for kind, theta in (("global", cfg.global_rope_theta), ("local", cfg.local_rope_theta))}
    near_Bx1xTxT = window_mask(positions_BxT, cfg.local_window)
    valid_Bx1x1xT = None if valid_BxT is None else valid_BxT[:, None, None, :]

    def layer(x, xs):
      is_global, first = xs["is_global"], xs["first"]
      p = {name: w.astype(dtype) for name, w in xs.items() if name not in LAYER_FLAGS}
      mask = near_Bx1xTxT | is_global  # a global layer sees every key, a local one its window
      if valid_Bx1x1xT is not None:
        mask = mask & valid_Bx1x1xT
      sin, cos = jax.tree.map(lambda g, l: jnp.where(is_global, g, l), rope["global"], rope["local"])
      normed = layer_norm(x, p["attn_norm"], p.get("attn_norm_bias"), cfg.norm_eps)
      h = jnp.where(first, x, normed)  # HF: layer 0's attn_norm is an Identity
      x = x + self_attention(h, p, sin, cos, mask, kv_lengths_B, cfg.attention)
      h = layer_norm(x, p["mlp_norm"], p.get("mlp_norm_bias"), cfg.norm_eps)
      return x + gated_mlp(h, p, ACTIVATIONS[cfg.hidden_activation]), None

    x = run_layers(layer, x, layers or self.layer_inputs(), cfg.remat)
    return layer_norm(x, self.final_norm[...], self._get("final_norm_bias"), cfg.norm_eps)

  def layer_inputs(self) -> dict:
    """Per-layer parameters stacked on axis 0, plus the static per-layer flags the scan body reads."""
    cfg = self.cfg
    D = cfg.d_model
    xs = {name: getattr(self, name)[...] for name in LAYER_PARAMS if hasattr(self, name)}
    # Layer 0 has no attn_norm parameter: a placeholder row keeps the stack rectangular (never used).
    xs["attn_norm"] = jnp.concatenate([jnp.ones((1, D), xs["attn_norm"].dtype), xs["attn_norm"]])
    if "attn_norm_bias" in xs:
      xs["attn_norm_bias"] = jnp.concatenate([jnp.zeros((1, D), xs["attn_norm_bias"].dtype), xs["attn_norm_bias"]])
    xs["is_global"] = jnp.asarray(cfg.global_layers)
    xs["first"] = jnp.arange(cfg.n_layers) == 0
    return xs

  def hidden(self, tokens_BxT: jax.Array, valid_BxT: jax.Array | None = None,
             positions_BxT: jax.Array | None = None, kv_lengths_B: jax.Array | None = None,
             layers: list[dict] | None = None) -> jax.Array:
    """The MLM head's output [B, T, D] (compute dtype): what the decoder projects onto the vocabulary.

    Padding and `layers` as in llama.Transformer: `valid_BxT` masks keys anywhere, `kv_lengths_B` says
    the first n keys are real.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    x = self.encode(tokens_BxT, valid_BxT, positions_BxT, kv_lengths_B, layers)
    x = jnp.einsum("btd,de->bte", x, self.head_dense[...].astype(dtype))
    bias = self._get("head_dense_bias")
    if bias is not None:
      x = x + bias.astype(dtype)
    x = ACTIVATIONS[cfg.classifier_activation](x)
    return layer_norm(x, self.head_norm[...], self._get("head_norm_bias"), cfg.norm_eps)

  def __call__(self, tokens_BxT, valid_BxT=None, positions_BxT=None, kv_lengths_B=None) -> jax.Array:
    """float32 logits [B, T, V]."""
    return self.logits_from_hidden(self.hidden(tokens_BxT, valid_BxT, positions_BxT, kv_lengths_B))


# Stacked per-layer parameters (the optional biases are present only when the config has them).
LAYER_PARAMS = ("attn_norm", "attn_norm_bias", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "mlp_norm",
                "mlp_norm_bias", "w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")
LAYER_FLAGS = ("is_global", "first")  # static per-layer booleans the scan body reads beside the parameters


def _norm_biases(L: int, D: int):
  """(name, shape, logical axes) of the LayerNorm biases that `norm_bias` adds."""
  return (("embed_norm_bias", (D,), ("norm",)), ("attn_norm_bias", (L - 1, D), ("layers", "norm")),
          ("mlp_norm_bias", (L, D), ("layers", "norm")), ("final_norm_bias", (D,), ("norm",)),
          ("head_norm_bias", (D,), ("norm",)))


def self_attention(h_BxTxD, p, sin, cos, mask, kv_lengths_B, implementation: str):
  q = apply_rope(with_bias(jnp.einsum("btd,dhk->bthk", h_BxTxD, p["wq"]), p.get("bq")), sin, cos)
  k = apply_rope(with_bias(jnp.einsum("btd,dhk->bthk", h_BxTxD, p["wk"]), p.get("bk")), sin, cos)
  v = with_bias(jnp.einsum("btd,dhk->bthk", h_BxTxD, p["wv"]), p.get("bv"))
  a = attention(q, k, v, mask, kv_lengths_B, implementation)
  return with_bias(jnp.einsum("bthk,hkd->btd", a, p["wo"]), p.get("bo"))


def gated_mlp(h_BxTxD, p, activation):
  """HF ModernBertMLP: Wi -> (input, gate); Wo(act(input) * gate)."""
  inp = with_bias(jnp.einsum("btd,df->btf", h_BxTxD, p["w_in"]), p.get("b_in"))
  gate = with_bias(jnp.einsum("btd,df->btf", h_BxTxD, p["w_gate"]), p.get("b_gate"))
  return with_bias(jnp.einsum("btf,fd->btd", activation(inp) * gate, p["w_out"]), p.get("b_out"))
