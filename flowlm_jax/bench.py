"""Benchmark: train-step and sampler speed for the `small` and `1b` shapes; prints a table, writes JSON.

  python -m flowlm_jax.bench [--shapes small,1b] [--remat save_dots] [--loss_chunk 256] [--out bench.json]
  python -m flowlm_jax.bench --smoke         # tiny shapes, a few steps: checks the script on a CPU

MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6(L(4d^2 + 3 d ff) + d V) + 12 L S d
(bidirectional attention: not halved) and peak = a large bf16 matmul's rate measured in the same run.
Sampler floor = steps x forward FLOPs of the whole batch / peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowlm_jax import config as config_lib
from flowlm_jax import masking, sharding, train
from flowlm_jax.model import ModelConfig, count_params
from flowlm_jax.vocab import Vocab

SHAPES = {
    # name: (d_model, n_layers, n_heads, d_ff, vocab, seq_len, batch)
    "small": (768, 12, 12, 2048, 32000, 1024, 32),
    "1b": (2048, 22, 16, 5632, 32000, 2048, 8),
    "smoke": (64, 2, 4, 128, 512, 64, 4),
}
SAMPLER = dict(batch=32, prompt=64, answer=256, steps=64, block=32)
SMOKE_SAMPLER = dict(batch=2, prompt=8, answer=16, steps=4, block=8)


def synthetic_vocab(size: int) -> Vocab:
  return Vocab(size=size, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  d, L = m.d_model, m.n_layers
  return 6 * (L * (4 * d * d + 3 * d * m.d_ff) + d * m.vocab_size) + 12 * L * seq_len * d


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  return train_flops_per_token(m, seq_len) / 3


def measure_peak_matmul(n: int = 8192, reps: int = 50, warmup_s: float = 3.0) -> float:
  """bf16 FLOP/s of an n x n x n product on random data (the MFU denominator).

  Warm-up for a few seconds first: an idle GPU starts at low clocks, and a low peak would flatter the MFU.
  """
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
  b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_s:
    f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times)


def peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def model_config(shape: str, remat: str, compute_dtype: str, unroll: bool = False) -> tuple[ModelConfig, int, int]:
  d, L, H, ff, V, S, B = SHAPES[shape]
  m = ModelConfig(vocab_size=V, num_real_tokens=V, d_model=d, n_layers=L, n_heads=H, n_kv_heads=H, d_ff=ff,
                  compute_dtype=compute_dtype, remat=remat, scan_unroll=L if unroll else 1)
  return m, S, B


def bench_train(shape: str, *, remat: str, loss_chunk: int, steps: int, compute_dtype: str,
                profile_dir: str = "", unroll: bool = False) -> dict:
  m, S, B = model_config(shape, remat, compute_dtype, unroll)
  vocab = synthetic_vocab(m.vocab_size)
  c = config_lib.base_config()
  spec = masking.MaskingSpec.from_config(c.masking, vocab)
  step_cfg = train.StepConfig(model=m, masking=spec, loss="llada", loss_weighting="inverse_t", grad_accum=1,
                              loss_chunk_size=loss_chunk, pad_id=vocab.pad_id)
  mesh = sharding.single_device_mesh()
  graphdef, abstract = train.abstract_model(m)
  tx, _ = train.make_optimizer(c.training, 10_000, abstract)
  shardings = train.state_shardings(m, tx, mesh)
  step_fn, _ = train.compile_steps(graphdef, tx, step_cfg, shardings, mesh)
  state = train.init_state(m, tx, 0, shardings)
  tokens = jax.random.randint(jax.random.key(1), (B, S), 5, m.vocab_size, dtype=jnp.int32)
  batch = {"tokens": tokens, "corruptible": jnp.ones((B, S), bool)}

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(3):  # warm-up
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  if profile_dir:  # a few steps under jax.profiler, with a Perfetto trace that needs no viewer to parse
    with jax.profiler.trace(f"{profile_dir}/{shape}", create_perfetto_trace=True):
      for _ in range(3):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  return {"shape": shape, "remat": remat + ("+unroll" if unroll else ""), "loss_chunk": loss_chunk, "step_s": step_s, "compile_s": compile_s,
          "tokens_per_s": B * S / step_s, "flops_per_token": train_flops_per_token(m, S),
          "peak_memory_gib": (peak_memory_bytes() or 0) / 2 ** 30, "loss": float(metrics["loss"]),
          "params_m": count_params(state.params) / 1e6}


def bench_sampler(shape: str, mode: str, sampler: dict, compute_dtype: str, unroll: bool = False,
                  profile_dir: str = "") -> dict:
  from flowlm_jax import sampling

  m, _, _ = model_config(shape, "none", compute_dtype, unroll)
  vocab = synthetic_vocab(m.vocab_size)
  graphdef, _ = train.abstract_model(m)
  params = _init_params(m)
  icfg = config_lib.base_config().inference
  with icfg.unlocked():
    icfg.answer_length, icfg.steps, icfg.block_length = sampler["answer"], sampler["steps"], sampler["block"]
    icfg.max_steps = sampler["steps"]
    icfg.confidence_threshold = 1.1  # never confident: FlowLM runs every step, like LLaDA (a fair timing)
  rng = np.random.default_rng(0)
  prompts = rng.integers(5, m.vocab_size, size=(sampler["batch"], sampler["prompt"])).tolist()
  run = lambda: sampling.generate(graphdef, params, prompts, vocab, icfg, mode=mode, key=jax.random.key(0))
  t0 = time.perf_counter()
  jax.block_until_ready(run().tokens)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(run().tokens)
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  if profile_dir:
    with jax.profiler.trace(f"{profile_dir}/{shape}-{mode}", create_perfetto_trace=True):
      jax.block_until_ready(run().tokens)
  T = sampler["prompt"] + sampler["answer"]
  floor_flops = sampler["steps"] * sampler["batch"] * T * forward_flops_per_token(m, T)
  return {"shape": shape, "mode": mode, "seconds": seconds, "first_call_s": first_s,
          "generated_tokens_per_s": sampler["batch"] * sampler["answer"] / seconds, "floor_flops": floor_flops}


def _init_params(m: ModelConfig):
  from flax import nnx
  from flowlm_jax.model import create

  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(create(m, rngs=nnx.Rngs(params=0)), nnx.Param)))()


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="small,1b")
  p.add_argument("--remat", default="save_dots", choices=["none", "full", "save_dots"])
  p.add_argument("--loss_chunk", type=int, default=256, help="cross-entropy chunk (positions); 0 = full logits")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--samplers", default="llada,flowlm", help="comma list; empty to skip")
  p.add_argument("--compute_dtype", default="bfloat16")
  p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (CPU check)")
  p.add_argument("--out", default="bench.json")
  p.add_argument("--unroll", action=argparse.BooleanOptionalAction, default=True,
                 help="unroll the layer scan (no per-layer buffer copies; docs/performance.md)")
  p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="time the train step")
  p.add_argument("--profile_dir", default="",
                 help="also trace 3 train steps and one run of each sampler per shape with jax.profiler")
  args = p.parse_args(argv)
  shapes = ["smoke"] if args.smoke else args.shapes.split(",")
  steps = 2 if args.smoke else args.steps
  sampler = SMOKE_SAMPLER if args.smoke else SAMPLER
  peak_n = 512 if args.smoke else 8192
  peak = measure_peak_matmul(peak_n, warmup_s=0.1 if args.smoke else 3.0)
  rows, sampler_rows = [], []
  for shape in shapes:
    if args.train:
      r = bench_train(shape, remat=args.remat, loss_chunk=args.loss_chunk, steps=steps,
                      compute_dtype=args.compute_dtype, profile_dir=args.profile_dir, unroll=args.unroll)
      r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
      rows.append(r)
    for mode in filter(None, args.samplers.split(",")):
      sr = bench_sampler(shape, mode, sampler, args.compute_dtype, args.unroll, args.profile_dir)
      sr["floor_s"] = sr["floor_flops"] / peak
      sr["x_floor"] = sr["seconds"] / sr["floor_s"]
      sampler_rows.append(sr)
  # Measured again after the work (clocks fully up); the higher reading is the conservative denominator.
  peak_after = measure_peak_matmul(peak_n, warmup_s=0.1 if args.smoke else 3.0)
  if peak_after > peak:
    for r in rows:
      r["mfu"] *= peak / peak_after
    for r in sampler_rows:
      r["floor_s"] *= peak / peak_after
      r["x_floor"] = r["seconds"] / r["floor_s"]
    peak = peak_after
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "peak_bf16_tflops": peak / 1e12, "train": rows, "samplers": sampler_rows,
            "args": vars(args), "date": time.strftime("%Y-%m-%d")}
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(format_report(report))
  return rows


def format_report(report: dict) -> str:
  lines = [f"device: {report['device']} ({report['backend']}, jax {report['jax']}); measured bf16 peak "
           f"{report['peak_bf16_tflops']:.0f} TFLOP/s"]
  if report["train"]:
    lines += ["| shape | remat | loss chunk | step ms | tokens/s | MFU | peak mem GiB | compile s |",
              "|---|---|---|---|---|---|---|---|"]
  for r in report["train"]:
    lines.append(f"| {r['shape']} | {r['remat']} | {r['loss_chunk']} | {r['step_s'] * 1e3:.1f} | "
                 f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_gib']:.1f} | {r['compile_s']:.1f} |")
  if report["samplers"]:
    lines += ["", "| shape | sampler | seconds | generated tok/s | floor s | x floor |", "|---|---|---|---|---|---|"]
    for r in report["samplers"]:
      lines.append(f"| {r['shape']} | {r['mode']} | {r['seconds']:.3f} | {r['generated_tokens_per_s']:,.0f} | "
                   f"{r['floor_s']:.3f} | {r['x_floor']:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
