"""Answer prompts with a trained run: `python -m flowlm_jax.sample --workdir=W "add 2 3" "ROMEO."`.

Prompts come as positional arguments, repeated `--prompt`, or `--prompts_file` (one per line, or .jsonl
records with a `prompt` field), in that order; none at all means the run's `inference.test_prompts`.
They are decoded in batches, the LLaDA or FlowLM way or both (default: the run's `inference.mode`),
from the newest (or `--step`) checkpoint; `--out F.jsonl` also writes one record per prompt and mode.
Options left out keep the run's inference config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# flag name -> inference config field
OVERRIDES = {
    "steps": "steps", "gen_length": "answer_length", "block_length": "block_length",
    "temperature": "temperature", "remasking": "remasking", "cfg_scale": "cfg_scale",
    "threshold": "confidence_threshold", "max_replacements": "max_replacements",
    "strategy": "replacement_strategy", "max_steps": "max_steps", "initial_answer": "initial_answer",
    "seed": "seed", "cache": "cache", "cache_refresh": "cache_refresh", "parallel_threshold": "parallel_threshold",
    "parallel_factor": "parallel_factor",
}


# Flags checked before the checkpoint loads (those whose check needs the run's other settings, such as steps
# divisible by the number of blocks, are checked once it has loaded, before anything decodes).
RANGES = (
    ("steps", lambda x: x >= 1, ">= 1"), ("gen_length", lambda x: x >= 1, ">= 1"),
    ("block_length", lambda x: x >= 0, ">= 0 (0 = one block)"), ("temperature", lambda x: x >= 0, ">= 0"),
    ("cfg_scale", lambda x: x >= 0, ">= 0"), ("threshold", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("max_replacements", lambda x: x >= 1, ">= 1"), ("max_steps", lambda x: x >= 1, ">= 1"),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.sample", description=__doc__.splitlines()[0])
  p.add_argument("prompts", nargs="*", help="prompts to answer")
  p.add_argument("--workdir", required=True, help="run directory (holds checkpoints/)")
  p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
  p.add_argument("--prompts_file", help="a file of prompts: one per line, or .jsonl records with a `prompt` field")
  p.add_argument("--out", help="also write the answers here as .jsonl: {prompt, mode, answer, step}")
  p.add_argument("--batch_size", type=int, default=64, help="prompts decoded together")
  p.add_argument("--mode", choices=("llada", "flowlm", "both"), default=None, help="default: inference.mode")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--steps", type=int, help="LLaDA steps (FlowLM: also max_steps unless --max_steps is given)")
  p.add_argument("--gen_length", type=int, help="answer length in tokens")
  p.add_argument("--block_length", type=int, help="LLaDA semi-autoregressive block length (0 = one block)")
  p.add_argument("--temperature", type=float)
  p.add_argument("--remasking", choices=("low_confidence", "random"))
  p.add_argument("--cfg_scale", type=float)
  p.add_argument("--threshold", type=float, help="FlowLM confidence threshold")
  p.add_argument("--max_replacements", type=int, help="FlowLM rewrites per step")
  p.add_argument("--strategy", choices=("below_threshold", "most_confident_changes", "fill_then_refine"))
  p.add_argument("--max_steps", type=int, help="FlowLM step limit")
  p.add_argument("--initial_answer", choices=("mask", "random"))
  p.add_argument("--seed", type=int)
  fast = p.add_argument_group("fast decoding (both samplers; docs/sampling.md)")
  fast.add_argument("--cache", choices=("none", "prefix", "dual"), help="approximate key/value cache")
  fast.add_argument("--cache_refresh", type=int,
                    help="also refresh the cache every this many steps (0: LLaDA at each block's first step, FlowLM every 8)")
  fast.add_argument("--parallel_threshold", type=float,
                    help="also commit every candidate above this confidence (0 = off)")
  fast.add_argument("--parallel_factor", type=float,
                    help="or Fast-dLLM's factor rule: the most confident n whose n-th has confidence >= 1 - factor / (n + 1) (0 = off)")
  args = p.parse_intermixed_args(argv)  # prompts may come before, between or after the options
  if args.batch_size <= 0:
    p.error(f"--batch_size must be > 0, got {args.batch_size}")
  for flag, ok, rule in RANGES:  # `not ok(x)` refuses nan too
    value = getattr(args, flag)
    if value is not None and not ok(value):
      p.error(f"--{flag} must be {rule}, got {value}")
  if args.out and os.path.isdir(args.out):
    p.error(f"--out {args.out} is a folder: name the .jsonl file to write")
  if args.cache_refresh is not None and args.cache_refresh < 0:
    p.error(f"--cache_refresh must be >= 0, got {args.cache_refresh}")
  if args.parallel_threshold is not None and not 0.0 <= args.parallel_threshold <= 1.0:
    p.error(f"--parallel_threshold must be in [0, 1], got {args.parallel_threshold}")
  if args.parallel_factor is not None and not args.parallel_factor >= 0:  # nan too
    p.error(f"--parallel_factor must be >= 0, got {args.parallel_factor}")
  if args.parallel_threshold and args.parallel_factor:
    p.error("set --parallel_threshold or --parallel_factor, not both")
  try:  # bad input fails here, before the checkpoint loads and the samplers compile
    args.prompts = args.prompts + args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])
  except (OSError, ValueError) as e:
    p.error(str(e))
  return args


def read_prompts(path: str) -> list[str]:
  """The prompts in a file: the `prompt` field of each .jsonl record, else each non-empty line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts_file: no such file: {path}")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        try:
          record = json.loads(line)
        except ValueError:
          raise ValueError(f"--prompts_file: {path} line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
          raise ValueError(f"--prompts_file: {path} line {number} has no string field 'prompt'")
        line = record["prompt"]
      prompts.append(line)
  if not prompts:
    raise ValueError(f"--prompts_file: {path} holds no prompts")
  return prompts


def overrides_of(args: argparse.Namespace) -> dict:
  out = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
  if args.steps is not None and args.max_steps is None:
    out["max_steps"] = args.steps  # equal step budgets for both samplers unless asked otherwise
  # One parallel rule asked for replaces the other the run may have been configured with (they cannot both be on).
  for rule, other in (("parallel_threshold", "parallel_factor"), ("parallel_factor", "parallel_threshold")):
    if out.get(rule) and other not in out:
      out[other] = 0.0
  return out


def answer(run, prompts: list[str], icfg, modes, batch_size: int) -> list[dict]:
  """{prompt, mode, answer} for every prompt and mode, listed prompt by prompt (its modes together); each
  mode decodes all prompts in batches of `batch_size`."""
  from flowlm_jax import sampling

  chat = run.config.dataset.prompt_format == "chat"
  answers = {mode: sampling.generate_texts(run.graphdef, run.params, run.tokenizer, run.vocab, prompts, icfg,
                                          mode=mode, chat=chat, batch_size=batch_size) for mode in modes}
  return [{"prompt": prompt, "mode": mode, "answer": answers[mode][i]}
          for i, prompt in enumerate(prompts) for mode in modes]


def main(argv=None) -> int:
  args = parse_args(argv)
  from flowlm_jax import cli
  cli.quiet_libraries()
  from flowlm_jax import loading, sampling  # heavy imports after argument errors
  from flowlm_jax.logging import format_samples

  try:
    run = loading.load(args.workdir, step=args.step)
    icfg = sampling.run_config(run.config.inference, **overrides_of(args))
    modes = ("llada", "flowlm") if args.mode == "both" else (args.mode or icfg.mode,)
    for mode in modes:  # every mode's settings, before the first one decodes
      (sampling.LladaSpec if mode == "llada" else sampling.FlowSpec).from_config(icfg, run.vocab)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  prompts = args.prompts or list(icfg.test_prompts)
  rows = answer(run, prompts, icfg, modes, args.batch_size)
  print(f"checkpoint step {run.step} of {args.workdir}")
  print(format_samples(rows))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps({**row, "step": run.step}, ensure_ascii=False) + "\n" for row in rows)
    print(f"wrote {len(rows)} answers to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
