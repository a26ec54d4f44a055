"""PNG figures from `metrics.jsonl`: `python -m flowlm_jax.plot W [W2 ...] --out plots/`.

Per run (files prefixed with the run's label, by default the workdir's name):
  `<label>_loss.png`               training objective and validation loss; cross-entropy per corrupted token
  `<label>_accuracy_by_ratio.png`  accuracy by corruption-ratio bucket, over steps and at the last evaluation
  `<label>_mask_vs_random.png`     accuracy on [MASK] positions vs randomly replaced positions
With two or more runs, also:
  `compare_loss.png`               runs overlaid: cross-entropy per corrupted token (train, validation), accuracy
  `compare_accuracy.png`           the last evaluation's accuracies side by side, by ratio bucket and by corruption kind
`python -m flowlm_jax.compare` draws its report's figures with `quality_vs_steps_figure`,
`bound_vs_steps_figure` and `self_correction_figure`.

The `loss` of a LLaDA run is 1/t-weighted and the `loss` of a FlowLM run is not, so the overlays use
`nll_corrupted` (plain cross-entropy per corrupted token), which means the same thing for both.

In a notebook, the `*_figure` functions return matplotlib `Figure`s (made without pyplot, rendered with
Agg), e.g. `plot.loss_figure({"run": plot.read_metrics(workdir)})`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Iterable, Sequence

from flowlm_jax.logging import Rows, read_metrics, series

RATIO_BUCKETS = (
    ("ratio_le_0.25", "≤ 0.25"),
    ("ratio_0.25_to_0.5", "0.25–0.5"),
    ("ratio_0.5_to_0.75", "0.5–0.75"),
    ("ratio_gt_0.75", "> 0.75"),
)
KINDS = (("mask", "[MASK]"), ("random", "random-replaced"))

# --- reading (the readers live beside the writer, flowlm_jax/logging.py) -------------------------


def last_value(rows: Rows, key: str) -> float | None:
  _, values = series(rows, key)
  return values[-1] if values else None


def read_run_config(workdir: str) -> dict:
  """The run's `config.yaml` as a dict ({} when absent, e.g. a bare metrics file)."""
  path = os.path.join(workdir, "config.yaml")
  if not os.path.isfile(path):
    return {}
  import yaml
  with open(path) as f:
    return yaml.safe_load(f) or {}


def default_labels(workdirs: Sequence[str]) -> list[str]:
  """Each workdir's name; parent folders are added until the labels are unique."""
  parts = [os.path.abspath(w.removesuffix("/metrics.jsonl")).split(os.sep) for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    labels = ["/".join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  return [f"{label} ({i})" for i, label in enumerate(labels)]


# --- figures ----------------------------------------------------------------------------------


def _figure(ncols: int, width: float = 5.2, height: float = 3.8):
  fig, axes = _grid(1, ncols, width, height)
  return fig, axes[0]


def _grid(nrows: int, ncols: int, width: float = 5.2, height: float = 3.8):
  """A figure with nrows x ncols panels of width x height inches: (fig, [[ax per column] per row])."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, [list(row) for row in fig.subplots(nrows, ncols, squeeze=False)]


def _color(i: int) -> str:
  return f"C{i % 10}"


def ema(values: Sequence[float], span: int) -> list[float]:
  """Exponential moving average; a non-finite value (a skipped step of a file written before they were logged
  as null) is passed over, not carried into every later point."""
  alpha, out, acc = 2.0 / (span + 1), [], None
  for v in values:
    if math.isfinite(v):
      acc = v if acc is None else alpha * v + (1 - alpha) * acc
    out.append(acc if acc is not None else v)
  return out


def _train_line(ax, steps, values, color, label):
  """Raw training values, with a smoothed line on top when there are many of them."""
  if not steps:
    return
  if len(steps) >= 20:
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
    ax.plot(steps, ema(values, max(5, len(steps) // 20)), color=color, linewidth=1.8, label=f"{label} (smoothed)")
  else:
    ax.plot(steps, values, color=color, linewidth=1.5, marker="." if len(steps) < 50 else None, label=label)


def _eval_line(ax, steps, values, color, label):
  if steps:
    ax.plot(steps, values, color=color, linestyle="--", marker="s", markersize=6, markeredgecolor="white",
            linewidth=1.5, label=label)


def _finish(ax, title: str, ylabel: str, *, legend: bool = True):
  ax.set_title(title, fontsize=11)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


def _empty(ax, title: str, message: str):
  ax.set_title(title, fontsize=11)
  ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
  ax.set_xticks([])
  ax.set_yticks([])


def _objective(config: dict) -> str:
  loss = (config.get("training") or {}).get("loss")
  strategy = (config.get("masking") or {}).get("strategy")
  parts = [f"loss={loss}" if loss else "", f"masking={strategy}" if strategy else ""]
  return ", ".join(p for p in parts if p)


def loss_figure(rows: Rows, label: str, config: dict | None = None):
  """Training objective + validation loss (left); cross-entropy per corrupted token (right)."""
  fig, (left, right) = _figure(2)
  _train_line(left, *series(rows, "loss"), _color(0), "train loss")
  _eval_line(left, *series(rows, "eval_loss"), _color(1), "validation loss")
  _finish(left, "objective", "loss")
  if series(rows, "nll_corrupted")[0] or series(rows, "eval_nll_corrupted")[0]:
    _train_line(right, *series(rows, "nll_corrupted"), _color(0), "train")
    _eval_line(right, *series(rows, "eval_nll_corrupted"), _color(1), "validation")
    _finish(right, "cross-entropy per corrupted token", "nats / token")
  else:
    _empty(right, "cross-entropy per corrupted token", "no nll_corrupted in metrics.jsonl")
  objective = _objective(config or {})
  fig.suptitle(f"{label}: loss" + (f"  ({objective})" if objective else ""), fontsize=12)
  return fig


def accuracy_by_ratio_figure(rows: Rows, label: str):
  """Accuracy on corrupted tokens by the sequence's corruption-ratio bucket: training (over steps) and the
  last evaluation."""
  fig, (left, right) = _figure(2)
  any_train = False
  for i, (key, name) in enumerate(RATIO_BUCKETS):
    steps, values = series(rows, f"accuracy_{key}")
    any_train |= bool(steps)
    _train_line(left, steps, values, _color(i), f"ratio {name}")
  if any_train:
    _finish(left, "training accuracy by corruption ratio", "accuracy")
  else:
    _empty(left, "training accuracy by corruption ratio", "no accuracy_ratio_* metrics")
  eval_values = [last_value(rows, f"eval_accuracy_{key}") for key, _ in RATIO_BUCKETS]
  if any(v is not None for v in eval_values):
    eval_step = series(rows, "eval_loss")[0][-1:] or series(rows, f"eval_accuracy_{RATIO_BUCKETS[0][0]}")[0][-1:]
    _bars(right, [name for _, name in RATIO_BUCKETS], {"validation": eval_values}, [_color(1)])
    train_values = [last_value(rows, f"accuracy_{key}") for key, _ in RATIO_BUCKETS]
    overall = last_value(rows, "eval_accuracy")
    if overall is not None:
      right.axhline(overall, color="0.3", linestyle="--", linewidth=1, label=f"all corrupted: {overall:.3f}")
    if any(v is not None for v in train_values):
      xs = range(len(train_values))
      right.scatter([x for x, v in zip(xs, train_values) if v is not None], [v for v in train_values if v is not None],
                    color=_color(0), marker="D", s=22, zorder=3, label="train (last logged)")
    right.set_xlabel("corruption ratio of the sequence")
    right.set_ylabel("accuracy")
    right.set_title(f"last evaluation (step {eval_step[0]})" if eval_step else "last evaluation", fontsize=11)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(fontsize=8)
  else:
    _empty(right, "last evaluation", "no eval_accuracy_ratio_* metrics")
  fig.suptitle(f"{label}: accuracy on corrupted tokens by corruption ratio", fontsize=12)
  return fig


def mask_vs_random_figure(rows: Rows, label: str):
  """Accuracy at [MASK] positions vs positions replaced by a random token (training and validation)."""
  fig, (ax,) = _figure(1, width=6.5, height=4.0)
  found = False
  for i, (key, name) in enumerate(KINDS):
    train = series(rows, f"accuracy_{key}")
    evals = series(rows, f"eval_accuracy_{key}")
    found |= bool(train[0] or evals[0])
    _train_line(ax, *train, _color(i), f"{name} (train)")
    _eval_line(ax, *evals, _color(i), f"{name} (validation)")
  if not found:
    _empty(ax, f"{label}: [MASK] vs random-replaced accuracy", "no accuracy_mask / accuracy_random metrics")
    return fig
  missing = [name for key, name in KINDS if not series(rows, f"accuracy_{key}")[0]
             and not series(rows, f"eval_accuracy_{key}")[0]]
  if missing:
    ax.text(0.99, 0.02, f"no {', '.join(missing)} positions in this run's corruption", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=8, color="0.4")
  _finish(ax, f"{label}: [MASK] vs random-replaced accuracy", "accuracy")
  return fig


def _bars(ax, groups: Sequence[str], values: dict[str, Sequence[float | None]], colors: Sequence[str]):
  """Grouped bars: one group per entry of `groups`, one bar per key of `values`; None = no bar."""
  n = max(len(values), 1)
  width = 0.8 / n
  top = max([v for vals in values.values() for v in vals if v is not None] or [1.0])
  for j, (name, vals) in enumerate(values.items()):
    xs = [g + (j - (n - 1) / 2) * width for g in range(len(groups))]
    heights = [v if v is not None else 0.0 for v in vals]
    bars = ax.bar(xs, heights, width=width * 0.95, color=colors[j], label=name)
    for bar, v in zip(bars, vals):  # three digits: two print 0.004 as 0.00 and 0.995 as 1.00
      ax.annotate(f"{v:.3f}" if v is not None else "n/a", (bar.get_x() + bar.get_width() / 2, v or 0.0),
                  ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points",
                  rotation=90 if n >= 3 else 0,  # side by side, three or more labels would overlap
                  color="black" if v is not None else "0.5")
  ax.set_xticks(range(len(groups)))
  ax.set_xticklabels(groups)
  ax.set_ylim(0, top * (1.3 if n >= 3 else 1.18) if top > 0 else 1.0)


def _runs_title(runs) -> str:
  """"runs compared: a vs b", or the count where the names would run off the figure (the legend names them)."""
  names = " vs ".join(runs)
  return f"runs compared: {names}" if len(names) <= 100 else f"{len(runs)} runs compared (legend)"


def compare_loss_figure(runs: dict[str, Rows]):
  """Runs overlaid: training and validation cross-entropy per corrupted token, and validation accuracy."""
  fig, (train_ax, eval_ax, acc_ax) = _figure(3, width=4.8)
  for i, (label, rows) in enumerate(runs.items()):
    key = "nll_corrupted" if series(rows, "nll_corrupted")[0] else "loss"
    _train_line(train_ax, *series(rows, key), _color(i), label if key == "nll_corrupted" else f"{label} (loss)")
    eval_key = "eval_nll_corrupted" if series(rows, "eval_nll_corrupted")[0] else "eval_loss"
    _eval_line(eval_ax, *series(rows, eval_key), _color(i), label if eval_key == "eval_nll_corrupted"
               else f"{label} (eval_loss)")
    _eval_line(acc_ax, *series(rows, "eval_accuracy"), _color(i), label)
  _finish(train_ax, "train: cross-entropy per corrupted token", "nats / token")
  _finish(eval_ax, "validation: cross-entropy per corrupted token", "nats / token")
  _finish(acc_ax, "validation: accuracy on corrupted tokens", "accuracy")
  fig.suptitle(_runs_title(runs), fontsize=12)
  return fig


def compare_accuracy_figure(runs: dict[str, Rows]):
  """The last evaluation of each run side by side: by ratio bucket, and [MASK] vs random-replaced."""
  fig, (ratio_ax, kind_ax) = _figure(2, width=6.0)
  colors = [_color(i) for i in range(len(runs))]
  _bars(ratio_ax, [name for _, name in RATIO_BUCKETS],
        {label: [last_value(rows, f"eval_accuracy_{key}") for key, _ in RATIO_BUCKETS] for label, rows in runs.items()},
        colors)
  ratio_ax.set_title("validation accuracy by corruption ratio (last evaluation)", fontsize=11)
  ratio_ax.set_xlabel("corruption ratio of the sequence")
  _bars(kind_ax, [name for _, name in KINDS],
        {label: [last_value(rows, f"eval_accuracy_{key}") for key, _ in KINDS] for label, rows in runs.items()}, colors)
  kind_ax.set_title("validation accuracy: [MASK] vs random-replaced", fontsize=11)
  for ax in (ratio_ax, kind_ax):
    ax.set_ylabel("accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(_runs_title(runs), fontsize=12)
  return fig


# --- comparison report figures (python -m flowlm_jax.compare) -----------------------------------


def _line_with_spread(ax, xs, stats, color, label):
  """Mean with an error bar per x; `stats` are {"mean", "std"} dicts, whose "error" (when present) replaces
  the std as the bar; None: no point. The x axis is log 2 with the given values as ticks."""
  points = [(x, s) for x, s in zip(xs, stats) if s is not None]
  if points:
    ax.errorbar([x for x, _ in points], [s["mean"] for _, s in points],
                yerr=[s.get("error", s["std"]) for _, s in points],
                color=color, marker="o", markersize=4, capsize=3, linewidth=1.5, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(xs), [str(x) for x in xs])
  ax.minorticks_off()


def quality_vs_steps_figure(curves: dict[str, dict[str, dict[int, dict]]]):
  """Exact match against decoding steps, one panel per decoder, one line per run (mean +- std over seeds).

  `curves`: {decoder: {run label: {steps: {"mean", "std", ...}}}}.
  """
  fig, axes = _figure(len(curves), width=4.2, height=3.6)
  for ax, (decoder, runs) in zip(axes, curves.items()):
    for i, (label, by_steps) in enumerate(runs.items()):
      steps = sorted(by_steps)
      _line_with_spread(ax, steps, [by_steps[n] for n in steps], _color(i), label)
    _finish(ax, f"{decoder} decoding", "exact match")
    ax.set_xlabel("steps (model evaluations)")
    ax.set_ylim(bottom=0)
  fig.suptitle("exact match against decoding steps (mean ± std over runs x seeds)", fontsize=12)
  return fig


def bound_vs_steps_figure(bounds: dict[str, dict[int, dict]], continuous: dict[str, dict] | None = None):
  """The T-step masked-diffusion bound (nats/token) against T, one line per run; the continuous-time bound
  of each run as a dotted line. `bounds`: {label: {T: {"mean", "std", "error"}}} (compare.bound_stats)."""
  fig, (ax,) = _figure(1, width=6.0, height=4.0)
  for i, (label, by_steps) in enumerate(bounds.items()):
    steps = sorted(by_steps)
    _line_with_spread(ax, steps, [by_steps[n] for n in steps], _color(i), label)
    if continuous and continuous.get(label):
      ax.axhline(continuous[label]["mean"], color=_color(i), linestyle=":", linewidth=1.2,
                 label=f"{label}: continuous time")
  _finish(ax, "NLL bound of a T-step sampler (bars: standard error; pooled: spread)", "nats / token (upper bound)")
  ax.set_xlabel("T (steps)")
  return fig


def self_correction_figure(results: dict[str, dict[str, dict[str, dict]]]):
  """Self-correction, one row of panels per replacement strategy: wrong tokens fixed, right tokens changed and
  exact match after refinement, with bars per corruption rate and label.

  `results`: {strategy: {label: {rate (str): {"fixed", "broken", "exact_match", ...}}}}.
  """
  titles = {"fixed": "wrong tokens fixed", "broken": "right tokens changed", "exact_match": "exact match after"}
  fig, axes = _grid(len(results), len(titles), width=4.6, height=3.2)
  labels = list(dict.fromkeys(label for by_label in results.values() for label in by_label))
  colors = [_color(i) for i in range(len(labels))]
  for row, (strategy, by_label) in zip(axes, results.items()):
    rates = sorted({rate for by_rate in by_label.values() for rate in by_rate}, key=float)
    for ax, (key, title) in zip(row, titles.items()):
      _bars(ax, [f"{float(r):.0%}" for r in rates],
            {label: [by_label.get(label, {}).get(r, {}).get(key) for r in rates] for label in labels}, colors)
      ax.set_title(f"{strategy}: {title}", fontsize=10)
      ax.set_ylabel("fraction")
      ax.grid(True, axis="y", alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel("answer tokens replaced by random tokens")
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=len(labels), fontsize=9)
  fig.suptitle("self-correction: FlowLM decoding from corrupted answers", fontsize=12)
  return fig


def run_figures(workdir: str, label: str | None = None) -> dict[str, object]:
  """{name: Figure} of one run, for notebooks: `loss`, `accuracy_by_ratio`, `mask_vs_random`."""
  rows = read_metrics(workdir)
  label = label or default_labels([workdir])[0]
  config = read_run_config(workdir) if os.path.isdir(workdir) else {}
  return {"loss": loss_figure(rows, label, config), "accuracy_by_ratio": accuracy_by_ratio_figure(rows, label),
          "mask_vs_random": mask_vs_random_figure(rows, label)}


def _file_name(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def png_bytes(fig, dpi: int = 100) -> bytes:
  """The figure as PNG bytes (for `IPython.display.Image`, whatever matplotlib backend a notebook uses)."""
  import io
  buf = io.BytesIO()
  fig.savefig(buf, dpi=dpi, format="png")
  return buf.getvalue()


def save(fig, path: str, dpi: int = 120) -> str:
  fig.savefig(path, dpi=dpi, format="png")
  return path


def plot_workdirs(workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None, dpi: int = 120) -> list[str]:
  """Writes every figure for `workdirs` into `out`; returns the PNG paths."""
  if not workdirs:
    raise ValueError("plot: give at least one workdir")
  labels = list(labels) if labels else default_labels(workdirs)
  if len(labels) != len(workdirs):
    raise ValueError(f"plot: {len(labels)} labels for {len(workdirs)} workdirs")
  if len(set(labels)) != len(labels):
    raise ValueError(f"plot: labels must be unique, got {labels}")
  names = [_file_name(label) for label in labels]
  if len(set(names)) != len(names):  # "run 1" and "run_1": one run's PNGs would overwrite the other's
    raise ValueError(f"plot: labels {labels} give the same file names {names}; pass --labels that differ in "
                     "letters or digits")
  if len(names) > 1 and "compare" in names:  # compare_loss.png is the comparison figure's
    raise ValueError(f"plot: the label 'compare' would name a run's files like the comparison figures'; pass --labels")
  runs = {label: read_metrics(w) for label, w in zip(labels, workdirs)}
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:  # a file where the folder (or one above it) should be
    raise ValueError(f"plot: --out={out} cannot be a folder ({e.strerror})") from None
  written = []
  for (label, rows), workdir in zip(runs.items(), workdirs):
    config = read_run_config(workdir) if os.path.isdir(workdir) else {}
    name = names[labels.index(label)]
    for suffix, fig in (("loss", loss_figure(rows, label, config)),
                        ("accuracy_by_ratio", accuracy_by_ratio_figure(rows, label)),
                        ("mask_vs_random", mask_vs_random_figure(rows, label))):
      written.append(save(fig, os.path.join(out, f"{name}_{suffix}.png"), dpi))
  if len(runs) > 1:
    written.append(save(compare_loss_figure(runs), os.path.join(out, "compare_loss.png"), dpi))
    written.append(save(compare_accuracy_figure(runs), os.path.join(out, "compare_accuracy.png"), dpi))
  return written


def main(argv: Iterable[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.plot", description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", help="run directories (holding metrics.jsonl) or metrics .jsonl files")
  p.add_argument("--out", default="plots", help="output folder for the PNGs (default: plots/)")
  p.add_argument("--labels", default=None, help="comma-separated run labels (default: the workdirs' names)")
  p.add_argument("--dpi", type=int, default=120)
  args = p.parse_args(list(argv) if argv is not None else None)
  import matplotlib
  matplotlib.use("Agg")  # headless; the figures are built without pyplot anyway
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
  try:
    paths = plot_workdirs(args.workdirs, args.out, labels, args.dpi)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
