"""Records -> token rows (packing, SFT encoding) -> resumable, per-process batches."""

import collections
import re

import numpy as np
import pytest

from flowlm_jax import config as config_lib
from flowlm_jax import data
from flowlm_jax.vocab import Vocab

# Synthetic ids for packing and batching: 0-4 special, 5-63 ordinary.
SMALL_VOCAB = Vocab(size=64, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))
PAD, EOS, SEP = 0, 2, 3


def random_docs(seed, n_docs, max_len):
  rng = np.random.default_rng(seed)
  return [rng.integers(5, 64, size=rng.integers(0, max_len + 1)).tolist() for _ in range(n_docs)]


def sft_cfg(**overrides):
  """The `dataset` section of a config, set up for SFT records."""
  d = config_lib.base_config().dataset
  d.name, d.kind, d.max_length = "embedded:sft_tasks", "sft", 32
  for key, value in overrides.items():
    d[key] = value
  return d


def records(rows):
  import datasets

  return datasets.Dataset.from_list(rows)


def chat(*turns):
  """chat(("user", "hi"), ("assistant", "hello")) -> a tulu-style `messages` record."""
  return {"messages": [{"role": role, "content": content} for role, content in turns]}


def id_split(n_rows, length=4):
  """Rows whose every token is the row's index + 5, so batches can be traced back to rows."""
  tokens = np.repeat(np.arange(n_rows, dtype=np.int32)[:, None] + 5, length, axis=1)
  return data.TokenizedSplit(tokens, np.ones_like(tokens, dtype=bool), num_records=n_rows)


def row_ids(batch):
  return (batch["tokens"][:, 0] - 5).tolist()


# --- packing plain text -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_packing_keeps_every_token_once_with_eos_after_each_document(seed):
  docs = random_docs(seed, n_docs=30, max_len=40) + [[]]  # an empty document still gets its [EOS]
  split = data.pack_documents(docs, SMALL_VOCAB, max_length=16)
  flat = split.tokens.reshape(-1).tolist()
  while flat and flat[-1] == PAD:
    flat.pop()
  assert flat == [t for doc in docs for t in doc + [EOS]]
  assert split.num_records == len(docs)


@pytest.mark.parametrize("seed", range(5))
def test_packing_pads_only_the_tail_of_the_last_row(seed):
  docs = random_docs(seed, n_docs=30, max_len=40)
  n_stream = sum(len(d) + 1 for d in docs)
  split = data.pack_documents(docs, SMALL_VOCAB, max_length=16)
  assert split.tokens.shape == (-(-n_stream // 16), 16)  # as few rows as hold the stream
  pads = np.argwhere(split.tokens == PAD)
  assert (pads[:, 0] == split.tokens.shape[0] - 1).all()
  assert len(pads) == split.tokens.size - n_stream
  assert (split.tokens[-1, 16 - len(pads):] == PAD).all()


def test_packing_a_stream_that_fills_its_rows_exactly_adds_no_padding():
  docs = [[5, 6, 7], [8, 9, 10, 11], [12], list(range(13, 37))]  # with [EOS]s: 4 + 5 + 2 + 25 = 36 = 3 x 12
  split = data.pack_documents(docs, SMALL_VOCAB, max_length=12)
  assert split.tokens.shape == (3, 12)
  assert not (split.tokens == PAD).any()


@pytest.mark.parametrize("seed", range(5))
def test_packed_rows_are_corruptible_exactly_where_not_special(seed):
  docs = random_docs(seed, n_docs=30, max_len=40)
  split = data.pack_documents(docs, SMALL_VOCAB, max_length=16)
  np.testing.assert_array_equal(split.corruptible, ~np.isin(split.tokens, SMALL_VOCAB.special_ids))
  assert split.corruptible.sum() == sum(len(d) for d in docs)


# --- SFT records -------------------------------------------------------------------------------


def test_sft_row_is_prompt_sep_answer_then_eos_fill(tokenizer, vocab):
  pairs = [("add 12 30", "42"), ("reverse d o g", "g o d")]
  split = data.encode_sft(records([{"prompt": p, "answer": a} for p, a in pairs]), sft_cfg(), tokenizer, vocab)
  assert split.tokens.shape == (2, 32)
  for row, (prompt, answer) in zip(split.tokens.tolist(), pairs):
    body = tokenizer.encode(prompt, add_special_tokens=False) + [SEP] + tokenizer.encode(answer, add_special_tokens=False)
    assert row == body + [EOS] * (32 - len(body))
  assert not split.chat
  assert (split.num_records, split.num_truncated, split.num_dropped) == (2, 0, 0)


def test_a_special_tokens_spelling_in_a_record_is_text_not_that_token(tokenizer, vocab):
  """"[MASK]" in an answer, "[PAD]" in a prompt or a document: ordinary text tokens, so no [PAD] or [MASK] lands
  mid-row (a [PAD] there hid the row's last token from attention; a [MASK] was a training target)."""
  rows = [{"prompt": "say [PAD] [SEP]", "answer": "the [MASK] token [EOS] here"}]
  split = data.encode_sft(records(rows), sft_cfg(max_length=48), tokenizer, vocab)
  row = split.tokens[0].tolist()
  answer_start = row.index(SEP) + 1
  assert row.count(SEP) == 1 and vocab.pad_id not in row and vocab.mask_id not in row
  assert EOS not in row[answer_start:answer_start + 8]  # the answer's own tokens (then the real [EOS] fill)
  assert tokenizer.decode(row[answer_start:row.index(EOS, answer_start)]) == "the [MASK] token [EOS] here"
  docs = data.tokenize_split(records([{"text": "hello [PAD] world [MASK]"}]),
                             sft_cfg(kind="text", text_field="text", max_length=16), tokenizer, vocab)
  text_row = docs.tokens[0].tolist()
  assert vocab.mask_id not in text_row and text_row.index(vocab.pad_id) > text_row.index(EOS)  # only the tail fill


def test_sft_prompt_and_sep_are_not_corruptible_answer_and_eos_fill_are(tokenizer, vocab):
  pairs = [("add 12 30", "42"), ("sort 4 1 3 2", "1 2 3 4")]
  split = data.encode_sft(records([{"prompt": p, "answer": a} for p, a in pairs]), sft_cfg(), tokenizer, vocab)
  for row, corruptible, (prompt, _) in zip(split.tokens, split.corruptible, pairs):
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False)) + 1  # + [SEP]
    assert row[n_prompt - 1] == SEP
    assert corruptible.tolist() == [False] * n_prompt + [True] * (32 - n_prompt)


def test_answer_slots_end_each_row_at_the_answer_length_it_is_decoded_at(tokenizer, vocab):
  """With dataset.answer_slots, an answer is filled with [EOS] to the smallest slot that holds it (as the
  sampler's answer_length would be), then [PAD], which is neither corrupted nor seen (train_step's key lengths)."""
  pairs = [("add 12 30", "42"), ("sort 4 1 3 2", "1 2 3 4"), ("copy", " ".join("abcdefghij"))]
  rows = records([{"prompt": p, "answer": a} for p, a in pairs])
  split = data.encode_sft(rows, sft_cfg(answer_slots=(6, 4)), tokenizer, vocab)
  assert split.tokens.shape == (3, 32) and (split.num_truncated, split.num_dropped) == (1, 0)
  for row, corruptible, (prompt, answer) in zip(split.tokens.tolist(), split.corruptible.tolist(), pairs):
    head = tokenizer.encode(prompt, add_special_tokens=False) + [SEP]
    body = tokenizer.encode(answer, add_special_tokens=False) + [EOS]
    slot = 4 if len(body) <= 4 else 6  # "42" + [EOS]: 4; "1 2 3 4" + [EOS]: 6; ten letters: cut to 6
    answer_part = (body + [EOS] * slot)[:slot]
    assert row == head + answer_part + [vocab.pad_id] * (32 - len(head) - slot)
    assert corruptible == [False] * len(head) + [True] * slot + [False] * (32 - len(head) - slot)
  with pytest.raises(ValueError, match="dataset.answer_slots"):
    data.encode_sft(rows, sft_cfg(answer_slots=(6, 4), overlong="error"), tokenizer, vocab)
  # Without slots the row is filled to max_length with [EOS], every filled column corruptible (LLaDA's SFT).
  plain = data.encode_sft(rows, sft_cfg(), tokenizer, vocab)
  assert (plain.tokens != vocab.pad_id).all() and plain.corruptible[:, -1].all()


def test_answer_slots_must_be_answer_lengths_below_max_length():
  c = config_lib.preset("llada", "tasks_long")
  assert tuple(c.dataset.answer_slots) == (256, 512)
  for bad in ((0, 256), (256, 1032)):
    with c.unlocked():
      c.dataset.answer_slots = bad
    with pytest.raises(ValueError, match="dataset.answer_slots"):
      config_lib.validate(c)


def test_chat_messages_are_rendered_user_sep_assistant(tokenizer, vocab):
  split = data.encode_sft(records([chat(("user", "hi there"), ("assistant", "hello you"))]), sft_cfg(), tokenizer, vocab)
  tokens, corruptible = split.tokens[0], split.corruptible[0]
  n_fill = 32 - len(tokenizer.encode("User: hi there", add_special_tokens=False)) - 1 - \
      len(tokenizer.encode(" Assistant: hello you", add_special_tokens=False))
  assert tokenizer.decode(tokens.tolist()) == "User: hi there[SEP] Assistant: hello you" + "[EOS]" * n_fill
  assert tokenizer.decode(tokens[~corruptible].tolist()) == "User: hi there[SEP] Assistant:"
  assert tokenizer.decode(tokens[corruptible].tolist()) == " hello you" + "[EOS]" * n_fill
  assert split.chat


def test_a_plain_prompt_for_a_chat_trained_model_is_encoded_as_training_rendered_it(tokenizer, vocab):
  from flowlm_jax import sampling

  split = data.encode_sft(records([chat(("user", "hi there"), ("assistant", "hello you"))]), sft_cfg(), tokenizer, vocab)
  prompt = split.tokens[0][~split.corruptible[0]].tolist()  # "User: hi there[SEP] Assistant:"
  assert sampling.encode_prompt(tokenizer, "hi there", chat=True) == prompt
  assert tokenizer.decode(sampling.encode_prompt(tokenizer, "hi there", chat=False)) == "hi there[SEP]"


def test_chat_history_goes_into_the_prompt_and_the_last_assistant_turn_is_the_answer(tokenizer, vocab):
  record = chat(("system", "be brief"), ("user", "add 1 2"), ("assistant", "3"), ("user", "add 2 2"),
                ("assistant", "4"))
  split = data.encode_sft(records([record]), sft_cfg(max_length=48), tokenizer, vocab)
  tokens, corruptible = split.tokens[0], split.corruptible[0]
  assert tokenizer.decode(tokens[~corruptible].tolist()) == \
      "System: be brief\nUser: add 1 2\nAssistant: 3\nUser: add 2 2[SEP] Assistant:"
  assert tokenizer.decode(tokens[corruptible].tolist()).replace("[EOS]", "") == " 4"


def test_a_template_that_closes_turns_with_plain_text_ends_answers_with_eos(vocab):
  from flowlm_jax.tokenizer import load_tokenizer

  templated = load_tokenizer("embedded")  # a fresh copy: the session's tokenizer keeps no template
  templated.chat_template = ("{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant> {% endif %}")
  split = data.encode_sft(records([chat(("user", "add 1 2"), ("assistant", "3"))]), sft_cfg(), templated, vocab)
  prompt = templated.encode("user> add 1 2\nassistant> ", add_special_tokens=False)
  body = prompt + templated.encode("3", add_special_tokens=False)
  assert split.tokens[0].tolist() == body + [EOS] * (32 - len(body))  # "\n" after a turn is no token to learn
  assert split.corruptible[0].tolist() == [False] * len(prompt) + [True] * (32 - len(prompt))


def test_chat_record_without_an_assistant_turn_is_an_error(tokenizer, vocab):
  with pytest.raises(ValueError, match="no assistant turn"):
    data.encode_sft(records([chat(("user", "hello?"))]), sft_cfg(), tokenizer, vocab)


def test_overlong_sft_records_are_truncated_and_counted(tokenizer, vocab):
  long_answer = " ".join("abcdefghijklmnopqrstuvwxyz")  # 26 letters: far more than 16 tokens
  rows = [{"prompt": "add 1 2", "answer": "3"}, {"prompt": "copy", "answer": long_answer},
          {"prompt": "reverse", "answer": long_answer}]
  split = data.encode_sft(records(rows), sft_cfg(max_length=16), tokenizer, vocab)
  assert (split.num_records, split.num_truncated, split.num_dropped) == (3, 2, 0)
  assert split.tokens.shape == (3, 16)
  full = tokenizer.encode("copy", add_special_tokens=False) + [SEP] + tokenizer.encode(long_answer, add_special_tokens=False)
  assert split.tokens[1].tolist() == full[:16]
  assert split.corruptible[1].sum() == 16 - len(tokenizer.encode("copy", add_special_tokens=False)) - 1


def test_sft_records_whose_prompt_fills_max_length_are_dropped_and_counted(tokenizer, vocab):
  rows = [{"prompt": "add 1 2", "answer": "3"}, {"prompt": "sort " + " ".join("9876543210" * 2), "answer": "0"}]
  split = data.encode_sft(records(rows), sft_cfg(max_length=12), tokenizer, vocab)
  assert (split.num_records, split.num_truncated, split.num_dropped) == (2, 0, 1)
  assert len(split) == 1


def test_overlong_error_mode_raises_naming_max_length(tokenizer, vocab):
  rows = [{"prompt": "copy", "answer": " ".join("abcdefghijklmnopqrstuvwxyz")}]
  with pytest.raises(ValueError, match="dataset.max_length=16"):
    data.encode_sft(records(rows), sft_cfg(max_length=16, overlong="error"), tokenizer, vocab)


def test_plain_prompt_format_for_chat_records_is_an_error(tokenizer, vocab):
  rows = [chat(("user", "add 1 2"), ("assistant", "3"))]
  with pytest.raises(ValueError, match="dataset.prompt_format='plain'"):
    data.encode_sft(records(rows), sft_cfg(prompt_format="plain"), tokenizer, vocab)


def test_chat_prompt_format_renders_prompt_answer_records_as_a_one_turn_chat(tokenizer, vocab):
  as_chat = data.encode_sft(records([{"prompt": "add 1 2", "answer": "3"}]), sft_cfg(prompt_format="chat"),
                            tokenizer, vocab)
  from_messages = data.encode_sft(records([chat(("user", "add 1 2"), ("assistant", "3"))]), sft_cfg(), tokenizer, vocab)
  assert as_chat.chat
  np.testing.assert_array_equal(as_chat.tokens, from_messages.tokens)
  np.testing.assert_array_equal(as_chat.corruptible, from_messages.corruptible)
  assert tokenizer.decode(as_chat.tokens[0][~as_chat.corruptible[0]]).startswith("User: add 1 2")


@pytest.mark.parametrize("prompt_format, rows, is_chat", [
    ("plain", [{"prompt": "add 1 2", "answer": "3"}], False),
    ("auto", [{"prompt": "add 1 2", "answer": "3"}], False),
    ("chat", [chat(("user", "add 1 2"), ("assistant", "3"))], True),
])
def test_prompt_format_that_matches_the_records_is_accepted(tokenizer, vocab, prompt_format, rows, is_chat):
  split = data.encode_sft(records(rows), sft_cfg(prompt_format=prompt_format), tokenizer, vocab)
  assert split.chat is is_chat


def test_sft_records_without_prompt_answer_or_messages_fields_are_an_error(tokenizer, vocab):
  with pytest.raises(KeyError, match="'prompt'/'answer'"):
    data.encode_sft(records([{"question": "add 1 2", "response": "3"}]), sft_cfg(), tokenizer, vocab)


def test_sft_field_names_are_configurable(tokenizer, vocab):
  rows = [{"question": "add 1 2", "response": "3"}]
  renamed = data.encode_sft(records(rows), sft_cfg(prompt_field="question", answer_field="response"), tokenizer, vocab)
  default = data.encode_sft(records([{"prompt": "add 1 2", "answer": "3"}]), sft_cfg(), tokenizer, vocab)
  np.testing.assert_array_equal(renamed.tokens, default.tokens)


# --- embedded datasets --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_task_splits(tokenizer, vocab):
  dcfg = sft_cfg()
  return data.load_split(dcfg, "train", tokenizer, vocab), data.load_split(dcfg, "validation", tokenizer, vocab)


@pytest.mark.parametrize("split_name", ["train", "validation"])
def test_embedded_shakespeare_loads_as_packed_text(tokenizer, vocab, split_name):
  dcfg = config_lib.base_config().dataset  # embedded:shakespeare, kind text, 128 tokens
  split = data.load_split(dcfg, split_name, tokenizer, vocab, max_records=300)
  assert split.num_records == 300
  assert len(split) > 0 and split.tokens.shape[1] == 128
  assert split.corruptible.sum() > 0.5 * split.tokens.size
  assert (split.tokens == vocab.eos_id).sum() == 300  # one [EOS] after each paragraph


def test_embedded_sft_tasks_load_every_record_as_a_row(sft_task_splits):
  train, validation = sft_task_splits
  assert (train.num_records, len(train)) == (20000, 20000)
  assert (validation.num_records, len(validation)) == (400, 400)
  assert train.num_truncated == train.num_dropped == validation.num_truncated == validation.num_dropped == 0
  assert not train.chat


def test_embedded_sft_tasks_validation_prompts_never_appear_in_train(sft_task_splits):
  train, validation = sft_task_splits

  def prompts(split):
    return {tuple(row[~corruptible].tolist()) for row, corruptible in zip(split.tokens, split.corruptible)}

  train_prompts, validation_prompts = prompts(train), prompts(validation)
  assert len(validation_prompts) == 400
  assert train_prompts.isdisjoint(validation_prompts)


def test_held_out_validation_of_local_files_is_disjoint_from_train(tmp_path, tokenizer, vocab):
  path = tmp_path / "tasks.jsonl"
  path.write_text("".join(f'{{"prompt": "add {i} 1", "answer": "{i + 1}"}}\n' for i in range(100)))
  dcfg = sft_cfg(name="", train_files=str(path), validation_split_ratio=0.2, cache_dir=str(tmp_path / "cache"))
  train = data.load_records(dcfg, "train")["prompt"]
  validation = data.load_records(dcfg, "validation")["prompt"]
  assert (len(train), len(validation)) == (80, 20)
  assert set(train).isdisjoint(validation)
  assert set(train) | set(validation) == {f"add {i} 1" for i in range(100)}
  assert data.load_records(dcfg, "validation")["prompt"] == validation  # the same hold-out every time


def test_a_text_file_is_a_document_per_paragraph_or_per_line_and_its_byte_order_mark_is_not_text(tmp_path):
  path = tmp_path / "lines.txt"
  path.write_text("\ufeff" + "".join(f"Document {i} is one line.\n" for i in range(40)), encoding="utf-8")

  def text_cfg(**overrides):
    d = config_lib.base_config().dataset
    d.name, d.train_files, d.cache_dir = "", str(path), str(tmp_path / "cache")
    for key, value in overrides.items():
      d[key] = value
    return d

  by_line = data.load_records(text_cfg(text_sample_by="line", validation_split_ratio=0.0), "train")["text"]
  assert len(by_line) == 40 and sorted(by_line)[0] == "Document 0 is one line."
  by_paragraph = data.load_records(text_cfg(validation_split_ratio=0.0), "train")["text"]
  assert len(by_paragraph) == 1 and by_paragraph[0].startswith("Document 0")
  with pytest.raises(ValueError, match=r"validation_split_ratio=0.05 of 1 record\(s\) leaves no train or no "
                                       r"validation record .*text_sample_by=line"):
    data.load_records(text_cfg(), "train")


def test_blank_documents_are_left_out_and_a_file_of_blank_lines_is_named(tmp_path, tokenizer, vocab):
  d = config_lib.base_config().dataset
  split = data.tokenize_split(records([{"text": "To be"}, {"text": " \n "}, {"text": "or not"}]), d, tokenizer, vocab)
  assert int((split.tokens == vocab.eos_id).sum()) == 2  # two documents, each followed by [EOS]
  with pytest.raises(ValueError, match="every one of the 1 documents is blank"):
    data.tokenize_split(records([{"text": "  "}]), d, tokenizer, vocab)
  path = tmp_path / "blank.jsonl"
  path.write_text("\n\n  \n")
  with pytest.raises(ValueError, match=re.escape(f"dataset is empty: {path} hold no records")):
    data.load_records(sft_cfg(name="", train_files=str(path), cache_dir=str(tmp_path / "cache")), "train")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "add 1 2", "answer": "3"}, {"prompt": "add 2 2", "answer": None}],
     "dataset: record 1: field 'answer' is NoneType, expected text"),
    ([{"prompt": 7, "answer": "3"}], "dataset: record 0: field 'prompt' is int, expected text"),
    ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}],
     "dataset: record 0: field 'messages[].content' is list, expected text"),
])
def test_a_record_field_that_is_not_text_is_an_error_naming_the_record(tokenizer, vocab, rows, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    data.encode_sft(records(rows), sft_cfg(), tokenizer, vocab)


def test_dataset_kind_that_does_not_match_an_embedded_dataset_is_an_error(tokenizer, vocab):
  dcfg = config_lib.base_config().dataset
  dcfg.kind = "sft"
  with pytest.raises(ValueError, match="dataset.kind='sft' does not match embedded:shakespeare"):
    data.load_split(dcfg, "validation", tokenizer, vocab)


# --- batch iterator -------------------------------------------------------------------------------


def take(iterator, n):
  return [row_ids(next(iterator)) for _ in range(n)]


@pytest.mark.parametrize("interrupt_at", range(10))
def test_restored_iterator_continues_with_the_same_batches(interrupt_at):
  split = id_split(10)  # 3 batches of 3 per epoch: 10 steps cross three epoch boundaries
  expected = take(data.BatchIterator(split, 3, seed=7), 10)
  first = data.BatchIterator(split, 3, seed=7)
  assert take(first, interrupt_at) == expected[:interrupt_at]
  state = first.state()
  assert state == {"epoch": interrupt_at // 3, "position": interrupt_at % 3}
  resumed = data.BatchIterator(split, 3, seed=7)
  resumed.restore(dict(state))
  assert take(resumed, 10 - interrupt_at) == expected[interrupt_at:]


def test_restore_rejects_a_state_that_does_not_fit_the_dataset():
  iterator = data.BatchIterator(id_split(10), 3)
  with pytest.raises(ValueError, match="does not fit this dataset"):
    iterator.restore({"epoch": 0, "position": 3})


def test_each_epoch_visits_every_row_once_in_a_new_order():
  split = id_split(12)
  iterator = data.BatchIterator(split, 3, seed=0)
  epochs = [sum(take(iterator, 4), []) for _ in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(12))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_epoch_drops_the_rows_that_do_not_fill_a_last_batch():
  iterator = data.BatchIterator(id_split(10), 3, seed=0)
  assert iterator.batches_per_epoch == 3
  epoch = sum(take(iterator, 3), [])
  assert len(set(epoch)) == 9
  assert iterator.state() == {"epoch": 1, "position": 0}


def test_order_depends_on_the_seed_only():
  split = id_split(32)
  assert take(data.BatchIterator(split, 4, seed=1), 8) == take(data.BatchIterator(split, 4, seed=1), 8)
  assert take(data.BatchIterator(split, 4, seed=1), 8) != take(data.BatchIterator(split, 4, seed=2), 8)


def test_unshuffled_iterator_reads_rows_in_order_every_epoch():
  iterator = data.BatchIterator(id_split(6), 2, shuffle=False)
  assert take(iterator, 6) == [[0, 1], [2, 3], [4, 5]] * 2


def test_batches_carry_tokens_and_corruptible_of_the_same_rows():
  split = id_split(8)
  split.corruptible[3, 1:] = False
  iterator = data.BatchIterator(split, 8, shuffle=True, seed=3)
  batch = next(iterator)
  np.testing.assert_array_equal(batch["corruptible"], split.corruptible[row_ids(batch)])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_processes_partition_every_global_batch(process_count):
  split = id_split(40)  # 5 batches of 8 per epoch; 12 steps cross two epoch boundaries
  reference = data.BatchIterator(split, 8, seed=5)
  processes = [data.BatchIterator(split, 8, seed=5, process_index=p, process_count=process_count)
               for p in range(process_count)]
  for _ in range(12):
    global_rows = row_ids(next(reference))
    local = [row_ids(next(it)) for it in processes]
    assert all(len(rows) == 8 // process_count for rows in local)
    union = sum(local, [])
    assert union == global_rows
    assert len(set(union)) == 8


def test_global_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(ValueError, match="global batch 6 is not divisible by 4 processes"):
    data.BatchIterator(id_split(24), 6, process_count=4)


def test_dataset_smaller_than_one_batch_is_an_error():
  with pytest.raises(ValueError, match="dataset has 5 rows, fewer than one global batch of 8"):
    data.BatchIterator(id_split(5), 8)


# --- evaluation batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_row_exactly_once(process_count):
  split = id_split(10)
  seen = []
  n_batches = 0
  for p in range(process_count):
    batches = list(data.eval_batches(split, 4, process_index=p, process_count=process_count))
    n_batches = len(batches)
    for batch in batches:
      assert batch["tokens"].shape == (4 // process_count, 4)
      real = batch["corruptible"].any(axis=1)
      seen += np.asarray(row_ids(batch))[real].tolist()
  assert n_batches == 3
  assert sorted(seen) == list(range(10))


def test_eval_padding_rows_carry_no_loss():
  batches = list(data.eval_batches(id_split(10), 4))
  last = batches[-1]
  assert last["corruptible"].tolist() == [[True] * 4] * 2 + [[False] * 4] * 2
  assert all(b["corruptible"].all() for b in batches[:-1])


def test_eval_batches_stop_at_max_batches():
  batches = list(data.eval_batches(id_split(10), 4, max_batches=2))
  assert [row_ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# --- unigram entropy -----------------------------------------------------------------------------


def test_unigram_entropy_of_the_corruptible_tokens():
  tokens = np.array([[5, 5, 6, 7], [5, 8, 0, 0]], dtype=np.int32)
  corruptible = np.array([[True, True, True, True], [True, False, False, False]])
  split = data.TokenizedSplit(tokens, corruptible)
  p = np.array([3, 1, 1]) / 5  # 5 x3, 6, 7; the non-corruptible 8 and [PAD]s do not count
  assert data.unigram_entropy(split) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_unigram_entropy_matches_a_direct_count_on_real_data(sft_task_splits):
  _, validation = sft_task_splits
  counts = collections.Counter(validation.tokens[validation.corruptible].tolist())
  p = np.array(list(counts.values()), dtype=np.float64) / sum(counts.values())
  assert data.unigram_entropy(validation) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_unigram_cross_entropy_is_the_validation_nll_of_smoothed_training_counts():
  train = data.TokenizedSplit(np.array([[5, 5, 6, 0]], np.int32), np.array([[True, True, True, False]]))
  valid = data.TokenizedSplit(np.array([[5, 7]], np.int32), np.array([[True, True]]))
  counts = np.array([0, 0, 0, 0, 0, 2, 1, 0], float) + 0.5
  p = counts / counts.sum()
  expected = -(np.log(p[5]) + np.log(p[7])) / 2
  assert data.unigram_cross_entropy(train, valid) == pytest.approx(expected)
