"""Answer prompts with a trained run: `python -m flowlm_jax.sample --workdir=W --prompt "add 2 3"`.

Loads the newest (or `--step`) checkpoint through `flowlm_jax.loading.load` and decodes each prompt the
LLaDA or FlowLM way (default: the run's `inference.mode`); options left out keep the run's config.
"""

from __future__ import annotations

import argparse
import sys

# flag name -> inference config field
OVERRIDES = {
    "steps": "steps", "gen_length": "answer_length", "block_length": "block_length",
    "temperature": "temperature", "remasking": "remasking", "cfg_scale": "cfg_scale",
    "threshold": "confidence_threshold", "max_replacements": "max_replacements",
    "strategy": "replacement_strategy", "max_steps": "max_steps", "initial_answer": "initial_answer",
    "seed": "seed",
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flowlm_jax.sample", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory (holds checkpoints/)")
  p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several (default: the "
                 "run's inference.test_prompts)")
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
  return p.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> dict:
  out = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
  if args.steps is not None and args.max_steps is None:
    out["max_steps"] = args.steps  # equal step budgets for both samplers unless asked otherwise
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  from flowlm_jax import loading, sampling  # heavy imports after argument errors

  run = loading.load(args.workdir, step=args.step)
  icfg = sampling.run_config(run.config.inference, **overrides_of(args))
  prompts = args.prompt or list(icfg.test_prompts)
  modes = ("llada", "flowlm") if args.mode == "both" else (args.mode or icfg.mode,)
  print(f"checkpoint step {run.step} of {args.workdir}")
  for mode in modes:
    answers = sampling.generate_texts(run.graphdef, run.params, run.tokenizer, run.vocab, prompts, icfg, mode=mode,
                                      chat=run.config.dataset.prompt_format == "chat")
    for prompt, answer in zip(prompts, answers):
      print(f"[{mode}] {prompt!r} -> {answer!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
