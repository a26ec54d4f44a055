"""Trained runs side by side: `python -m flowlm_jax.compare W1 W2 [...] --out DIR`.

Every workdir is evaluated under one budget (`Budget`: the same rows, step counts, seeds and Monte-Carlo
draws for all; docs/evaluation.md says what each figure means):
  1. likelihood bounds on the run's validation rows: the masked-diffusion ELBO, the ELBO of FlowLM's
     mixed [MASK] + uniform noise, and the T-step bound at each step count (likelihood.py); on the SFT
     tasks also multiple choice by conditional likelihood (LLaDA Alg. 3);
  2. exact match on the SFT tasks against the number of steps, for LLaDA decoding and FlowLM decoding
     with each replacement strategy, over sampler seeds;
  3. self-correction: FlowLM decoding from answers corrupted with random tokens.
DIR gets report.md (tables and figures), report.json (every number, per run and per label) and PNGs.
Runs given the same label (`--labels`) are pooled as seeds of one configuration: mean and spread over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys

from flowlm_jax import evaluate, plot
from flowlm_jax.logging import metrics_path, read_metrics
from flowlm_jax.sampling import STRATEGIES

TASKS_DATASET = "embedded:sft_tasks"


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every run is evaluated on and with (the same for all, so the numbers compare)."""
  steps: tuple[int, ...] = (4, 8, 16, 32, 64)  # decoding steps (= model evaluations) and T of the T-step bound
  seeds: tuple[int, ...] = (0, 1, 2)  # sampler and corruption seeds (greedy decoding uses the first only)
  rates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)  # self-correction: share of answer tokens made wrong
  limit_per_task: int = 0     # SFT task records per task (0 = all)
  bound_rows: int = 0         # validation records for the likelihood bounds (0 = all; text is packed into rows)
  draws: int = 8              # Monte-Carlo draws per sequence for each bound
  form: str = "time"          # the masked-diffusion bound's estimator: "time" (1/t) | "count" (N/l, lower variance)
  choices: int = 4            # multiple choice: candidates per question
  choice_draws: int = 16      # draws per candidate of the conditional likelihood
  refine_steps: int = 16      # self-correction: FlowLM decoding steps
  strategies: tuple[str, ...] = STRATEGIES  # self-correction: FlowLM replacement strategies, each measured
  batch_size: int = 128
  seed: int = 0               # likelihood draws

  def __post_init__(self):
    if not self.steps or min(self.steps) < 1 or not self.seeds:
      raise ValueError("compare: need step counts >= 1 and at least one seed")
    for name in ("steps", "seeds", "rates"):  # a repeat would be counted twice in one table and once in another
      values = getattr(self, name)
      if len(set(values)) != len(values):
        raise ValueError(f"compare: --{name} repeats a value: {','.join(map(str, values))}")
    for name, least in (("draws", 1), ("choice_draws", 1), ("batch_size", 1), ("refine_steps", 1), ("choices", 2),
                        ("limit_per_task", 0), ("bound_rows", 0)):
      if getattr(self, name) < least:
        raise ValueError(f"compare: --{name} must be >= {least}, got {getattr(self, name)}")
    if not self.strategies or set(self.strategies) - set(STRATEGIES):
      raise ValueError(f"compare: strategies must be some of {', '.join(STRATEGIES)}, got {self.strategies}")
    if not all(0 < r < 1 for r in self.rates):
      raise ValueError(f"compare: corruption rates must lie in (0, 1), got {self.rates}")


def greedy(icfg) -> bool:
  """Whether both samplers are deterministic under `icfg`: then every seed gives the same answers."""
  return icfg.temperature == 0 and icfg.remasking == "low_confidence" and icfg.initial_answer == "mask"


def has_tasks(run, records_path: str | None) -> bool:
  return bool(records_path) or run.config.dataset.name == TASKS_DATASET


def masking_label(m) -> str:
  """The report's masking cell: the strategy, and the share of rows that take a second one (masking.mix_*)."""
  mix_prob = m.get("mix_prob", 0.0)
  return f"{m.strategy} + {mix_prob:g} {m.mix_strategy}" if mix_prob > 0 else m.strategy


def evaluate_run(run, budget: Budget, records: list[dict] | None) -> dict:
  """Items 1-3 for one loaded run (`loading.LoadedRun`); the SFT-task parts need `records`."""
  from flowlm_jax import likelihood

  rows = evaluate.validation_rows(run, budget.bound_rows)
  specs = {"mask": likelihood.BoundSpec(draws=budget.draws, form=budget.form),
           "mixed": likelihood.BoundSpec(figure="mixed", draws=budget.draws),
           **{f"steps/{n}": likelihood.BoundSpec(draws=budget.draws, steps=n) for n in budget.steps}}
  t, m = run.config.training, run.config.masking
  result = {"step": run.step, "loss": t.loss, "loss_weighting": t.loss_weighting, "masking": masking_label(m),
            "bounds": evaluate.bounds(run, rows.tokens, rows.corruptible, specs, batch_size=budget.batch_size,
                                      seed=budget.seed)}
  if records is None:
    return result
  seeds = budget.seeds[:1] if greedy(run.config.inference) else budget.seeds
  result["sampler_seeds"] = list(seeds)
  result["multiple_choice"] = {
      d: evaluate.multiple_choice(run, records, choices=budget.choices, distractors=d, draws=budget.choice_draws,
                                  seed=budget.seed, batch_size=budget.batch_size)["accuracy"]
      for d in ("same_task", "other_tasks")}
  result["quality"] = evaluate.quality_vs_steps(run, records, budget.steps, seeds, batch_size=budget.batch_size)
  result["self_correction"] = {
      strategy: {str(seed): evaluate.self_correction(run, records, budget.rates, steps=budget.refine_steps, seed=seed,
                                                     batch_size=budget.batch_size, replacement_strategy=strategy)
                 for seed in budget.seeds}
      for strategy in budget.strategies}
  return result


# --- pooling runs that share a label -----------------------------------------------------------


def pool(results: list[dict]) -> dict:
  """Mean and spread over runs of one label: bounds over runs, exact match over runs x sampler seeds,
  self-correction over runs x corruption seeds, multiple choice over runs."""
  out = {"runs": len(results), "bounds": {name: bound_stats([r["bounds"][name] for r in results])
                                          for name in results[0]["bounds"]}}
  masks = [r["bounds"]["mask"] for r in results]  # the [MASK] ELBO in the other units, where a run has them
  for unit in ("bits_per_byte", "perplexity"):
    values = [m.get(unit) for m in masks]
    out[unit] = evaluate.spread(values) if None not in values else None
  if all("quality" in r for r in results):
    first = results[0]
    out["multiple_choice"] = {d: evaluate.spread([r["multiple_choice"][d]["overall"] for r in results])
                              for d in first["multiple_choice"]}
    out["quality"] = {decoder: {n: evaluate.spread([a for r in results for a in r["quality"][decoder][n]["overall"]])
                                for n in by_steps}
                      for decoder, by_steps in first["quality"].items()}
    out["self_correction"] = {
        strategy: {rate: {key: evaluate.spread([s[rate][key] for r in results
                                                for s in r["self_correction"][strategy].values()
                                                if s[rate][key] is not None])
                          for key in ("fixed", "broken", "exact_match", "exact_match_before")}
                   for rate in next(iter(by_seed.values()))}
        for strategy, by_seed in first["self_correction"].items()}
  return out


def bound_stats(bounds: list[dict]) -> dict:
  """`evaluate.spread` of nats/token over runs, with "error": the spread over runs, or for one run its
  standard error over sequences."""
  stats = evaluate.spread([b["nats_per_token"] for b in bounds])
  return {**stats, "error": stats["std"] if len(bounds) > 1 else bounds[0]["nats_per_token_se"]}


# --- report ------------------------------------------------------------------------------------


def _pm(stats: dict | None, digits: int = 3) -> str:
  """"mean ± std (n=k)" over pooled values; one value alone, or "value ± standard error" for one run's bound."""
  if stats is None or not stats.get("n"):
    return "n/a"
  if stats["n"] > 1:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} (n={stats['n']})"
  return f"{stats['mean']:.{digits}f}" + (f" ± {stats['error']:.{digits}f}" if "error" in stats else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_figures(report: dict, out: str, workdirs: list[str], labels: list[str]) -> list[str]:
  groups = report["groups"]
  written = []
  runs = {}
  apart = dict(zip(workdirs, plot.default_labels(workdirs)))  # names that tell pooled runs apart (s0/w, s1/w)
  for label, workdir in zip(labels, workdirs):  # training curves: every run, labelled apart if pooled
    name = label if labels.count(label) == 1 else f"{label} ({apart[workdir]})"
    runs[name] = read_metrics(workdir)
  written.append(plot.save(plot.compare_loss_figure(runs), os.path.join(out, "training_curves.png")))
  bounds = {label: {int(k.split("/")[1]): g["bounds"][k] for k in g["bounds"] if k.startswith("steps/")}
            for label, g in groups.items()}
  continuous = {label: g["bounds"]["mask"] for label, g in groups.items()}
  written.append(plot.save(plot.bound_vs_steps_figure(bounds, continuous), os.path.join(out, "bound_vs_steps.png")))
  with_tasks = {label: g for label, g in groups.items() if "quality" in g}
  if with_tasks:
    decoders = next(iter(with_tasks.values()))["quality"]
    curves = {d: {label: {int(n): s for n, s in g["quality"][d].items()} for label, g in with_tasks.items()}
              for d in decoders}
    written.append(plot.save(plot.quality_vs_steps_figure(curves), os.path.join(out, "quality_vs_steps.png")))
    strategies = next(iter(with_tasks.values()))["self_correction"]
    sc = {strategy: {label: {rate: {k: v["mean"] if v["n"] else None for k, v in by_key.items()}
                             for rate, by_key in g["self_correction"].get(strategy, {}).items()}
                     for label, g in with_tasks.items()}
          for strategy in strategies}
    written.append(plot.save(plot.self_correction_figure(sc), os.path.join(out, "self_correction.png")))
  return written


def report_markdown(report: dict) -> str:
  runs, groups, budget = report["runs"], report["groups"], report["budget"]
  lines = [f"# Comparison report: {' vs '.join(groups)}", "",
           f"{report['date']}, `{report['command']}`", "",
           "Budget (the same for every run): " + ", ".join(f"{k}={v}" for k, v in budget.items()), "",
           "## Runs", ""]
  lines += _table(["label", "workdir", "checkpoint step", "training.loss", "loss_weighting", "masking"],
                  [[r["label"], r["workdir"], str(r["step"]), r["loss"], r["loss_weighting"], r["masking"]]
                   for r in runs])
  first = runs[0]["bounds"]["mask"]
  lines += ["", "## Likelihood bounds", "",
            f"Upper bounds on the NLL of the validation rows ({first['sequences']} sequences, {first['tokens']} "
            f"counted tokens, {budget['draws']} draws each); ± is the standard error over sequences for one run, "
            "the spread over runs for a pooled label. Lower is better.", ""]
  rows = []
  for label, g in groups.items():
    rows.append([label, _pm(g["bounds"]["mask"]), _pm(g.get("bits_per_byte")), _pm(g.get("perplexity")),
                 _pm(g["bounds"]["mixed"])])
  lines += _table(["label", "[MASK] ELBO (nats/token)", "bits/byte", "perplexity bound",
                   "mixed-noise ELBO (nats/token)"], rows)
  steps = [k.split("/")[1] for k in first_keys(groups, "bounds") if k.startswith("steps/")]
  lines += ["", "T-step bound (nats/token; bounds the NLL of a T-step random-order unmasking sampler):", ""]
  lines += _table(["label", *[f"T={n}" for n in steps]],
                  [[label, *[_pm(g["bounds"][f"steps/{n}"]) for n in steps]] for label, g in groups.items()])
  lines += ["", "![bound against steps](bound_vs_steps.png)", ""]
  with_tasks = {label: g for label, g in groups.items() if "quality" in g}
  if with_tasks:
    lines += ["## Multiple choice by conditional likelihood", "",
              f"{budget['choices']} candidates per task prompt, scored by LLaDA's conditional likelihood "
              f"(Alg. 3, {budget['choice_draws']} draws); chance = {1 / budget['choices']:.2f}.", ""]
    lines += _table(["label", "distractors from the same task", "distractors from other tasks"],
                    [[label, _pm(g["multiple_choice"]["same_task"]), _pm(g["multiple_choice"]["other_tasks"])]
                     for label, g in with_tasks.items()])
    lines += ["", "## Exact match against steps", "",
              "Overall exact match on the SFT tasks, mean ± std over runs x sampler seeds (greedy decoding is "
              "deterministic: one seed).", ""]
    for decoder in next(iter(with_tasks.values()))["quality"]:
      lines += [f"**{decoder} decoding**", ""]
      lines += _table(["label", *[f"{n} steps" for n in budget["steps"]]],
                      [[label, *[_pm(g["quality"][decoder][str(n)]) for n in budget["steps"]]]
                       for label, g in with_tasks.items()])
      lines.append("")
    lines += ["![quality against steps](quality_vs_steps.png)", "", "## Self-correction", "",
              f"Answers with a share of their tokens replaced by random ones (no [MASK]), refined by FlowLM decoding "
              f"for {budget['refine_steps']} steps with each replacement strategy; mean over runs x corruption "
              "seeds.", ""]
    rows = [[label, strategy, f"{float(rate):.0%}", *[_pm(s[k]) for k in ("fixed", "broken", "exact_match",
                                                                          "exact_match_before")]]
            for label, g in with_tasks.items() for strategy, by_rate in g["self_correction"].items()
            for rate, s in by_rate.items()]
    lines += _table(["label", "strategy", "rate", "wrong tokens fixed", "right tokens changed", "exact match after",
                     "exact match before"], rows)
    lines += ["", "![self-correction](self_correction.png)", ""]
  lines += ["## Training", "", "![training curves](training_curves.png)", ""]
  return "\n".join(lines)


def first_keys(groups: dict, section: str) -> list[str]:
  return list(next(iter(groups.values()))[section])


def compare(workdirs: list[str], out: str, labels: list[str] | None = None, budget: Budget = Budget(),
            records_path: str | None = None, command: str = "") -> dict:
  """Evaluates every workdir under `budget`, writes report.md, report.json and the PNGs into `out`."""
  from flowlm_jax import loading

  labels = list(labels) if labels else plot.default_labels(workdirs)
  if len(labels) != len(workdirs):
    raise ValueError(f"compare: {len(labels)} labels for {len(workdirs)} workdirs")
  # Before any evaluation: a typo must not cost the first run's whole evaluation.
  missing = [w for w in workdirs if not os.path.isfile(metrics_path(w))]
  if missing:
    raise FileNotFoundError(f"compare: no metrics.jsonl in {', '.join(missing)}")
  real = [os.path.realpath(w) for w in workdirs]
  twice = sorted({w for w, r in zip(workdirs, real) if real.count(r) > 1})
  if twice:
    raise ValueError(f"compare: {', '.join(twice)} given twice: it would be pooled as two training runs")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"compare: --out {out} is a file, not a folder")
  records = evaluate.load_records(records_path or evaluate.TEST_FILE, budget.limit_per_task)
  for distractors in ("same_task", "other_tasks"):  # every record has the candidates multiple choice needs
    evaluate.choice_candidates(records, budget.choices, distractors)
  runs = []
  for label, workdir in zip(labels, workdirs):
    run = loading.load(workdir)
    print(f"evaluating {label}: {workdir} (step {run.step})", flush=True)
    runs.append({"label": label, "workdir": workdir,
                 **evaluate_run(run, budget, records if has_tasks(run, records_path) else None)})
  groups = {label: pool([r for r in runs if r["label"] == label]) for label in dict.fromkeys(labels)}
  report = {"date": datetime.date.today().isoformat(), "command": command, "budget": dataclasses.asdict(budget),
            "runs": runs, "groups": groups}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  write_figures(report, out, workdirs, labels)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(report_markdown(report))
  return report


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
  from flowlm_jax import cli
  cli.quiet_libraries()  # before transformers loads: no irrelevant banner
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.compare", description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", help="run directories (checkpoints/ and metrics.jsonl)")
  p.add_argument("--out", required=True, help="folder for report.md, report.json and the figures")
  p.add_argument("--labels", default=None, help="comma-separated labels; repeated labels pool runs as seeds")
  p.add_argument("--records", default=None, help="SFT task records (.jsonl); default: the embedded test set, "
                                                 "for runs trained on it")
  defaults = Budget()
  p.add_argument("--steps", type=_ints, default=defaults.steps, help="comma-separated step counts")
  p.add_argument("--seeds", type=_ints, default=defaults.seeds, help="comma-separated sampler/corruption seeds")
  p.add_argument("--rates", type=_floats, default=defaults.rates, help="comma-separated corruption rates")
  p.add_argument("--strategies", type=_strs, default=defaults.strategies,
                 help="comma-separated FlowLM replacement strategies for self-correction")
  for field in ("limit_per_task", "bound_rows", "draws", "choices", "choice_draws", "refine_steps", "batch_size",
                "seed"):
    p.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
  p.add_argument("--form", choices=("time", "count"), default=defaults.form)
  args = p.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  try:
    budget = Budget(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)})
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    command = "python -m flowlm_jax.compare " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    compare(args.workdirs, args.out, labels, budget, args.records, command)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(os.path.join(args.out, "report.md"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
