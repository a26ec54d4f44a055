"""Speed and quality of the fast samplers on a trained run: key/value cache x parallel threshold x answer length.

  uv run python scripts/fast_sampling.py --workdir=runs/llada-long [--answers 256,512 --caches none,prefix,dual
      --thresholds 0,0.9 --factors 1 --modes llada --batch 1 --limit 0 --out fast_sampling.json]

Records: the long-answer set (flowlm_jax/assets/sft_tasks_long/test.jsonl), each decoded at the smallest
answer length of --answers that holds its reference answer and [EOS] (answer_length 256: answers of
128-255 tokens; 512: 256-511). Per (sampler, answer length, cache, parallel rule: each of --thresholds, then each
of --factors; the parallel ones only with the caches of --parallel_caches where it is given), over the same records:
- seconds per answer: wall time of decoding them all in batches of --batch, after a warm-up call
  (compiling) per batch shape, / the number of records; generated tok/s = records x answer length /
  that time; speedup = the uncached, threshold-0 row's seconds / this row's (a * after the seconds: XLA compiled
  inside the timed loop, and they include it; JSON timed_compiles);
- passes/answer: forward passes per answer (whole-row passes in brackets, the rest ran cached slices);
- exact match (flowlm_jax.evaluate.exact_match) and token accuracy (reference tokens reproduced at
  their position, / reference length) against the reference answers, overall and (a second table) per task;
- agreement with the uncached sampler: answers identical to the cache=none, threshold-0 row's;
- exact vs uncached: exact answers won and lost against that row on the same records, and the change in points
  of exact match with its 95% interval (paired: only the records that changed count; Bonett-Price). --records
  heldout.jsonl of `scripts/build_assets.py --long-tasks-only --long-heldout-per-task N` gives more records than
  the 200 shipped ones, for a run trained on that build's train.jsonl (confirm.jsonl of --long-confirm-per-task: a
  third set, for a rule picked on the held-out one).
First, before any decoding (seconds), a probe of what the model learnt (--probe_ratios): per task and share
of the answer replaced by [MASK], the accuracy on the masked answer tokens ([EOS] padding not counted) with the
rows built as training built them. Copy and reverse near 1/26 with 5% masked mean the model does not read the
prompt (docs/fast-sampling-log.md, "Earlier runs, superseded"), and decoding cannot succeed. A second
table, the whole answer masked, by the token's index in the answer: where a positional skill (reverse's mirror
lookup) stops reaching. A third, the first k answer tokens shown (the reference's) and the rest masked, the state
a semi-autoregressive sampler is in after k columns: accuracy on the next 32 against the second table's column
for the same 32 (all masked): whether those states cost what the model predicts from an all-[MASK] answer.
Steps: --steps, 0 = the answer length (one token per step, Fast-dLLM's baseline); blocks of --block.
This is a script, not a module: flowlm_jax.evaluate and flowlm_jax.bench are both entry points, which no
package module may import.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from flowlm_jax import data, evaluate, likelihood, loading, sampling
from flowlm_jax.tokenizer import ASSETS_DIR

LONG_TEST_FILE = f"{ASSETS_DIR}/sft_tasks_long/test.jsonl"


def answer_bins(records: list[dict], reference_ids: list[list[int]], answers: list[int]) -> dict[int, list[int]]:
  """{answer length: indices of the records decoded at it}: the smallest length that holds answer + [EOS]."""
  bins = {a: [] for a in sorted(answers)}
  for i, ids in enumerate(reference_ids):
    slot = data.answer_slot(len(ids) + 1, answers)  # the answer and its [EOS]
    if slot is not None:
      bins[slot].append(i)
  return {a: idx for a, idx in bins.items() if idx}


def token_accuracy(records: list[dict], reference_ids: list[list[int]], answer_ids: list[list[int]]) -> dict[str, float]:
  """{task: accuracy, "overall": accuracy}, as evaluate.exact_match: the mean over records of the share of
  reference tokens reproduced at their position."""
  shares = [sum(a == b for a, b in zip(ref, got)) / len(ref) for ref, got in zip(reference_ids, answer_ids, strict=True)]
  return evaluate.mean_by_task(records, shares)


def predict_batched(predict, inputs, batch: int = 16) -> np.ndarray:
  """`predict` (token ids [B, L] -> predicted ids [B, L]) over all rows of `inputs`, in whole batches (the last
  one padded with repeated rows: one compiled shape)."""
  n = len(inputs)
  padded = np.concatenate([inputs, inputs[:(-n) % batch]])
  return np.concatenate([np.asarray(predict(padded[i:i + batch])) for i in range(0, n, batch)])[:n]


def predict_masked(predict, split: data.TokenizedSplit, ratio: float, vocab, rng, batch: int = 16):
  """(masked, predicted): each row's answer positions ([EOS] padding too, as in training) replaced by [MASK]
  with probability `ratio`, and `predict`'s ids for those rows."""
  masked = split.corruptible & (rng.random(split.tokens.shape) < ratio)
  return masked, predict_batched(predict, np.where(masked, vocab.mask_id, split.tokens), batch)


def answer_index(split: data.TokenizedSplit) -> np.ndarray:
  """[B, L]: each column's index within its row's answer (negative in the prompt)."""
  return np.arange(split.tokens.shape[1])[None, :] - split.corruptible.argmax(1)[:, None]


def accuracy_per_task(right, scored, tasks: list[str]) -> dict[str, float | None]:
  """{task: the share of its rows' `scored` tokens that are `right`} (None where none is scored)."""
  of_task = np.asarray(tasks)
  result = {}
  for task in dict.fromkeys(tasks):
    sel = scored & (of_task == task)[:, None]
    result[task] = float(right[sel].mean()) if sel.any() else None
  return result


def by_task(columns: dict) -> dict[str, dict]:
  """{column: {task: accuracy}} -> {task: {column: accuracy}} (the probe tables' layout)."""
  tasks = next(iter(columns.values()))
  return {task: {column: per_task[task] for column, per_task in columns.items()} for task in tasks}


def masked_accuracy(predict, split: data.TokenizedSplit, tasks: list[str], ratios: list[float], vocab,
                    seed: int = 0, batch: int = 16) -> dict[str, dict[float, float | None]]:
  """{task: {ratio: accuracy}}: `predict` scored on the masked answer tokens ([EOS] padding not counted) at
  each share `ratio` of the answer masked (predict_masked)."""
  rng = np.random.default_rng(seed)
  content = split.corruptible & (split.tokens != vocab.eos_id)
  columns = {}
  for ratio in ratios:
    masked, predicted = predict_masked(predict, split, ratio, vocab, rng, batch)
    columns[ratio] = accuracy_per_task(predicted == split.tokens, masked & content, tasks)
  return by_task(columns)


def accuracy_by_index(predict, split: data.TokenizedSplit, tasks: list[str], vocab, edges: list[int],
                      batch: int = 16) -> dict[str, dict[str, float | None]]:
  """{task: {"a-b": accuracy}}: the whole answer masked, accuracy on answer tokens whose index within the
  answer is in [a, b) (None where no answer reaches it). Where a positional skill stops working."""
  masked, predicted = predict_masked(predict, split, 1.0, vocab, np.random.default_rng(0), batch)
  index, scored = answer_index(split), masked & (split.tokens != vocab.eos_id)
  right = predicted == split.tokens
  return by_task({f"{a}-{b - 1}": accuracy_per_task(right, scored & (index >= a) & (index < b), tasks)
                  for a, b in zip(edges, edges[1:])})


def accuracy_after_prefix(predict, split: data.TokenizedSplit, tasks: list[str], vocab, shown: list[int],
                          block: int = 32, batch: int = 16) -> dict[str, dict[str, float | None]]:
  """{task: {"k shown": accuracy}}: the first k answer tokens shown (the reference's), the rest [MASK]ed, as
  when a semi-autoregressive sampler has finished k columns; accuracy on the next `block` answer tokens. Against
  accuracy_by_index's [k, k + block) column: whether the states the sampler visits cost what it predicts."""
  index, content = answer_index(split), split.tokens != vocab.eos_id
  columns = {}
  for k in shown:
    masked = split.corruptible & (index >= k)
    predicted = predict_batched(predict, np.where(masked, vocab.mask_id, split.tokens), batch)
    columns[f"{k} shown"] = accuracy_per_task(predicted == split.tokens, masked & content & (index < k + block), tasks)
  return by_task(columns)


PREFIX_BLOCK = 32  # the LLaDA sampler's block in the table (--block's default)
INDEX_EDGES = list(range(0, 513, PREFIX_BLOCK))  # by-index columns one block wide: the prefix table's ranges
PREFIX_SHOWN = list(range(0, 512, 2 * PREFIX_BLOCK))


def probe(run, records: list[dict], ratios: list[float]) -> dict[str, dict]:
  """{"masked_accuracy", "accuracy_by_index", "accuracy_after_prefix"} of `run` on `records`, in the run's own
  training rows ([PAD] keys unseen, as in training)."""
  split = evaluate.sft_rows(run, records)
  logits = lambda params, tokens: likelihood.model_logits_fn(run.graphdef, params, run.vocab.pad_id)(tokens)
  forward = jax.jit(lambda params, tokens: logits(params, tokens).argmax(-1))
  predict = lambda tokens: forward(run.params, tokens)
  tasks = [r["task"] for r in records]
  return {"masked_accuracy": masked_accuracy(predict, split, tasks, ratios, run.vocab),
          "accuracy_by_index": accuracy_by_index(predict, split, tasks, run.vocab, INDEX_EDGES),
          "accuracy_after_prefix": accuracy_after_prefix(predict, split, tasks, run.vocab, PREFIX_SHOWN, PREFIX_BLOCK)}


def format_probe(result: dict[str, dict]) -> str:
  """A task x column table of accuracies (columns: the inner dict's keys; a float key is a masked share)."""
  columns = next(iter(result.values()))
  name = lambda c: f"{c:.0%} masked" if isinstance(c, float) else c
  lines = ["| task | " + " | ".join(map(name, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
  lines += [f"| {task} | " + " | ".join("-" if acc is None else f"{acc:.3f}" for acc in by_column.values()) + " |"
            for task, by_column in result.items()]
  return "\n".join(lines)


_COMPILE_SECONDS: list[float] = []  # XLA compiles of this process since count_compiles started counting
_counting = False


def _on_compile(event: str, seconds: float, **_) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE_SECONDS.append(seconds)


def count_compiles() -> int:
  """XLA compiles so far (jax.monitoring's backend-compile event; counting starts at the first call)."""
  global _counting
  if not _counting:  # jax.monitoring keeps a listener for the life of the process: register it once
    jax.monitoring.register_event_duration_secs_listener(_on_compile)
    _counting = True
  return len(_COMPILE_SECONDS)


def decode_all(run, prompt_ids, icfg, mode: str, batch: int, bucket: int):
  """(seconds for all prompts after a warm-up call per batch shape, concatenated SampleOutput fields, XLA
  compiles inside the timed loop: 0 unless something recompiled, and then the seconds include them).

  Every call compiles the masked program (padded=True): a prompt that fills the bucket would otherwise
  compile the unmasked one inside the timed loop (it did: 13 s of the prefix row at 512 on 2026-11-29).
  The last batch of a count that is not a multiple of `batch` is smaller: another shape, compiled in the
  warm-up too (it was compiled inside every batch-32 row's timed loop on 2026-11-29).
  """
  chunks = [prompt_ids[i:i + batch] for i in range(0, len(prompt_ids), batch)]
  call = lambda chunk: sampling.generate(run.graphdef, run.params, chunk, run.vocab, icfg, mode=mode,
                                         prompt_bucket=bucket, padded=True)
  for chunk in {len(c): c for c in chunks}.values():  # compile: one call per batch shape
    call(chunk)
  compiles, t0 = count_compiles(), time.perf_counter()
  outs = [call(chunk) for chunk in chunks]  # host arrays: each call has finished
  seconds, compiles = time.perf_counter() - t0, count_compiles() - compiles
  fields = {name: np.concatenate([getattr(o, name) for o in outs]) for name in ("answer", "passes", "full_passes")}
  return seconds, fields, compiles


def measure(run, records: list[dict], args, on_row=lambda rows: None) -> list[dict]:
  """The table's rows; `on_row(rows so far)` after each (main saves them: a stopped run keeps what it measured)."""
  tok, vocab = run.tokenizer, run.vocab
  chat = run.config.dataset.prompt_format == "chat"
  prompt_ids = [sampling.encode_prompt(tok, r["prompt"], chat) for r in records]
  end_id = data.answer_end_id(tok, chat, vocab)  # where training rows end an answer
  reference_ids = [tok.encode(r["answer"], add_special_tokens=False) for r in records]
  rows = []
  for answer_length, idx in answer_bins(records, reference_ids, list(map(int, args.answers.split(",")))).items():
    bin_records = [records[i] for i in idx]
    bin_prompts = [prompt_ids[i] for i in idx]
    bucket = sampling.prompt_columns(bin_prompts)  # one prompt shape for every batch of the bin
    for mode in args.modes.split(","):
      baseline = None
      for cache, (threshold, factor) in settings(args):
        icfg = sampling.run_config(run.config.inference, answer_length=answer_length,
                                   steps=args.steps or answer_length, max_steps=args.steps or answer_length,
                                   block_length=min(args.block, answer_length), cache=cache,
                                   cache_refresh=args.cache_refresh, parallel_threshold=threshold,
                                   parallel_factor=factor)
        seconds, out, timed_compiles = decode_all(run, bin_prompts, icfg, mode, args.batch, bucket)
        if timed_compiles:
          print(f"warning: {timed_compiles} XLA compile(s) inside the timed loop of the next row: its seconds "
                "include them", flush=True)
        ids = [sampling.answer_ids(row, vocab, end_id) for row in out["answer"]]
        texts = sampling.decode_answers(tok, vocab, out["answer"], chat=chat)  # flowlm_jax.evaluate's exact match
        hits = np.array(evaluate.exact_hits(bin_records, texts))
        baseline = baseline or (seconds, out["answer"], hits)  # the first setting: cache none, threshold 0
        row = dict(mode=mode, answer=answer_length, cache=cache, threshold=threshold, factor=factor, records=len(idx),
                   batch=args.batch, steps=icfg.steps, seconds_per_answer=seconds / len(idx),
                   generated_tokens_per_s=len(idx) * answer_length / seconds, speedup=baseline[0] / seconds,
                   passes_per_answer=float(out["passes"].mean()), full_passes_per_answer=float(out["full_passes"].mean()),
                   timed_compiles=timed_compiles,
                   agreement=float(np.mean(np.all(out["answer"] == baseline[1], axis=1))),
                   exact_match_by_task=evaluate.mean_by_task(bin_records, hits),
                   token_accuracy_by_task=token_accuracy(bin_records, [reference_ids[i] for i in idx], ids),
                   **paired_change(baseline[2], hits))
        row["exact_match"] = row["exact_match_by_task"]["overall"]
        row["token_accuracy"] = row["token_accuracy_by_task"]["overall"]
        print(format_row(row), flush=True)
        rows.append(row)
        on_row(rows)
  return rows


def paired_change(base_hits: np.ndarray, hits: np.ndarray) -> dict:
  """Exact answers won and lost against the baseline on the same records, and the change in exact match with
  its 95% interval. The records are shared, so only the ones that changed count: far tighter than two separate
  rates. The interval is Bonett and Price's (2012) adjusted Wald for a paired difference: one more record won
  and one more lost, of n + 2, so that few or no changed records do not make it collapse onto the change."""
  n = len(hits)
  won, lost = int(np.sum(hits & ~base_hits)), int(np.sum(base_hits & ~hits))
  won_share, lost_share = (won + 1) / (n + 2), (lost + 1) / (n + 2)
  centre = won_share - lost_share
  half = 1.96 * np.sqrt((won_share + lost_share - centre ** 2) / (n + 2))
  return dict(exact_won=won, exact_lost=lost, exact_change=(won - lost) / n,
              exact_change_ci95=(max(centre - half, -1.0), min(centre + half, 1.0)))


def settings(args) -> list[tuple[str, tuple[float, float]]]:
  """(cache, parallel rule) of each row, in order: every cache of --caches with every rule, except that the
  parallel rules run only with --parallel_caches where it is given (one token per step runs with every cache)."""
  only = args.parallel_caches.split(",") if args.parallel_caches else None
  return [(cache, rule) for cache in args.caches.split(",") for rule in parallel_rules(args)
          if only is None or cache in only or not (rule[0] or rule[1])]


def parallel_rules(args) -> list[tuple[float, float]]:
  """(parallel_threshold, parallel_factor) of each setting: --thresholds first (the first is the baseline), then
  --factors (Fast-dLLM's factor rule, no threshold)."""
  return ([(float(t), 0.0) for t in args.thresholds.split(",")]
          + [(0.0, float(f)) for f in args.factors.split(",") if f])


def rule_name(r: dict) -> str:
  """The table's parallel-rule cell: the threshold (0 = one token per step), or "factor F"."""
  return f"factor {r['factor']:g}" if r.get("factor") else f"{r['threshold']:g}"


HEADER = ("| sampler | answer | cache | threshold | records | s/answer | generated tok/s | speedup | passes/answer "
          "(whole rows) | exact match | token accuracy | = uncached | exact vs uncached |\n" + "|---" * 13 + "|")


def format_row(r: dict) -> str:
  return (f"| {r['mode']} | {r['answer']} | {r['cache']} | {rule_name(r)} | {r['records']} | "
          f"{r['seconds_per_answer']:.3f}{'*' if r.get('timed_compiles') else ''} | "
          f"{r['generated_tokens_per_s']:,.0f} | {r['speedup']:.2f} | "
          f"{r['passes_per_answer']:.1f} ({r['full_passes_per_answer']:.1f}) | {r['exact_match']:.3f} | "
          f"{r['token_accuracy']:.3f} | {r['agreement']:.3f} | {format_change(r)} |")


def format_change(r: dict) -> str:
  """"+won -lost: change [95% interval]" in points of exact match against the baseline row."""
  low, high = r["exact_change_ci95"]
  return f"+{r['exact_won']} -{r['exact_lost']}: {100 * r['exact_change']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def format_by_task(rows: list[dict]) -> str:
  """Token accuracy (exact match) per task for each setting: which skills a cache or threshold costs."""
  tasks = sorted({t for r in rows for t in r["token_accuracy_by_task"] if t != "overall"})
  lines = ["| sampler | answer | cache | threshold | " + " | ".join(tasks) + " |", "|---" * (4 + len(tasks)) + "|"]
  for r in rows:
    cells = [f"{r['token_accuracy_by_task'][t]:.3f} ({r['exact_match_by_task'][t]:.2f})"
             if t in r["token_accuracy_by_task"] else "-" for t in tasks]
    lines.append(f"| {r['mode']} | {r['answer']} | {r['cache']} | {rule_name(r)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained run (or exported directory)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--records", default=LONG_TEST_FILE)
  p.add_argument("--limit", type=int, default=0, help="records per task (0 = all)")
  p.add_argument("--answers", default="256,512", help="answer lengths (bins), comma list")
  p.add_argument("--caches", default="none,prefix,dual", help="comma list; the first is the baseline")
  p.add_argument("--thresholds", default="0,0.9", help="parallel thresholds, comma list; the first is the baseline")
  p.add_argument("--factors", default="",
                 help="parallel_factor values (Fast-dLLM's factor rule), comma list; rows after the thresholds'")
  p.add_argument("--parallel_caches", default="",
                 help="caches the parallel rules run with, comma list (default: every one of --caches)")
  p.add_argument("--modes", default="llada", help="samplers, comma list of llada,flowlm")
  p.add_argument("--steps", type=int, default=0, help="0 = the answer length (one token per step)")
  p.add_argument("--block", type=int, default=32, help="LLaDA block length")
  p.add_argument("--cache_refresh", type=int, default=0,
                 help="also refresh a cache every this many steps (0: LLaDA at each block's first step, FlowLM every 8)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--probe_ratios", default="0.05,0.3,0.6,0.9,1.0",
                 help="shares of the answer masked for the probe, comma list ('' = no probe)")
  p.add_argument("--probe_only", action="store_true", help="print and save the probe, decode nothing")
  p.add_argument("--out", default="fast_sampling.json")
  args = p.parse_args(argv)
  if args.parallel_caches:  # the first row is the baseline: it must stay the first cache's one token per step
    unknown = set(args.parallel_caches.split(",")) - set(args.caches.split(","))
    if unknown:
      p.error(f"--parallel_caches: {', '.join(sorted(unknown))} not in --caches {args.caches}")
    if float(args.thresholds.split(",")[0]) != 0:
      p.error(f"--parallel_caches needs --thresholds to start with 0 (the baseline row), got {args.thresholds}")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  run = loading.load(args.workdir, step=args.step)
  records = evaluate.load_records(args.records, args.limit)
  print(f"{args.workdir} step {run.step}; {len(records)} records; {time.strftime('%Y-%m-%d')}", flush=True)
  report = {"workdir": args.workdir, "step": run.step, "args": vars(args), "date": time.strftime("%Y-%m-%d"),
            "partial": True}

  def save(**fields):  # whole or not at all: a run stopped while writing keeps the previous file
    report.update(fields)
    with open(args.out + ".partial", "w") as f:
      json.dump(report, f, indent=1)
    os.replace(args.out + ".partial", args.out)

  if args.probe_ratios:
    report.update(probe(run, records, [float(r) for r in args.probe_ratios.split(",")]))
    print("accuracy on masked answer tokens, the rest of the row in view:\n" + format_probe(report["masked_accuracy"]),
          flush=True)
    print("the whole answer masked, accuracy by the token's index in the answer:\n"
          + format_probe(report["accuracy_by_index"]), flush=True)
    print(f"the first k answer tokens shown, the rest masked (a semi-autoregressive state): accuracy on the next "
          f"{PREFIX_BLOCK}, against the column k-{{k + {PREFIX_BLOCK - 1}}} above:\n"
          + format_probe(report["accuracy_after_prefix"]), flush=True)
  save(partial=not args.probe_only)
  if args.probe_only:
    return []
  print(HEADER, flush=True)
  rows = measure(run, records, args, on_row=lambda rows: save(rows=rows))
  print("token accuracy (exact match) per task:\n" + format_by_task(rows), flush=True)
  save(rows=rows, partial=False)
  return rows


if __name__ == "__main__":
  main()
