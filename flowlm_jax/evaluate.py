"""Exact-match accuracy of both samplers on the held-out SFT tasks: `python -m flowlm_jax.evaluate --workdir=W`.

Both samplers get the same number of model evaluations: LLaDA `steps` = FlowLM `max_steps` (FlowLM
rows may stop earlier). Answers are compared, stripped, with the records' `answer`.

Also the evaluation functions `python -m flowlm_jax.compare` runs (docs/evaluation.md): likelihood
bounds of a run (`bounds`), multiple choice by conditional likelihood (`multiple_choice`), exact match
against the number of steps for every decoder (`quality_vs_steps`), and self-correction of answers
corrupted with random tokens (`self_correction`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

import numpy as np

from flowlm_jax.errors import first_line
from flowlm_jax.tokenizer import ASSETS_DIR

TEST_FILE = os.path.join(ASSETS_DIR, "sft_tasks", "test.jsonl")
MODES = ("llada", "flowlm")


def load_records(path: str = TEST_FILE, limit_per_task: int = 0) -> list[dict]:
  """{task, prompt, answer} records; `limit_per_task` > 0 keeps the first that many of each task. A missing
  file, a line that is not JSON or a record without text task/prompt/answer fields is a ValueError naming it."""
  seen = collections.Counter()
  records = []
  if not os.path.isfile(path):
    raise ValueError(f"records: no such file: {path}")
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f"records: {path}:{number} is not JSON ({first_line(e)})") from None
      bad = [k for k in ("task", "prompt", "answer") if not isinstance(record, dict) or not isinstance(record.get(k), str)]
      if bad:
        raise ValueError(f"records: {path}:{number} needs text fields task, prompt and answer (not: {', '.join(bad)})")
      if limit_per_task and seen[record["task"]] >= limit_per_task:
        continue
      seen[record["task"]] += 1
      records.append(record)
  return records


def evaluate_tasks(run, records: list[dict], steps: int, *, batch_size: int = 128, modes=MODES,
                   **overrides) -> dict:
  """Accuracy per task and overall for each sampler at `steps` steps.

  `run` is an `loading.LoadedRun` (or anything with graphdef, params, tokenizer, vocab, config);
  `overrides` replace further inference fields (e.g. `seed`, `replacement_strategy`). Returns
  {"steps", "counts": {task: n, "overall": n}, "accuracy": {mode: {task: acc, "overall": acc}},
  "answers": {mode: [str]}}.
  """
  from flowlm_jax import sampling

  icfg = sampling.run_config(run.config.inference, steps=steps, max_steps=steps, **overrides)
  chat = run.config.dataset.prompt_format == "chat"
  tasks = [r["task"] for r in records]
  counts = dict(collections.Counter(tasks), overall=len(records))
  accuracy, answers = {}, {}
  prompts = [r["prompt"] for r in records]
  for mode in modes:
    answers[mode] = sampling.generate_texts(run.graphdef, run.params, run.tokenizer, run.vocab, prompts, icfg,
                                            mode=mode, chat=chat, batch_size=batch_size)
    accuracy[mode] = exact_match(records, answers[mode])
  return {"steps": steps, "counts": counts, "accuracy": accuracy, "answers": answers}


def exact_match(records: list[dict], answers: list[str]) -> dict[str, float]:
  """{task: accuracy, "overall": accuracy}: an answer counts when it equals the record's, both stripped."""
  return mean_by_task(records, exact_hits(records, answers))


def exact_hits(records: list[dict], answers: list[str]) -> list[bool]:
  """Per record, whether its answer is exactly right (`exact_match`'s test)."""
  if len(answers) != len(records):
    raise ValueError(f"{len(answers)} answers for {len(records)} records")
  return [answer.strip() == record["answer"].strip() for record, answer in zip(records, answers)]


def mean_by_task(records: list[dict], values) -> dict[str, float]:
  """{task: mean, "overall": mean} of one value per record (a hit, a share of right tokens, a credit)."""
  groups = collections.defaultdict(list)
  for record, value in zip(records, values, strict=True):
    for key in (record["task"], "overall"):
      groups[key].append(value)
  return {key: float(np.mean(v)) for key, v in groups.items()}


# --- rows as training renders them ----------------------------------------------------------------


def sft_rows(run, records: list[dict]):
  """`data.TokenizedSplit` of {prompt, answer} records rendered as the run's training rows: prompt + [SEP] +
  answer + [EOS] fill to dataset.max_length (to its answer slot, then [PAD], with dataset.answer_slots), the
  answer part corruptible."""
  import datasets

  from flowlm_jax import data

  dcfg = run.config.dataset.copy_and_resolve_references()
  with dcfg.unlocked():
    dcfg.kind, dcfg.prompt_field, dcfg.answer_field, dcfg.overlong = "sft", "prompt", "answer", "truncate"
  table = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])
  split = data.encode_sft(table, dcfg, run.tokenizer, run.vocab)
  if len(split) != len(records):
    raise ValueError(f"{len(records) - len(split)} prompts do not fit dataset.max_length={dcfg.max_length}")
  return split


def validation_rows(run, limit: int = 0):
  """The run's own validation split as training rows (`limit` records, 0 = all)."""
  from flowlm_jax import data

  return data.load_split(run.config.dataset, "validation", run.tokenizer, run.vocab, limit)


def decode_answers(run, answers_NxA) -> list[str]:
  """Answer token rows as text, cut where the run's training rows end an answer (what the samplers return)."""
  from flowlm_jax import sampling

  return sampling.decode_answers(run.tokenizer, run.vocab, answers_NxA, chat=run.config.dataset.prompt_format == "chat")


def spread(values) -> dict:
  """{"mean", "std" (sample; 0 for one value), "min", "max", "n"} of a list of numbers; {"n": 0} of none."""
  values = [float(v) for v in values]
  if not values:
    return {"n": 0}
  return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "min": min(values), "max": max(values), "n": len(values)}


# --- likelihood ----------------------------------------------------------------------------------


def bounds(run, tokens_NxL, corruptible_NxL, specs: dict, *, batch_size: int = 64, seed: int = 0) -> dict:
  """{name: likelihood.Bound.as_dict()} of each `likelihood.BoundSpec` in `specs` on the same rows."""
  from flowlm_jax import likelihood

  return {name: likelihood.estimate_bound(run.graphdef, run.params, run.tokenizer, run.vocab, tokens_NxL,
                                          corruptible_NxL, spec, batch_size=batch_size, seed=seed).as_dict()
          for name, spec in specs.items()}


def choice_candidates(records: list[dict], choices: int, distractors: str = "same_task") -> list[list[str]]:
  """Per record: its answer first, then `choices - 1` distinct other answers taken in list order after it
  (wrapping around) from records of the same task ("same_task") or of the other tasks ("other_tasks": the
  answer must fit the prompt's task, an easier test)."""
  if distractors not in ("same_task", "other_tasks"):
    raise ValueError(f"unknown distractors {distractors!r} (same_task | other_tasks)")
  out = []
  for i, r in enumerate(records):
    options = [r["answer"]]
    for j in list(range(i + 1, len(records))) + list(range(i)):
      if len(options) == choices:
        break
      other = records[j]
      if (other["task"] == r["task"]) == (distractors == "same_task") and other["answer"] not in options:
        options.append(other["answer"])
    if len(options) < choices:
      raise ValueError(f"record {i} ({r['task']}): fewer than {choices} distinct answers to choose from")
    out.append(options)
  return out


def multiple_choice(run, records: list[dict], *, choices: int = 4, distractors: str = "same_task", draws: int = 16,
                    seed: int = 0, batch_size: int = 256) -> dict:
  """Accuracy of picking the answer whose conditional likelihood bound (LLaDA Alg. 3, count form) is lowest
  among `choices` candidates (`choice_candidates`; chance = 1 / choices).

  A record's candidates share their random draws (same masked answer positions: common random numbers), so
  their difference is not blurred by independent noise. Ties split the credit. Returns {"choices", "chance",
  "draws", "accuracy": {task: acc, "overall": acc}}.
  """
  from flowlm_jax import likelihood

  candidates = choice_candidates(records, choices, distractors)
  rows = sft_rows(run, [{"prompt": r["prompt"], "answer": a} for r, options in zip(records, candidates)
                        for a in options])
  nats = likelihood.row_draws(run.graphdef, run.params, run.vocab, rows.tokens, rows.corruptible,
                              likelihood.BoundSpec(form="count", draws=draws), batch_size=batch_size, seed=seed,
                              key_ids=np.repeat(np.arange(len(records)), choices))
  nats = nats.mean(axis=1).reshape(len(records), choices)
  tied = nats == nats.min(axis=1, keepdims=True)
  credit = tied[:, 0] / tied.sum(axis=1)
  return {"choices": choices, "distractors": distractors, "chance": 1.0 / choices, "draws": draws,
          "accuracy": mean_by_task(records, credit)}


# --- quality against steps ---------------------------------------------------------------------


def decoders() -> dict[str, tuple[str, dict]]:
  """{name: (mode, inference overrides)}: LLaDA decoding and FlowLM decoding with each replacement strategy."""
  from flowlm_jax import sampling

  return {"llada": ("llada", {}),
          **{f"flowlm/{s}": ("flowlm", {"replacement_strategy": s}) for s in sampling.STRATEGIES}}


def quality_vs_steps(run, records: list[dict], steps=(4, 8, 16, 32, 64), seeds=(0,), *, batch_size: int = 128,
                     names=None, **overrides) -> dict:
  """{decoder: {steps (str): {"overall": [acc per seed], task: [...]}}}: exact match of every decoder
  (`decoders()`, or those in `names`) at each step count, for each sampler seed. Under greedy decoding
  (temperature 0, low-confidence remasking, [MASK] start) the seeds give the same answers."""
  out = {}
  for name, (mode, options) in decoders().items():
    if names and name not in names:
      continue
    out[name] = {}
    for n_steps in steps:
      per_seed = collections.defaultdict(list)
      for seed in seeds:
        result = evaluate_tasks(run, records, n_steps, batch_size=batch_size, modes=(mode,), seed=seed,
                                **{**overrides, **options})
        for task, acc in result["accuracy"][mode].items():
          per_seed[task].append(acc)
      out[name][str(n_steps)] = dict(per_seed)
  return out


# --- self-correction ---------------------------------------------------------------------------


def clean_answers(run, records: list[dict], answer_length: int) -> tuple[list[list[int]], np.ndarray]:
  """(prompt ids, answers int32[N, answer_length]) as training rows hold them: the answer's tokens, then
  [EOS] fill (cut at answer_length)."""
  rows = sft_rows(run, records)
  prompts, answers = [], np.full((len(records), answer_length), run.vocab.eos_id, np.int32)
  for n, (tokens, answer) in enumerate(zip(rows.tokens, rows.corruptible)):
    prompts.append(tokens[:np.argmax(answer)].tolist())  # up to the answer: not the [PAD]s after an answer slot
    part = tokens[answer][:answer_length]
    answers[n, :len(part)] = part
  return prompts, answers


def corrupt_with_random_tokens(clean_NxA: np.ndarray, rate: float, random_ids, rng) -> tuple[np.ndarray, np.ndarray]:
  """(start, wrong): each position replaced with probability `rate` by a uniformly drawn random id other than
  the clean token (the next id in the list when the draw hits it); no [MASK]."""
  random_ids = np.asarray(random_ids)
  wrong = rng.random(clean_NxA.shape) < rate
  draw = rng.integers(0, len(random_ids), clean_NxA.shape)
  replacement = random_ids[draw]
  replacement = np.where(replacement == clean_NxA, random_ids[(draw + 1) % len(random_ids)], replacement)
  return np.where(wrong, replacement, clean_NxA).astype(np.int32), wrong


def refine(run, prompt_ids: list[list[int]], start_NxA: np.ndarray, icfg, *, batch_size: int = 128) -> np.ndarray:
  """int32[N, A]: FlowLM decoding of each prompt's answer from `start` instead of [MASK]s."""
  from flowlm_jax import sampling

  if start_NxA.shape[1] != icfg.answer_length:
    raise ValueError(f"start answers have {start_NxA.shape[1]} tokens, inference.answer_length={icfg.answer_length}")
  return sampling.generate_batched(run.graphdef, run.params, prompt_ids, run.vocab, icfg, mode="flowlm",
                                   batch_size=batch_size, initial_NxA=start_NxA)


def self_correction(run, records: list[dict], rates=(0.1, 0.2, 0.3, 0.5), *, steps: int | None = None,
                    seed: int = 0, batch_size: int = 128, **overrides) -> dict:
  """{rate (str): {"fixed", "broken", "exact_match", "exact_match_before", "wrong_tokens", "right_tokens"}}.

  Clean answers (`clean_answers`) are corrupted with random tokens only (`corrupt_with_random_tokens`, seeded
  by `seed` and the rate), then refined by FlowLM decoding for `steps` steps (default inference.max_steps).
  fixed: share of corrupted positions holding the clean token at the end; broken: share of untouched
  positions that no longer do; exact match of the decoded answers after and before refinement.
  """
  from flowlm_jax import sampling

  steps = steps or int(run.config.inference.max_steps)
  icfg = sampling.run_config(run.config.inference, steps=steps, max_steps=steps, seed=seed, **overrides)
  prompts, clean = clean_answers(run, records, int(icfg.answer_length))
  out = {}
  for rate in rates:
    rng = np.random.default_rng([seed, round(rate * 1000)])
    start, wrong = corrupt_with_random_tokens(clean, rate, run.vocab.random_token_ids, rng)
    final = refine(run, prompts, start, icfg, batch_size=batch_size)
    right = final == clean
    out[str(rate)] = {
        "fixed": float(right[wrong].mean()) if wrong.any() else None,
        "broken": float((~right[~wrong]).mean()) if (~wrong).any() else None,
        "exact_match": exact_match(records, decode_answers(run, final))["overall"],
        "exact_match_before": exact_match(records, decode_answers(run, start))["overall"],
        "wrong_tokens": int(wrong.sum()), "right_tokens": int((~wrong).sum())}
  return out


def format_table(result: dict) -> str:
  modes = list(result["accuracy"])
  lines = [f"exact match at {result['steps']} steps",
           f"{'task':<10}{'n':>6}" + "".join(f"{m:>10}" for m in modes)]
  for task, n in result["counts"].items():
    lines.append(f"{task:<10}{n:>6}" + "".join(f"{result['accuracy'][m][task]:>10.3f}" for m in modes))
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.evaluate", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory (holds checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--limit", type=int, default=0, help="records per task (0 = all 100)")
  p.add_argument("--steps", type=int, default=0, help="steps for both samplers (default: inference.steps)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--records", default=TEST_FILE, help="a .jsonl of {task, prompt, answer} records")
  args = p.parse_args(argv)
  # Bad numbers fail here, before the checkpoint loads and the samplers compile.
  if args.batch_size < 1:
    p.error(f"--batch_size must be > 0, got {args.batch_size}")
  for name in ("limit", "steps"):
    if getattr(args, name) < 0:
      p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
  return args


def main(argv=None) -> int:
  from flowlm_jax import cli
  cli.quiet_libraries()  # before transformers loads: no irrelevant banner
  args = parse_args(argv)
  from flowlm_jax import loading

  try:
    records = load_records(args.records, args.limit)  # before the checkpoint: minutes for a large model
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  run = loading.load(args.workdir, step=args.step)
  result = evaluate_tasks(run, records, args.steps or run.config.inference.steps, batch_size=args.batch_size)
  print(f"checkpoint step {run.step} of {args.workdir}")
  print(format_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
