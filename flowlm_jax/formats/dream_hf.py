"""Dream (Ye et al. 2025, "Dream 7B") in its Hugging Face layout: Dream-org/Dream-v0-Base-7B and -Instruct-7B.

Dream is Qwen2.5-7B's network run without the causal mask (`modeling_dream.py`, `trust_remote_code`): RMSNorm,
rotate-half RoPE (`rope_theta` 1e6), grouped-query attention (28 query / 4 key-value heads) whose q/k/v
projections always carry biases (o_proj has none), a SwiGLU MLP (gate_proj, up_proj, down_proj) and an untied
`lm_head`. Initialised from an autoregressive model, it keeps predicting the NEXT token: the output at position
i is the prediction for position i + 1, and its generate loop reads position i's logits from row i - 1 (position
0 reads its own). `shift_logits` makes the llama family do that read inside the model (models/llama.py).

What is Dream's own here: its tensor names (Qwen2's) and its config.json keys. The shapes, transposes, the
streaming import and the export are shared with LLaDA in `llama_hf.py`.
"""

from __future__ import annotations

MODEL_TYPE = "dream"  # config.json's model_type ("Dream"), lower-cased

_LAYER = "model.layers.{i}."
NAMES = {  # our parameter -> HF tensor name ("{i}": the layer)
    "embed": "model.embed_tokens.weight",
    "attn_norm": _LAYER + "input_layernorm.weight",
    "wq": _LAYER + "self_attn.q_proj.weight", "wk": _LAYER + "self_attn.k_proj.weight",
    "wv": _LAYER + "self_attn.v_proj.weight",
    "bq": _LAYER + "self_attn.q_proj.bias", "bk": _LAYER + "self_attn.k_proj.bias",
    "bv": _LAYER + "self_attn.v_proj.bias",
    "wo": _LAYER + "self_attn.o_proj.weight",
    "mlp_norm": _LAYER + "post_attention_layernorm.weight",
    "w_gate": _LAYER + "mlp.gate_proj.weight", "w_up": _LAYER + "mlp.up_proj.weight",
    "w_down": _LAYER + "mlp.down_proj.weight",
    "final_norm": "model.norm.weight",
    "unembed": "lm_head.weight",
}

KEYS = {  # our ModelConfig field -> config.json key
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
}
FIXED = {"qkv_bias": True, "shift_logits": True}  # DreamAttention builds q/k/v with bias=True whatever the config

# Options the port does not implement: config.json must hold these values (or leave the key out).
REQUIRED = {"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False}


def complete(hf: dict) -> dict:
  """config.json with the defaults of Dream's (Qwen2's) config class filled in."""
  hf = dict(hf)
  hf["num_key_value_heads"] = hf.get("num_key_value_heads") or hf.get("num_attention_heads")
  hf.setdefault("rope_theta", 10000.0)
  hf.setdefault("rms_norm_eps", 1e-6)
  hf.setdefault("tie_word_embeddings", False)
  return hf
