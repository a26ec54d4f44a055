"""Exact-match accuracy of both samplers on the held-out SFT tasks: `python -m flowlm_jax.evaluate --workdir=W`.

Both samplers get the same number of model evaluations: LLaDA `steps` = FlowLM `max_steps` (FlowLM
rows may stop earlier). Answers are compared, stripped, with the records' `answer`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from flowlm_jax.tokenizer import ASSETS_DIR

TEST_FILE = os.path.join(ASSETS_DIR, "sft_tasks", "test.jsonl")
MODES = ("llada", "flowlm")


def load_records(path: str = TEST_FILE, limit_per_task: int = 0) -> list[dict]:
  """{task, prompt, answer} records; `limit_per_task` > 0 keeps the first that many of each task."""
  seen = collections.Counter()
  records = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      if limit_per_task and seen[record["task"]] >= limit_per_task:
        continue
      seen[record["task"]] += 1
      records.append(record)
  return records


def evaluate_tasks(run, records: list[dict], steps: int, *, batch_size: int = 128, modes=MODES) -> dict:
  """Accuracy per task and overall for each sampler at `steps` steps.

  `run` is an `loading.LoadedRun` (or anything with graphdef, params, tokenizer, vocab, config). Returns
  {"steps", "counts": {task: n, "overall": n}, "accuracy": {mode: {task: acc, "overall": acc}},
  "answers": {mode: [str]}}.
  """
  from flowlm_jax import sampling

  icfg = sampling.run_config(run.config.inference, steps=steps, max_steps=steps)
  chat = run.config.dataset.prompt_format == "chat"
  tasks = [r["task"] for r in records]
  counts = dict(collections.Counter(tasks), overall=len(records))
  accuracy, answers = {}, {}
  for mode in modes:
    answers[mode] = []
    for start in range(0, len(records), batch_size):
      prompts = [r["prompt"] for r in records[start:start + batch_size]]
      answers[mode] += sampling.generate_texts(run.graphdef, run.params, run.tokenizer, run.vocab, prompts, icfg,
                                               mode=mode, chat=chat)
    accuracy[mode] = exact_match(records, answers[mode])
  return {"steps": steps, "counts": counts, "accuracy": accuracy, "answers": answers}


def exact_match(records: list[dict], answers: list[str]) -> dict[str, float]:
  """{task: accuracy, "overall": accuracy}: an answer counts when it equals the record's, both stripped."""
  if len(answers) != len(records):
    raise ValueError(f"{len(answers)} answers for {len(records)} records")
  correct, total = collections.Counter(), collections.Counter()
  for record, answer in zip(records, answers):
    hit = answer.strip() == record["answer"].strip()
    for key in (record["task"], "overall"):
      correct[key] += hit
      total[key] += 1
  return {key: correct[key] / n for key, n in total.items()}


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
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from flowlm_jax import loading

  run = loading.load(args.workdir, step=args.step)
  records = load_records(args.records, args.limit)
  result = evaluate_tasks(run, records, args.steps or run.config.inference.steps, batch_size=args.batch_size)
  print(f"checkpoint step {run.step} of {args.workdir}")
  print(format_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
