"""Datasets → fixed-shape token rows → a deterministic, resumable, per-process batch iterator.

Two record kinds:
- plain text (pretraining): documents are tokenized, each followed by [EOS], concatenated and cut into
  rows of `max_length`; the last row is filled with [PAD] so that no token is lost.
- chat / SFT: `prompt`/`answer` fields, or a `messages` list (tulu-3-sft-mixture) rendered as
  "User: … [SEP] Assistant: …". A row is prompt + [SEP] + answer, then [EOS] up to `max_length`
  (LLaDA's SFT recipe: the model learns to end an answer by predicting [EOS] in the fill). The prompt
  and [SEP] are never corrupted and carry no loss. A tokenizer with a chat template (an imported
  LLaDA/Dream checkpoint's) renders chat instead: the template's prompt, then answer + its end-of-turn token.

Every row comes with `corruptible` (bool, same shape): the positions masking may corrupt and the loss
sees. Specials inside text ([EOS] between documents, [PAD], [SEP]) and prompts are never corruptible.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Iterator

import numpy as np

from flowlm_jax.config import split_files
from flowlm_jax.tokenizer import ASSETS_DIR, end_of_turn_id, has_chat_template, separator_id, templated_prompt_text
from flowlm_jax.vocab import Vocab

log = logging.getLogger(__name__)

EMBEDDED_DATASETS = {
    "embedded:shakespeare": ("text", os.path.join(ASSETS_DIR, "shakespeare", "train.txt"),
                             os.path.join(ASSETS_DIR, "shakespeare", "valid.txt")),
    "embedded:sft_tasks": ("sft", os.path.join(ASSETS_DIR, "sft_tasks", "train.jsonl"),
                           os.path.join(ASSETS_DIR, "sft_tasks", "test.jsonl")),
    "embedded:sft_tasks_long": ("sft", os.path.join(ASSETS_DIR, "sft_tasks_long", "train.jsonl"),
                                os.path.join(ASSETS_DIR, "sft_tasks_long", "test.jsonl")),
}


@dataclasses.dataclass
class TokenizedSplit:
  """Rows of one split. `corruptible` marks what masking may touch and the loss may see."""
  tokens: np.ndarray       # int32 [N, L]
  corruptible: np.ndarray  # bool  [N, L]
  num_records: int = 0
  num_truncated: int = 0   # SFT records cut to max_length
  num_dropped: int = 0     # SFT records whose prompt left no room for an answer
  chat: bool = False       # records were rendered as chat (chat_prompt_ids)

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def summary(self) -> str:
    n_tokens = int(self.corruptible.sum())
    extra = f", {self.num_truncated} truncated, {self.num_dropped} dropped" if self.num_truncated or self.num_dropped else ""
    return f"{self.num_records} records -> {len(self)} rows x {self.tokens.shape[1]} ({n_tokens} trainable tokens{extra})"


# --- records ----------------------------------------------------------------------------------


def load_records(dcfg, split: str):
  """Raw records of `split` ("train" | "validation") as an HF `datasets.Dataset`."""
  import datasets  # heavy import, kept at the edge

  kwargs = {"cache_dir": dcfg.cache_dir} if dcfg.cache_dir else {}
  if dcfg.name in EMBEDDED_DATASETS:
    _, train_file, valid_file = EMBEDDED_DATASETS[dcfg.name]
    return _load_files([train_file if split == "train" else valid_file], **kwargs)
  if dcfg.name:  # hub dataset (or a local dataset directory/script that load_dataset understands)
    if split == "validation" and dcfg.validation_split:
      return datasets.load_dataset(dcfg.name, dcfg.hub_config or None, split=dcfg.validation_split, **kwargs)
    ds = datasets.load_dataset(dcfg.name, dcfg.hub_config or None, split=dcfg.train_split, **kwargs)
    return ds if dcfg.validation_split else _hold_out(ds, dcfg, split)
  train_files = split_files(dcfg.train_files)
  valid_files = split_files(dcfg.validation_files)
  if split == "validation" and valid_files:
    return _load_files(valid_files, dcfg.text_sample_by, **kwargs)
  ds = _load_files(train_files, dcfg.text_sample_by, **kwargs)
  return ds if valid_files else _hold_out(ds, dcfg, split)


def _load_files(files: list[str], text_sample_by: str = "paragraph", **kwargs):
  import datasets

  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"dataset file not found: {path}")
    if os.path.getsize(path) == 0:
      raise ValueError(f"dataset file is empty: {path}")
  exts = {os.path.splitext(f)[1].lower() for f in files}
  if exts <= {".txt", ".text"}:
    # A document per paragraph (blank-line separated) or per line (dataset.text_sample_by); a byte-order mark is
    # not text.
    builder, options = "text", {"sample_by": text_sample_by, "encoding": "utf-8-sig"}
  elif exts <= {".json", ".jsonl"}:
    builder, options = "json", {}
  else:
    raise ValueError(f"dataset files: unsupported extension(s) {sorted(exts)} (use .txt, .json or .jsonl)")
  try:
    ds = datasets.load_dataset(builder, data_files=files, split="train", **options, **kwargs)
  except datasets.exceptions.DatasetGenerationError as e:
    cause = e.__cause__ or e
    raise ValueError(f"dataset files {', '.join(files)} could not be read: {str(cause).splitlines()[0]}") from None
  except ValueError as e:  # datasets' own words name a split, not the files
    if "corresponds to no data" not in str(e):
      raise
    raise ValueError(f"dataset is empty: {', '.join(files)} hold no records") from None
  if len(ds) == 0:
    raise ValueError(f"dataset is empty: {', '.join(files)}")
  return ds


def _hold_out(ds, dcfg, split: str):
  """Deterministic train/validation split of one set of records."""
  if dcfg.validation_split_ratio <= 0:
    if split == "validation":
      raise ValueError("dataset: no validation files/split and validation_split_ratio is 0")
    return ds
  if len(ds) - math.ceil(len(ds) * dcfg.validation_split_ratio) < 1:  # datasets' train_test_split rounds test up
    raise ValueError(f"dataset.validation_split_ratio={dcfg.validation_split_ratio} of {len(ds)} record(s) leaves no "
                     "train or no validation record (a .txt file is one record per paragraph unless "
                     "dataset.text_sample_by=line; or give dataset.validation_files)")
  parts = ds.train_test_split(test_size=dcfg.validation_split_ratio, seed=0, shuffle=True)
  return parts["train" if split == "train" else "test"]


# --- tokenization -------------------------------------------------------------------------------


def split_turns(messages: list[dict]) -> tuple[list[dict], str]:
  """Chat turns → (the turns before the last assistant turn: the prompt, that turn's content: the answer)."""
  last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
  if last is None:
    raise ValueError("chat record has no assistant turn")
  return messages[:last], messages[last]["content"]


def user_turn(prompt: str) -> list[dict]:
  """A plain prompt as chat: a one-turn conversation."""
  return [{"role": "user", "content": prompt}]


def plain_prompt_ids(tokenizer, prompt: str) -> list[int]:
  """Ids of a plain prompt: its text, then [SEP]."""
  return prompts_ids(tokenizer, [prompt], chat=False)[0]


def chat_prompt_ids(tokenizer, turns: list[dict]) -> list[int]:
  """Ids of a chat prompt up to where the answer starts: the tokenizer's chat template when it has one (an
  imported checkpoint's), else this project's "User: …" lines, [SEP] and " Assistant:"."""
  return prompts_ids(tokenizer, [turns], chat=True)[0]


def prompts_ids(tokenizer, prompts: list, chat: bool) -> list[list[int]]:
  """`plain_prompt_ids` / `chat_prompt_ids` of many prompts (texts, or turn lists for chat), in one batched
  tokenizer call: a fast tokenizer spreads a batch over the CPU's cores."""
  if chat and has_chat_template(tokenizer):
    texts = [templated_prompt_text(tokenizer, turns) for turns in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
  if chat:
    texts = ["\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns) for turns in prompts]
    suffix = [separator_id(tokenizer), *tokenizer.encode(" Assistant:", add_special_tokens=False)]
  else:
    texts, suffix = list(prompts), [separator_id(tokenizer)]
  return [ids + suffix for ids in content_ids(tokenizer, texts)]


def content_ids(tokenizer, texts: list[str]) -> list[list[int]]:
  """Ids of record text (documents, prompts, answers): a special token's spelling in it ("[MASK]", "[PAD]",
  "<|endoftext|>") is text like any other, never that token's id, which would put a [PAD] or [MASK] mid-row.
  Not for a chat template's rendering, whose own special tokens must stay tokens: there a turn's text is not
  escaped (not done)."""
  return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def answer_end_id(tokenizer, chat: bool, vocab: Vocab) -> int:
  """What a training row writes right after an answer: the template's end-of-turn token for templated chat (what
  the checkpoint was tuned to emit), else [EOS]. Decoding cuts answers there (sampling.answer_ids)."""
  return end_of_turn_id(tokenizer) if chat and has_chat_template(tokenizer) else vocab.eos_id


def ended_answer_ids(tokenizer, answers: list[str], chat: bool, vocab: Vocab) -> list[list[int]]:
  """Ids of each answer, then `answer_end_id` (after a space that follows "Assistant:" in untemplated chat)."""
  end = answer_end_id(tokenizer, chat, vocab)
  space = " " if chat and not has_chat_template(tokenizer) else ""
  return [ids + [end] for ids in content_ids(tokenizer, [space + a for a in answers])]


def _check_text(value, record: int, field: str) -> None:
  """A null, a number or a list of content parts would otherwise fail deep in the tokenizer, or be trained on as
  its Python repr."""
  if not isinstance(value, str):
    raise ValueError(f"dataset: record {record}: field {field!r} is {type(value).__name__}, expected text")


def _texts(values, field: str) -> list[str]:
  """`values` (one per record) as a list, each checked to be text."""
  values = list(values)
  for i, value in enumerate(values):
    _check_text(value, i, field)
  return values


def tokenize_split(records, dcfg, tokenizer, vocab: Vocab) -> TokenizedSplit:
  if len(records) == 0:
    raise ValueError("dataset split is empty")
  if dcfg.kind == "text":
    if dcfg.text_field not in records.column_names:
      raise KeyError(f"dataset.text_field={dcfg.text_field!r} is not a column (columns: {records.column_names})")
    texts = _texts(records[dcfg.text_field], dcfg.text_field)
    kept = [t for t in texts if t.strip()]  # a blank "document" would train [EOS] after [EOS]
    if len(kept) < len(texts):
      log.warning("dataset: %d of %d documents are blank and were left out", len(texts) - len(kept), len(texts))
    if not kept:
      raise ValueError(f"dataset: every one of the {len(texts)} documents is blank")
    docs = content_ids(tokenizer, kept)
    return pack_documents(docs, vocab, dcfg.max_length)
  return encode_sft(records, dcfg, tokenizer, vocab)


def pack_documents(docs: list[list[int]], vocab: Vocab, max_length: int) -> TokenizedSplit:
  """Concatenates documents, each followed by [EOS], into rows; the tail row is [PAD]-filled."""
  lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
  stream = np.full(int(lengths.sum()), vocab.eos_id, dtype=np.int32)
  ends = np.cumsum(lengths)
  for doc, end in zip(docs, ends):
    stream[end - 1 - len(doc):end - 1] = doc
  n_rows = -(-len(stream) // max_length)
  tokens = np.full(n_rows * max_length, vocab.pad_id, dtype=np.int32)
  tokens[:len(stream)] = stream
  tokens = tokens.reshape(n_rows, max_length)
  return TokenizedSplit(tokens, ~vocab.special_mask(tokens), num_records=len(docs))


def answer_slot(length: int, slots) -> int | None:
  """The smallest of `slots` (answer lengths) that holds `length` tokens, an answer with its end; None if none
  does. Training rows (dataset.answer_slots) and the long-answer benchmark's decoding lengths both use it."""
  return next((n for n in sorted(slots) if length <= n), None)


def encode_sft(records, dcfg, tokenizer, vocab: Vocab) -> TokenizedSplit:
  columns = records.column_names
  has_messages = dcfg.messages_field in columns
  if dcfg.prompt_format == "plain" and has_messages:
    raise ValueError(f"dataset.prompt_format='plain' but the records have the {dcfg.messages_field!r} field "
                     "(chat records are always rendered as chat)")
  if not has_messages and not {dcfg.prompt_field, dcfg.answer_field} <= set(columns):
    raise KeyError(f"dataset: SFT records need {dcfg.prompt_field!r}/{dcfg.answer_field!r} or "
                   f"{dcfg.messages_field!r} fields (columns: {columns})")
  chat = has_messages or dcfg.prompt_format == "chat"
  if has_messages:
    pairs = [split_turns(r[dcfg.messages_field]) for r in records]
    for i, (turns, answer) in enumerate(pairs):
      for content in [m.get("content") for m in turns] + [answer]:
        _check_text(content, i, f"{dcfg.messages_field}[].content")
  else:  # prompt/answer records; as chat they read as a one-turn conversation
    prompts, answers = _texts(records[dcfg.prompt_field], dcfg.prompt_field), _texts(records[dcfg.answer_field],
                                                                                       dcfg.answer_field)
    pairs = [(user_turn(p) if chat else p, a) for p, a in zip(prompts, answers)]
  L = dcfg.max_length
  answers = ended_answer_ids(tokenizer, [a for _, a in pairs], chat, vocab)
  prompts = prompts_ids(tokenizer, [p for p, _ in pairs], chat)
  slots = sorted(dcfg.answer_slots)
  fill = vocab.pad_id if slots else vocab.eos_id  # [PAD] keys are masked out: with slots the row ends with its answer
  rows, prompt_lens, row_ends, truncated, dropped = [], [], [], 0, 0
  for prompt_ids, answer in zip(prompts, answers):
    cut = False
    if slots:  # the answer filled with [EOS] to the answer length it would be decoded at
      slot = answer_slot(len(answer), slots) or slots[-1]
      cut = len(answer) > slot
      if cut and dcfg.overlong == "error":
        raise ValueError(f"dataset: an answer of {len(answer)} tokens with its end does not fit the largest of "
                         f"dataset.answer_slots={tuple(slots)} (set dataset.overlong=truncate to cut it)")
      answer = answer[:slot] + [vocab.eos_id] * (slot - len(answer))
    row = prompt_ids + answer
    if len(row) > L:
      if dcfg.overlong == "error":
        raise ValueError(f"dataset: a record has {len(row)} tokens > dataset.max_length={L} "
                         "(set dataset.overlong=truncate to cut it)")
      if len(prompt_ids) >= L:
        dropped += 1
        continue
      cut = True
      row = row[:L]
    truncated += cut
    row_ends.append(len(row) if slots else L)
    rows.append(row + [fill] * (L - len(row)))
    prompt_lens.append(len(prompt_ids))
  if not rows:
    raise ValueError(f"dataset: every record's prompt fills dataset.max_length={L} (no room for an answer)")
  tokens = np.asarray(rows, dtype=np.int32)
  columns = np.arange(L)[None, :]
  corruptible = (columns >= np.asarray(prompt_lens)[:, None]) & (columns < np.asarray(row_ends)[:, None])
  if truncated:
    log.warning("dataset: %d of %d records longer than max_length=%d (or answer_slots %s) were truncated", truncated,
                len(pairs), L, tuple(slots))
  return TokenizedSplit(tokens, corruptible, num_records=len(pairs), num_truncated=truncated, num_dropped=dropped,
                        chat=chat)


def load_split(dcfg, split: str, tokenizer, vocab: Vocab, max_records: int = 0) -> TokenizedSplit:
  if dcfg.name in EMBEDDED_DATASETS and EMBEDDED_DATASETS[dcfg.name][0] != dcfg.kind:  # before any loading
    raise ValueError(f"dataset.kind={dcfg.kind!r} does not match {dcfg.name} (which is {EMBEDDED_DATASETS[dcfg.name][0]!r})")
  records = load_records(dcfg, split)
  if max_records:
    records = records.select(range(min(max_records, len(records))))
  return tokenize_split(records, dcfg, tokenizer, vocab)


def unigram_entropy(split: TokenizedSplit) -> float:
  """Entropy (nats) of the trainable tokens' unigram distribution: the loss of a model that ignores context."""
  counts = np.bincount(split.tokens[split.corruptible])
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train: TokenizedSplit, valid: TokenizedSplit) -> float:
  """Validation NLL (nats/token) of the training unigram distribution (add-half smoothed): the loss a
  context-free model reaches on the validation split — the baseline `eval_nll_corrupted` must beat."""
  size = int(max(train.tokens.max(), valid.tokens.max())) + 1
  counts = np.bincount(train.tokens[train.corruptible], minlength=size) + 0.5
  log_p = np.log(counts / counts.sum())
  return float(-log_p[valid.tokens[valid.corruptible]].mean())


# --- batches ------------------------------------------------------------------------------------


class BatchIterator:
  """Global batches of a split in a seeded per-epoch order, of which this process reads its rows.

  The state is two integers (epoch, batches consumed in the epoch): saved with a checkpoint, it makes a
  resumed run continue with exactly the next batch. Process p of P reads rows [p·B/P, (p+1)·B/P) of
  every global batch of B rows, so the processes partition each batch.
  """

  def __init__(self, split: TokenizedSplit, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    if len(split) < global_batch_size:
      raise ValueError(f"dataset has {len(split)} rows, fewer than one global batch of {global_batch_size}")
    self.split = split
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed, self.shuffle = seed, shuffle
    self.process_index = process_index
    self.epoch, self.position = 0, 0
    self._order = self._epoch_order(0)

  @property
  def batches_per_epoch(self) -> int:
    return len(self.split) // self.global_batch_size

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.split))
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.split))

  def global_indices(self) -> np.ndarray:
    """Row indices of the next global batch (without consuming it)."""
    start = self.position * self.global_batch_size
    return self._order[start:start + self.global_batch_size]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.global_indices()
    lo = self.process_index * self.local_batch_size
    local = rows[lo:lo + self.local_batch_size]
    batch = {"tokens": self.split.tokens[local], "corruptible": self.split.corruptible[local]}
    self.position += 1
    if self.position == self.batches_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
      self._order = self._epoch_order(self.epoch)
    return batch

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "position": self.position}

  def restore(self, state: dict[str, int]) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    if not 0 <= self.position < self.batches_per_epoch:
      raise ValueError(f"data iterator state {state} does not fit this dataset ({self.batches_per_epoch} batches/epoch)")
    self._order = self._epoch_order(self.epoch)


def eval_batches(split: TokenizedSplit, global_batch_size: int, max_batches: int = 0, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The validation split in order; the last batch is filled with rows that carry no loss."""
  n_batches = -(-len(split) // global_batch_size)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  local = global_batch_size // process_count
  for b in range(n_batches):
    rows = np.arange(b * global_batch_size, (b + 1) * global_batch_size)[process_index * local:(process_index + 1) * local]
    real = rows < len(split)
    rows = np.where(real, rows, 0)
    yield {"tokens": split.tokens[rows], "corruptible": split.corruptible[rows] & real[:, None]}
