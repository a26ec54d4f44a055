"""LLaDA (Nie et al. 2025) in its Hugging Face layout: GSAI-ML/LLaDA-8B-Base and -Instruct.

The released model runs OLMo's code with the causal mask removed (`modeling_llada.py`, loaded with
`trust_remote_code`): LLaMA blocks of RMSNorm (weight only), rotate-half RoPE (`rope_theta` 500000, computed in
float32), multi-head attention without biases and a SwiGLU MLP whose `ff_proj` is the GATE (SiLU is applied to
it), `up_proj` the up and `ff_out` the down projection; a final `ln_f` and an untied output layer, the top-level
`ff_out`. LLaDA-8B: d_model 4096, 32 layers, 32 heads (no GQA), mlp_hidden_size 12288, 126464 embedding rows,
[MASK] = 126336, eos = pad = 126081 in config.json.

What is LLaDA's own here: its tensor names and its config.json keys. The shapes, transposes, the streaming import
and the export are shared with Dream in `llama_hf.py`.
"""

from __future__ import annotations

MODEL_TYPE = "llada"  # config.json's model_type, lower-cased

_BLOCK = "model.transformer.blocks.{i}."
NAMES = {  # our parameter -> HF tensor name ("{i}": the layer)
    "embed": "model.transformer.wte.weight",
    "attn_norm": _BLOCK + "attn_norm.weight",
    "wq": _BLOCK + "q_proj.weight", "wk": _BLOCK + "k_proj.weight", "wv": _BLOCK + "v_proj.weight",
    "bq": _BLOCK + "q_proj.bias", "bk": _BLOCK + "k_proj.bias", "bv": _BLOCK + "v_proj.bias",
    "wo": _BLOCK + "attn_out.weight",
    "mlp_norm": _BLOCK + "ff_norm.weight",
    "w_gate": _BLOCK + "ff_proj.weight", "w_up": _BLOCK + "up_proj.weight", "w_down": _BLOCK + "ff_out.weight",
    "final_norm": "model.transformer.ln_f.weight",
    "unembed": "model.transformer.ff_out.weight",
}

KEYS = {  # our ModelConfig field -> config.json key
    "vocab_size": "embedding_size", "d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads",
    "n_kv_heads": "n_kv_heads", "d_ff": "mlp_hidden_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
    "tie_embeddings": "weight_tying", "qkv_bias": "include_qkv_bias",
}
FIXED = {"shift_logits": False}  # a masked-diffusion model from scratch: each position predicts its own token

# OLMo options the port does not implement: config.json must hold these values (or leave the key out).
REQUIRED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "layer_norm_with_affine": True,
            "alibi": False, "rope": True, "attention_layer_norm": False, "include_bias": False,
            "bias_for_layer_norm": None, "scale_logits": False, "input_emb_norm": False, "clip_qkv": None,
            "multi_query_attention": None}


def complete(hf: dict) -> dict:
  """config.json with the values OLMo's code derives when a key is absent or null."""
  hf = dict(hf)
  hf["embedding_size"] = hf.get("embedding_size") or hf.get("vocab_size")
  hf["mlp_hidden_size"] = hf.get("mlp_hidden_size") or (hf.get("mlp_ratio", 4) * hf.get("d_model", 0))
  hf["n_kv_heads"] = hf.get("n_kv_heads") or hf.get("n_heads")
  hf.setdefault("rope_theta", 10000.0)
  hf.setdefault("rms_norm_eps", 1e-5)
  hf.setdefault("weight_tying", False)
  hf.setdefault("include_qkv_bias", False)
  for key in ("bias_for_layer_norm", "multi_query_attention"):  # OLMo configs spell "off" as false or null
    if hf.get(key) is False:
      hf[key] = None
  return hf
