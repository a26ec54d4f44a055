"""Loading the tokenizer (HF transformers) and making sure it has the special tokens diffusion needs."""

from __future__ import annotations

import logging
import os

from flowlm_jax.errors import first_line
from flowlm_jax.vocab import Vocab

log = logging.getLogger(__name__)

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED_TOKENIZER = os.path.join(ASSETS_DIR, "tokenizer")
EMBEDDED = {  # model.tokenizer names of the shipped tokenizers (scripts/build_assets.py)
    "embedded": EMBEDDED_TOKENIZER,                              # byte-level BPE, 8192 ids
    "embedded:bytes": os.path.join(ASSETS_DIR, "tokenizer_bytes"),  # one id per byte, 261 ids
}

# A checkpoint's own code is never run (LLaDA's and Dream's directories name some: without trust_remote_code=False
# transformers would stop and ask on stdin). A release whose tokenizer_config.json names its own tokenizer class
# is loaded with the built-in class of the same tokenizer (the first of these transformers has): Dream's
# DreamTokenizer is Qwen2's byte-level BPE.
BUILT_IN_CLASS_OF = {"DreamTokenizer": ("Qwen2TokenizerFast", "Qwen2Tokenizer")}

# Added when a tokenizer lacks them; the model's embedding table grows to cover them.
REQUIRED_SPECIALS = {"mask_token": "[MASK]", "pad_token": "[PAD]"}


def resolve_tokenizer_path(name: str) -> str:
  return EMBEDDED.get(name) or os.path.expanduser(name)


def load_tokenizer(name: str):
  """AutoTokenizer from the embedded files, a local directory or a hub name, with [MASK] and [PAD].

  Missing [MASK]/[PAD] are added (and reported); a tokenizer that cannot take new tokens is an error.
  """
  from transformers import AutoTokenizer  # heavy import, kept at the edge

  path = resolve_tokenizer_path(name)
  looks_local = name in EMBEDDED or name.startswith(("/", ".", "~"))
  if looks_local and not os.path.isdir(path):
    raise FileNotFoundError(f"model.tokenizer: no such directory: {path}")
  try:
    built_in = _built_in_class(path)
    if built_in is not None:
      tokenizer = built_in.from_pretrained(path)
    else:
      tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  except OSError as e:
    raise FileNotFoundError(f"model.tokenizer: cannot load {name!r} ({str(e).splitlines()[0]})") from None
  except Exception as e:  # noqa: BLE001 - damaged files: transformers' own errors, often several lines long
    raise ValueError(f"model.tokenizer: {name!r} does not load ({first_line(e)})") from None
  _adopt_config_mask(tokenizer, path)
  missing = {k: v for k, v in REQUIRED_SPECIALS.items() if getattr(tokenizer, k, None) is None}
  if tokenizer.pad_token is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
    # LLaDA and Dream pad with EOS. Here [PAD] keys are left out of attention, while the EOS that fills SFT
    # rows after an answer is a training target: the two must differ.
    missing["pad_token"] = REQUIRED_SPECIALS["pad_token"]
  if missing:
    try:
      tokenizer.add_special_tokens(missing)
    except Exception as e:  # noqa: BLE001 - any failure here means the tokenizer cannot be used
      raise ValueError(f"model.tokenizer: {name!r} lacks {', '.join(missing.values())} and cannot add them: {e}") from None
    log.warning("tokenizer %s lacked %s: added them", name, ", ".join(missing.values()))
  if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
    raise ValueError(f"model.tokenizer: {name!r} has no [MASK] or [PAD] token and none could be added")
  return tokenizer


def _built_in_class(path: str):
  """The transformers class standing in for the custom tokenizer class `path` names (BUILT_IN_CLASS_OF), or None."""
  config = os.path.join(path, "tokenizer_config.json")
  if not os.path.isfile(config):
    return None
  import transformers

  from flowlm_jax.formats.safetensors_dir import read_json

  names = BUILT_IN_CLASS_OF.get(read_json(config, "model.tokenizer").get("tokenizer_class"), ())
  return next((getattr(transformers, name) for name in names if hasattr(transformers, name)), None)


def _adopt_config_mask(tokenizer, path: str) -> None:
  """A diffusion LM's config.json names its mask token by id (LLaDA: 126336, Dream: 151666); that is [MASK]."""
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    return
  from flowlm_jax.formats.safetensors_dir import read_json

  mask_id = read_json(config, "model.tokenizer").get("mask_token_id")
  if mask_id is None or mask_id == tokenizer.mask_token_id:
    return
  if not 0 <= mask_id < len(tokenizer):
    raise ValueError(f"model.tokenizer: config.json's mask_token_id={mask_id} is not a token of {path}")
  tokenizer.add_special_tokens({"mask_token": tokenizer.convert_ids_to_tokens(mask_id)})


def separator_id(tokenizer) -> int | None:
  """[SEP], or [EOS] for tokenizers without one: what ends a prompt."""
  return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def has_chat_template(tokenizer) -> bool:
  """Whether the tokenizer carries a chat template (an imported checkpoint's tokenizer_config.json `chat_template`)."""
  return bool(getattr(tokenizer, "chat_template", None))


def templated_prompt_text(tokenizer, turns: list[dict]) -> str:
  """`turns` rendered by the chat template up to where the assistant's answer starts; its ids are
  `tokenizer.encode(text, add_special_tokens=False)`, what apply_chat_template(tokenize=True) does."""
  # LLaDA-8B-Instruct's template writes the assistant header whatever add_generation_prompt says; asking for it
  # makes templates that honour the flag do the same.
  return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


_PROBE_ANSWER = "@@answer@@"  # survives the `trim` filter some templates apply to a turn's content


def end_of_turn_token(tokenizer) -> int | None:
  """The token the chat template writes right after an assistant's content (LLaDA: <|eot_id|>, ChatML:
  <|im_end|>), read off a rendered turn; None when the template writes no added token there (its marker is
  then plain text to this vocabulary)."""
  probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE_ANSWER}]
  text = tokenizer.apply_chat_template(probe, tokenize=False)
  after = text[text.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
  ids = tokenizer.encode(after, add_special_tokens=False)
  if ids and tokenizer.convert_ids_to_tokens(ids[0]) in tokenizer.get_added_vocab():
    return ids[0]
  return None


def end_of_turn_id(tokenizer) -> int:
  """Where an answer ends in chat rows: the template's end-of-turn token, else [EOS]."""
  end = end_of_turn_token(tokenizer)
  return tokenizer.eos_token_id if end is None else end


def vocab_of(tokenizer) -> Vocab:
  """The ids the math needs. EOS falls back to SEP (BERT-style tokenizers have no EOS) and vice versa."""
  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
  sep = separator_id(tokenizer)
  if eos is None:
    raise ValueError("model.tokenizer: needs an end-of-sequence or separator token ([EOS] or [SEP])")
  return Vocab(
      size=len(tokenizer),
      mask_id=tokenizer.mask_token_id,
      pad_id=tokenizer.pad_token_id,
      eos_id=eos,
      sep_id=sep,
      special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
  )


def padded_vocab_size(config_model, vocab: Vocab) -> int:
  """Rows of the model's embedding table: explicit, or len(tokenizer) rounded up to a tile multiple."""
  if config_model.vocab_size:
    if config_model.vocab_size < vocab.size:
      raise ValueError(f"model.vocab_size={config_model.vocab_size} is smaller than the tokenizer ({vocab.size} tokens)")
    return config_model.vocab_size
  multiple = config_model.vocab_multiple
  return -(-vocab.size // multiple) * multiple
