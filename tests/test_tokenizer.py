"""Loading tokenizers, the special tokens diffusion needs, and the embedding table's size."""

import json
import pathlib
import shutil

import pytest

from flowlm_jax import tokenizer as tokenizer_lib
from flowlm_jax.vocab import Vocab

ASSETS = pathlib.Path(tokenizer_lib.ASSETS_DIR)


def paragraphs(path):
  return [p for p in path.read_text().split("\n\n") if p.strip()]


def build_tokenizer_without_mask_and_pad(directory):
  """A word-level tokenizer declaring only [UNK] and [EOS], saved as a transformers tokenizer dir."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
  assert wrapped.mask_token is None and wrapped.pad_token is None
  wrapped.save_pretrained(str(directory))
  return str(directory)


def test_embedded_tokenizer_loads_offline_with_8192_tokens(tokenizer):
  assert len(tokenizer) == 8192


@pytest.mark.parametrize("token, token_id", [("[PAD]", 0), ("[MASK]", 1), ("[EOS]", 2), ("[SEP]", 3)])
def test_embedded_tokenizer_special_token_ids(tokenizer, token, token_id):
  assert tokenizer.convert_tokens_to_ids(token) == token_id
  assert tokenizer.convert_ids_to_tokens(token_id) == token


def test_embedded_tokenizer_declares_its_special_tokens(tokenizer):
  assert (tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id) == (0, 1, 2, 3)


def test_embedded_tokenizer_round_trips_corpus_paragraphs(tokenizer):
  texts = paragraphs(ASSETS / "shakespeare" / "valid.txt")
  assert len(texts) > 1000
  mismatches = [t for t in texts if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) != t]
  assert mismatches == []


def test_embedded_tokenizer_round_trips_sft_records(tokenizer):
  records = [json.loads(line) for line in (ASSETS / "sft_tasks" / "test.jsonl").read_text().splitlines()]
  texts = [r[field] for r in records for field in ("prompt", "answer")]
  texts += ["User: café — naïve 日本語 🙂\nAssistant:", "  two leading spaces,\ttabs and trailing  \n\n"]
  mismatches = [t for t in texts if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) != t]
  assert mismatches == []


def test_embedded_tokenizer_encodes_without_adding_special_tokens(tokenizer):
  # Rows are assembled by hand ([SEP], [EOS] fill): encode() must not insert BOS/EOS of its own.
  text = "To be, or not to be"
  assert tokenizer.encode(text) == tokenizer.encode(text, add_special_tokens=False)


def test_embedded_byte_tokenizer_has_one_id_per_byte_and_the_same_specials():
  tok = tokenizer_lib.load_tokenizer("embedded:bytes")
  assert len(tok) == 261
  assert tokenizer_lib.vocab_of(tok) == Vocab(size=261, mask_id=1, pad_id=0, eos_id=2, sep_id=3,
                                             special_ids=(0, 1, 2, 3, 4))
  texts = paragraphs(ASSETS / "shakespeare" / "valid.txt")[::20] + ["café 日本語 🙂", "add 37 58"]
  for text in texts:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text


def test_vocab_of_embedded_tokenizer(tokenizer):
  assert tokenizer_lib.vocab_of(tokenizer) == Vocab(size=8192, mask_id=1, pad_id=0, eos_id=2, sep_id=3,
                                                    special_ids=(0, 1, 2, 3, 4))


def test_vocab_special_ids_are_exactly_the_tokenizers_special_tokens(tokenizer, vocab):
  assert set(vocab.special_ids) == {tokenizer.convert_tokens_to_ids(t) for t in
                                    ("[PAD]", "[MASK]", "[EOS]", "[SEP]", "[UNK]")}


@pytest.mark.parametrize("size, multiple, explicit, expected", [
    (8192, 128, 0, 8192),
    (8193, 128, 0, 8320),
    (8191, 128, 0, 8192),
    (6, 4, 0, 8),
    (6, 1, 0, 6),
    (8192, 128, 126464, 126464),
    (8192, 128, 8192, 8192),
    (8192, 128, 8200, 8200),  # an explicit size is taken as is, not rounded
])
def test_padded_vocab_size(size, multiple, explicit, expected):
  vocab = Vocab(size=size, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3))
  model = type("ModelConfig", (), {"vocab_size": explicit, "vocab_multiple": multiple})
  assert tokenizer_lib.padded_vocab_size(model, vocab) == expected


def test_padded_vocab_size_rejects_an_explicit_size_smaller_than_the_tokenizer(vocab):
  model = type("ModelConfig", (), {"vocab_size": 8000, "vocab_multiple": 128})
  with pytest.raises(ValueError, match="model.vocab_size=8000 is smaller than the tokenizer"):
    tokenizer_lib.padded_vocab_size(model, vocab)


def test_tokenizer_lacking_mask_and_pad_gets_them_added(tmp_path):
  tok = tokenizer_lib.load_tokenizer(build_tokenizer_without_mask_and_pad(tmp_path))
  assert (tok.mask_token, tok.pad_token) == ("[MASK]", "[PAD]")
  assert tok.mask_token_id >= 4 and tok.pad_token_id >= 4
  assert tok.mask_token_id != tok.pad_token_id
  assert len(tok) == 6
  assert tok.encode("a b a", add_special_tokens=False) == [2, 3, 2]  # the original ids are untouched


def test_damaged_tokenizer_files_are_a_one_line_error(tmp_path):
  shutil.copytree(pathlib.Path(__file__).parent / "fixtures" / "dream_tiny", tmp_path / "tok")
  (tmp_path / "tok" / "tokenizer.json").write_text('{"version": ')
  with pytest.raises(ValueError, match=r"^model.tokenizer: '.*tok' does not load \(") as info:
    tokenizer_lib.load_tokenizer(str(tmp_path / "tok"))
  assert "\n" not in str(info.value)


def test_tokenizer_that_cannot_take_a_mask_token_is_a_one_line_error(tmp_path, monkeypatch):
  from transformers import PreTrainedTokenizerFast

  def refuse(self, *args, **kwargs):
    raise RuntimeError("frozen vocabulary")

  monkeypatch.setattr(PreTrainedTokenizerFast, "add_special_tokens", refuse)
  with pytest.raises(ValueError, match=r"model\.tokenizer: .* lacks \[MASK\], \[PAD\] and cannot add them"):
    tokenizer_lib.load_tokenizer(build_tokenizer_without_mask_and_pad(tmp_path))


def test_vocab_of_a_tokenizer_without_sep_uses_eos_as_separator(tmp_path):
  tok = tokenizer_lib.load_tokenizer(build_tokenizer_without_mask_and_pad(tmp_path))
  vocab = tokenizer_lib.vocab_of(tok)
  assert (vocab.eos_id, vocab.sep_id) == (1, 1)
  assert vocab.size == 6
  assert set(vocab.special_ids) == {0, 1, vocab.mask_id, vocab.pad_id}


@pytest.mark.parametrize("path", ["/nonexistent/flowlm_tokenizer", "./no_such_tokenizer_dir"])
def test_missing_local_tokenizer_path_raises_file_not_found_naming_the_key(path):
  with pytest.raises(FileNotFoundError, match="model.tokenizer: no such directory"):
    tokenizer_lib.load_tokenizer(path)


def test_unavailable_hub_tokenizer_raises_file_not_found_naming_the_key():
  # Offline (conftest): the hub cannot be reached and nothing is cached.
  with pytest.raises(FileNotFoundError, match="model.tokenizer: cannot load 'no-such-org/no-such-tokenizer'"):
    tokenizer_lib.load_tokenizer("no-such-org/no-such-tokenizer")


def test_home_relative_tokenizer_path_is_expanded(tmp_path, monkeypatch):
  shutil.copytree(tokenizer_lib.EMBEDDED_TOKENIZER, tmp_path / "tok")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert len(tokenizer_lib.load_tokenizer("~/tok")) == 8192
