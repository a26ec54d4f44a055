"""Benchmark: train-step and sampler speed for the `small` and `1b` shapes; prints a table, writes JSON.

  python -m flowlm_jax.bench [--shapes small,1b] [--remat save_dots] [--loss_chunk 256] [--out bench.json]
  python -m flowlm_jax.bench --smoke         # tiny shapes, a few steps: checks the script on a CPU
  python -m flowlm_jax.bench --scaling small:data,1b:fsdp,1b:data_fsdp --gpus 1,2,4 --samplers=
                                             # weak scaling: the same per-device batch on 1, 2, 4 devices
  python -m flowlm_jax.bench --no-train --answers 256,512 --batches 1,32 --caches none,prefix,dual --sampler_steps 0
                                             # fast sampling: each key/value cache at answer 256 and 512, batch
                                             # 1 and 32, one token per step (issue 18; docs/performance.md)
  python -m flowlm_jax.bench --matmul_dtype bfloat16,fp8 --samplers=   # train step with bf16 and FP8 matmuls
  python -m flowlm_jax.bench --fp8_check     # did XLA turn an FP8 product (and its backward) into FP8 GEMMs?
  python -m flowlm_jax.bench --loss_gap RUN_BF16,RUN_FP8 --out gap.json   # two runs' losses, step by step

MFU = tokens/s x FLOPs/token / peak (bf16 peaks, FP8 rows too: FP8's gain shows as a higher MFU), with FLOPs/token = 6(L(4d^2 + 3 d ff) + d V) + 12 L S d
(bidirectional attention: not halved). Two peaks: the device's dense bf16 datasheet figure (DATASHEET,
the headline where the device is known) and a large bf16 matmul's rate measured in the same run.
Sampler floor = the forward FLOPs the sampler needs / measured peak: per step, the transformer body over
every position (prompt + answer) and the vocabulary projection only where the sampler projects (LLaDA:
its current block; FlowLM: the answer), for the uncached samplers (a cached pass runs only a slice).
Sampler rows also give the forward passes per answer and how many of them ran whole rows. The weights
are random, so no prediction is confident: parallel decoding (a confidence threshold) is measured on a
trained run instead (scripts/fast_sampling.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowlm_jax import config as config_lib
from flowlm_jax import masking, sharding, train
from flowlm_jax.logging import read_metrics, series
from flowlm_jax.models import fp8
from flowlm_jax.models.llama import ModelConfig
from flowlm_jax.models.registry import count_params
from flowlm_jax.vocab import Vocab

SHAPES = {
    # name: (d_model, n_layers, n_heads, d_ff, vocab, seq_len, batch)
    "small": (768, 12, 12, 2048, 32000, 1024, 32),
    "1b": (2048, 22, 16, 5632, 32000, 2048, 8),
    "smoke": (64, 2, 4, 128, 512, 64, 4),
}
# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (first match of the device kind wins).
DATASHEET = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
# Meshes for --scaling: name -> (data, fsdp, tensor) on n devices.
SCALING_MESHES = {"data": lambda n: (n, 1, 1), "fsdp": lambda n: (1, n, 1),
                  "data_fsdp": lambda n: (max(n // 2, 1), min(n, 2), 1)}
# XLA's GPU compiler turns a product of FP8 operands into this cuBLASLt call (Hopper and later).
FP8_GEMM_CALL = "__cublas$lt$matmul$f8"
SAMPLER = dict(batch=32, prompt=64, answer=256, steps=64, block=32, cache="none")
SMOKE_SAMPLER = dict(batch=2, prompt=8, answer=16, steps=4, block=8, cache="none")


def synthetic_vocab(size: int) -> Vocab:
  return Vocab(size=size, mask_id=1, pad_id=0, eos_id=2, sep_id=3, special_ids=(0, 1, 2, 3, 4))


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  d, L = m.d_model, m.n_layers
  return 6 * (L * (4 * d * d + 3 * d * m.d_ff) + d * m.vocab_size) + 12 * L * seq_len * d


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  return train_flops_per_token(m, seq_len) / 3


def sampler_floor_flops(m: ModelConfig, sampler: dict, mode: str) -> float:
  """Forward FLOPs of one sampler call: body over all positions, vocabulary projection where projected."""
  T = sampler["prompt"] + sampler["answer"]
  head = 2 * m.d_model * m.vocab_size  # per projected position
  projected = sampler["block"] if mode == "llada" else sampler["answer"]
  per_step = T * (forward_flops_per_token(m, T) - head) + projected * head
  return sampler["steps"] * sampler["batch"] * per_step


def datasheet_peak_flops(device_kind: str) -> float | None:
  for name, tflops in DATASHEET:
    if name.lower() in device_kind.lower():
      return tflops * 1e12
  return None


def measure_peak_matmul(n: int = 8192, reps: int = 50, warmup_s: float = 3.0, per_timing: int = 10,
                        product=jnp.matmul) -> float:
  """FLOP/s of `product` (bf16 a @ b) of n x n x n on random bf16 data, `per_timing` dispatched back to back
  per timing.

  A host round-trip after every product reads low (606 vs ~800 TFLOP/s on an H200). Warm-up for a few
  seconds first: an idle GPU starts at low clocks, and a low peak would flatter the MFU.
  """
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
  b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
  f = jax.jit(product)
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_s:
    f(a, b).block_until_ready()
  times = []
  for _ in range(max(reps // per_timing, 3)):
    t0 = time.perf_counter()
    outs = [f(a, b) for _ in range(per_timing)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / per_timing)
  return 2 * n ** 3 / statistics.median(times)


def peak_memory_bytes(devices=None) -> int | None:
  """The largest peak among `devices` (default: the first), since the process started."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in (devices or jax.devices()[:1])]
  return max((p for p in peaks if p is not None), default=None)


def own_peak_gib(before: int | None, after: int | None) -> float | None:
  """A row's measured peak: the allocator's high-water mark cannot be reset within a process, so it is the
  row's own only where the row raised it; else None (at most an earlier row's peak, not measured)."""
  return after / 2 ** 30 if after is not None and (before is None or after > before) else None


def compiled_memory_gib(compiled) -> float | None:
  """XLA's estimate of one device's peak for a compiled program (arguments, outputs and temporaries; donated
  buffers counted once), the same whatever ran before it."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  peak = getattr(stats, "peak_memory_in_bytes", None) or (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                                          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return peak / 2 ** 30


def model_config(shape: str, remat: str, compute_dtype: str, unroll: bool = False,
                 matmul_dtype: str = "bfloat16") -> tuple[ModelConfig, int, int]:
  d, L, H, ff, V, S, B = SHAPES[shape]
  m = ModelConfig(vocab_size=V, num_real_tokens=V, d_model=d, n_layers=L, n_heads=H, n_kv_heads=H, d_ff=ff,
                  compute_dtype=compute_dtype, matmul_dtype=matmul_dtype, remat=remat, scan_unroll=L if unroll else 1)
  return m, S, B


def fp8_gemm_calls(optimized_hlo: str) -> int:
  """FP8 GEMMs in a compiled program's optimized HLO: cuBLASLt FP8 calls, and GEMM fusions (Triton's) whose
  operands are f8 (XLA's autotuner picks either); 0 where XLA did not rewrite, and on CPUs."""
  f8_gemms = set(re.findall(r"^%(\S*gemm\S*) \([^\n]*?: f8e", optimized_hlo, re.MULTILINE))  # their computations
  fusions = sum(name in f8_gemms for name in re.findall(r"kind=kCustom, calls=%([^,\s]+)", optimized_hlo))
  return optimized_hlo.count(FP8_GEMM_CALL) + fusions


def bench_train(shape: str, *, remat: str, loss_chunk: int, steps: int, compute_dtype: str,
                profile_dir: str = "", unroll: bool = False, mesh_shape=(1, 1, 1),
                matmul_dtype: str = "bfloat16") -> dict:
  """One shape's train step on a mesh of the first prod(mesh_shape) devices; the batch in SHAPES is per
  data x fsdp replica (weak scaling)."""
  m, S, B = model_config(shape, remat, compute_dtype, unroll, matmul_dtype)
  B *= mesh_shape[0] * mesh_shape[1]
  vocab = synthetic_vocab(m.vocab_size)
  c = config_lib.base_config()
  spec = masking.MaskingSpec.from_config(c.masking, vocab)
  step_cfg = train.StepConfig(model=m, masking=spec, loss="llada", loss_weighting="inverse_t", grad_accum=1,
                              loss_chunk_size=loss_chunk, pad_id=vocab.pad_id)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  peak_before = peak_memory_bytes(devices)
  mesh = sharding.make_mesh(c, devices)
  graphdef, abstract = train.abstract_model(m)
  tx, _ = train.make_optimizer(c.training, 10_000, abstract)
  shardings = train.state_shardings(m, tx, mesh)
  step_fn, _ = train.compile_steps(graphdef, tx, step_cfg, shardings, mesh)
  state = train.init_state(m, tx, 0, shardings)
  tokens = jax.random.randint(jax.random.key(1), (B, S), 5, m.vocab_size, dtype=jnp.int32)
  batch = jax.device_put({"tokens": tokens, "corruptible": jnp.ones((B, S), bool)}, sharding.batch_sharding(mesh))

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  fp8_gemms = fp8_gemm_calls(compiled.as_text())
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
    with jax.profiler.trace(f"{profile_dir}/{shape}{'' if matmul_dtype == 'bfloat16' else '-' + matmul_dtype}",
                            create_perfetto_trace=True):
      for _ in range(3):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  return {"shape": shape, "matmul_dtype": matmul_dtype, "fp8_gemms": fp8_gemms,
          "remat": remat + ("+unroll" if unroll else ""), "loss_chunk": loss_chunk,
          "mesh": "x".join(map(str, mesh_shape)), "devices": len(devices), "batch": B, "step_s": step_s,
          "compile_s": compile_s, "tokens_per_s": B * S / step_s, "tokens_per_s_per_device": B * S / step_s / len(devices),
          "flops_per_token": train_flops_per_token(m, S),
          "peak_memory_gib": own_peak_gib(peak_before, peak_memory_bytes(devices)),
          "xla_memory_gib": compiled_memory_gib(compiled), "loss": float(metrics["loss"]),
          "params_m": count_params(state.params) / 1e6}


def sampler_grid(args, smoke: bool) -> list[dict]:
  """The sampler settings to time: every answer length x batch x cache of the flags (--smoke: every cache
  at the smoke setting).

  steps: --sampler_steps, 0 = one token per step (the answer length), Fast-dLLM's baseline.
  """
  if smoke:
    return [dict(SMOKE_SAMPLER, cache=cache) for cache in args.caches.split(",")]
  grid = []
  for batch in map(int, args.batches.split(",")):  # batch outermost: batch 1, the targets' setting, comes first
    for answer in map(int, args.answers.split(",")):
      for cache in args.caches.split(","):
        grid.append(dict(SAMPLER, answer=answer, batch=batch, cache=cache, steps=args.sampler_steps or answer,
                         block=min(SAMPLER["block"], answer)))
  return grid


def sampler_config(sampler: dict):
  """The inference config of one sampler setting: every step runs (no early stop), greedy."""
  icfg = config_lib.base_config().inference
  with icfg.unlocked():
    icfg.answer_length, icfg.steps, icfg.block_length = sampler["answer"], sampler["steps"], sampler["block"]
    icfg.max_steps, icfg.cache = sampler["steps"], sampler["cache"]
    icfg.confidence_threshold = 1.0  # random weights are never that confident: every token stays a candidate
  return icfg


def timed(run, reps: int) -> tuple[float, float, object]:
  """(first call's seconds, compile included; median seconds of `reps` more; the last output)."""
  t0 = time.perf_counter()
  out = run()
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
  return first_s, statistics.median(times), out


def bench_sampler(shape: str, mode: str, sampler: dict, compute_dtype: str, unroll: bool = False,
                  profile_dir: str = "", reps: int = 3) -> dict:
  from flowlm_jax import sampling

  m, _, _ = model_config(shape, "none", compute_dtype, unroll)
  vocab = synthetic_vocab(m.vocab_size)
  graphdef, _ = train.abstract_model(m)
  params = _init_params(m)
  icfg = sampler_config(sampler)
  rng = np.random.default_rng(0)
  prompts = rng.integers(5, m.vocab_size, size=(sampler["batch"], sampler["prompt"])).tolist()
  run = lambda: sampling.generate(graphdef, params, prompts, vocab, icfg, mode=mode, key=jax.random.key(0))
  first_s, seconds, out = timed(run, reps)  # generate returns host arrays: each call has finished
  if profile_dir:
    with jax.profiler.trace(f"{profile_dir}/{shape}-{mode}", create_perfetto_trace=True):
      run()
  return {"shape": shape, "mode": mode, "cache": sampler["cache"], "answer": sampler["answer"],
          "batch": sampler["batch"], "steps": sampler["steps"], "seconds": seconds, "first_call_s": first_s,
          "generated_tokens_per_s": sampler["batch"] * sampler["answer"] / seconds,
          "passes_per_answer": float(np.mean(out.passes)), "full_passes_per_answer": float(np.mean(out.full_passes)),
          "floor_flops": sampler_floor_flops(m, sampler, mode) if sampler["cache"] == "none" else None}


def _init_params(m: ModelConfig):
  from flax import nnx
  from flowlm_jax.models.registry import create

  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(create(m, rngs=nnx.Rngs(params=0)), nnx.Param)))()


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="small,1b")
  p.add_argument("--remat", default="save_dots", choices=["none", "full", "save_dots"])
  p.add_argument("--loss_chunk", type=int, default=256, help="cross-entropy chunk (positions); 0 = full logits")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--samplers", default="llada,flowlm", help="comma list; empty to skip")
  p.add_argument("--answers", default=str(SAMPLER["answer"]), help="sampler answer lengths, comma list")
  p.add_argument("--batches", default=str(SAMPLER["batch"]), help="sampler batch sizes, comma list")
  p.add_argument("--caches", default="none", help="key/value caches to time, comma list of none,prefix,dual")
  p.add_argument("--sampler_steps", type=int, default=SAMPLER["steps"],
                 help="sampler steps; 0 = the answer length (one token per step)")
  p.add_argument("--sampler_reps", type=int, default=3, help="timed sampler calls after the first (median)")
  p.add_argument("--peak_n", type=int, default=8192, help="matrix size of the peak-rate product (--smoke: 512)")
  p.add_argument("--compute_dtype", default="bfloat16")
  p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (CPU check)")
  p.add_argument("--out", default="bench.json")
  p.add_argument("--unroll", action=argparse.BooleanOptionalAction, default=True,
                 help="unroll the layer scan (no per-layer buffer copies; docs/performance.md)")
  p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="time the train step")
  p.add_argument("--profile_dir", default="",
                 help="also trace 3 train steps and one run of each sampler per shape with jax.profiler")
  p.add_argument("--scaling", default="", help="weak scaling instead of --shapes: comma list of shape:mesh, "
                 f"mesh one of {', '.join(SCALING_MESHES)}; each at every --gpus count")
  p.add_argument("--gpus", default="1,2,4", help="device counts for --scaling (those present)")
  p.add_argument("--matmul_dtype", default="bfloat16",
                 help="comma list of bfloat16,fp8: the train step is timed with each (model.matmul_dtype)")
  p.add_argument("--fp8_check", action="store_true",
                 help="only check that XLA turns an FP8 product and its backward into FP8 GEMMs (--out: JSON, "
                      "and the optimized HLO beside it), and time the FP8 forward against bf16")
  p.add_argument("--loss_gap", default="", help="REFERENCE,OTHER run dirs (or metrics .jsonl): only write their "
                 "losses at each common logged step and OTHER's relative gap to REFERENCE to --out")
  args = p.parse_args(argv)
  matmul_dtypes = args.matmul_dtype.split(",")
  if not set(matmul_dtypes) <= {"bfloat16", "fp8"}:
    raise SystemExit(f"--matmul_dtype: {args.matmul_dtype!r} is not a comma list of bfloat16, fp8")
  if args.fp8_check:
    return [write_json(args.out, fp8_check(256 if args.smoke else args.peak_n, args.out, 0.1 if args.smoke else 3.0))]
  if args.loss_gap:
    return [write_json(args.out, loss_gap(*args.loss_gap.split(",")))]
  shapes = ["smoke"] if args.smoke else args.shapes.split(",")
  steps = 2 if args.smoke else args.steps
  samplers = sampler_grid(args, args.smoke)
  peak_n = 512 if args.smoke else args.peak_n
  peak = measure_peak_matmul(peak_n, warmup_s=0.1 if args.smoke else 3.0)
  rows, sampler_rows = [], []
  timings = [(run, dtype) for run in train_runs(args, shapes) for dtype in matmul_dtypes]
  for (shape, mesh_kind, mesh_shape), matmul_dtype in timings:
    r = bench_train(shape, remat=args.remat, loss_chunk=args.loss_chunk, steps=steps,
                    compute_dtype=args.compute_dtype, profile_dir=args.profile_dir, unroll=args.unroll,
                    mesh_shape=mesh_shape, matmul_dtype=matmul_dtype)
    r["mesh_kind"] = mesh_kind
    r["mfu"] = r["tokens_per_s_per_device"] * r["flops_per_token"] / peak
    one = next((o for o in rows if (o["shape"], o["devices"], o["matmul_dtype"]) == (shape, 1, matmul_dtype)), None)
    r["scaling_efficiency"] = r["tokens_per_s_per_device"] / one["tokens_per_s_per_device"] if one else None
    rows.append(r)
    # Kept if a time limit stops the run: each row printed, and the rows so far in --out.
    print(f"timed {shape} {matmul_dtype} on {r['mesh']}: {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} "
          f"tokens/s, compile {r['compile_s']:.0f} s, {r['fp8_gemms']} FP8 GEMMs", flush=True)
    write_json(args.out, partial_report(args, rows, []))
  add_fp8_speedups(rows)
  for shape in shapes if not args.scaling else ():
    for mode in filter(None, args.samplers.split(",")):
      for sampler in samplers:
        r = bench_sampler(shape, mode, sampler, args.compute_dtype, args.unroll, args.profile_dir, args.sampler_reps)
        sampler_rows.append(r)
        print(f"timed {shape} {mode} sampler, cache {r['cache']}, answer {r['answer']}, batch {r['batch']}: "
              f"{r['seconds']:.3f} s, first call {r['first_call_s']:.0f} s", flush=True)
        add_speedups(sampler_rows)  # each row's, so the partial file has them too
        write_json(args.out, partial_report(args, rows, sampler_rows))
  # Measured again after the work (clocks fully up); the higher reading is the conservative denominator.
  peak_after = measure_peak_matmul(peak_n, warmup_s=0.1 if args.smoke else 3.0)
  if peak_after > peak:
    for r in rows:
      r["mfu"] *= peak / peak_after
    peak = peak_after
  for r in sampler_rows:
    r["floor_s"] = r["floor_flops"] / peak if r["floor_flops"] else None
    r["x_floor"] = r["seconds"] / r["floor_s"] if r["floor_s"] else None
  device = jax.devices()[0].device_kind
  datasheet = datasheet_peak_flops(device)
  for r in rows:
    r["mfu_datasheet"] = r["tokens_per_s_per_device"] * r["flops_per_token"] / datasheet if datasheet else None
  report = {"device": device, "device_count": jax.device_count(), "backend": jax.default_backend(),
            "jax": jax.__version__, "peak_bf16_tflops": peak / 1e12,
            "datasheet_bf16_tflops": datasheet / 1e12 if datasheet else None, "train": rows, "samplers": sampler_rows,
            "args": vars(args), "date": time.strftime("%Y-%m-%d")}
  write_json(args.out, report)
  print(format_report(report))
  return rows


def partial_report(args, train_rows: list[dict], sampler_rows: list[dict]) -> dict:
  """The rows measured so far, written after each one: what a time limit leaves behind."""
  return {"partial": True, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(args),
          "date": time.strftime("%Y-%m-%d"), "train": train_rows, "samplers": sampler_rows}


def write_json(path: str, report: dict) -> dict:
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return report


def add_fp8_speedups(rows: list[dict]) -> None:
  """Each train row's `x_bfloat16`: its tokens/s over those of the bfloat16 row of the same shape and mesh."""
  plain = {(r["shape"], r["mesh"]): r["tokens_per_s"] for r in rows if r["matmul_dtype"] == "bfloat16"}
  for r in rows:
    reference = plain.get((r["shape"], r["mesh"]))
    r["x_bfloat16"] = r["tokens_per_s"] / reference if reference else None


def fp8_check(n: int, out: str, warmup_s: float) -> dict:
  """Whether XLA makes FP8 GEMMs of one FP8 projection: its forward and its two gradient products (what a
  train step runs per projection), compiled with value_and_grad; prints the verdict, loudly if it did not
  fire, writes the optimized HLO beside `out`, and times the n^3 FP8 forward (quantization included)
  against the bf16 product."""
  x, w, g = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(1), 3))
  meta = fp8.product_meta()

  def loss(x, w, meta, g):  # g: the output's gradient, an input so that XLA cannot simplify the backward
    return jnp.sum(fp8.product("md,dn->mn", x, w, meta).astype(jnp.float32) * g)

  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, w, meta, g).compile().as_text()
  hlo_path = os.path.splitext(out)[0] + ".hlo.txt"
  with open(hlo_path, "w") as f:
    f.write(hlo)
  calls = fp8_gemm_calls(hlo)
  check = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__, "n": n,
           "fp8_gemm_calls": calls, "products": 3, "fired": calls >= 3, "optimized_hlo": hlo_path,
           "fp8_forward_tflops": measure_peak_matmul(n, warmup_s=warmup_s,
                                                     product=lambda a, b: fp8.product("md,dn->mn", a, b, meta)) / 1e12,
           "bf16_tflops": measure_peak_matmul(n, warmup_s=warmup_s) / 1e12}
  print(format_fp8_check(check))
  return check


def format_fp8_check(check: dict) -> str:
  rates = (f"{check['n']}^3 forward: fp8 {check['fp8_forward_tflops']:.0f} TFLOP/s (quantization included), "
           f"bf16 {check['bf16_tflops']:.0f}")
  if check["fired"]:
    return (f"FP8 GEMM check on {check['device']}: the rewrite fired: {check['fp8_gemm_calls']} {FP8_GEMM_CALL} "
            f"calls for the 3 products of one FP8 projection (forward, 2 gradients); {rates}")
  bar = "!" * 100
  return "\n".join([bar, f"FP8 GEMM REWRITE DID NOT FIRE on {check['device']} ({check['backend']}): "
                    f"{check['fp8_gemm_calls']} {FP8_GEMM_CALL} calls for 3 products. FP8 timings then measure "
                    f"quantization overhead, not FP8 speed. Optimized HLO: {check['optimized_hlo']}", rates, bar])


def loss_gap(reference: str, other: str) -> dict:
  """Two runs' losses at each step both logged (training: window means of `log_every` steps; evaluation),
  and OTHER's relative gap to REFERENCE, (other - reference) / reference, per key."""
  report = {"reference": reference, "other": other}
  runs = read_metrics(reference), read_metrics(other)
  for key in ("loss", "nll_corrupted", "eval_loss"):
    a, b = (dict(zip(*series(rows, key))) for rows in runs)
    steps = sorted(set(a) & set(b))
    gaps = [(b[s] - a[s]) / a[s] for s in steps]
    report[key] = {"steps": steps, "reference": [a[s] for s in steps], "other": [b[s] for s in steps],
                   "relative_gap": gaps, "max_abs_relative_gap": max(map(abs, gaps), default=None)}
  print(f"{other} vs {reference}: " + "; ".join(
      f"{key} at {len(report[key]['steps'])} steps, largest |gap| {_number(report[key]['max_abs_relative_gap'], '.2%')}"
      for key in ("loss", "nll_corrupted", "eval_loss")))
  return report


def train_runs(args, shapes):
  """(shape, mesh kind, mesh shape) to time: one device per shape, or --scaling's grid."""
  if not args.train:
    return []
  if not args.scaling:
    return [(shape, "one", (1, 1, 1)) for shape in shapes]
  counts = [n for n in map(int, args.gpus.split(",")) if n <= jax.device_count()]
  runs = []
  for item in args.scaling.split(","):
    shape, _, kind = item.partition(":")
    if shape not in SHAPES or kind not in SCALING_MESHES:
      raise SystemExit(f"--scaling: {item!r} is not shape:mesh with a shape of {list(SHAPES)} and a mesh of "
                       f"{list(SCALING_MESHES)}")
    runs += [(shape, kind, SCALING_MESHES[kind](n)) for n in counts
             if all((shape, SCALING_MESHES[kind](n)) != (r[0], r[2]) for r in runs)]  # e.g. data_fsdp on 2 = fsdp
  return runs


def add_speedups(sampler_rows: list[dict]) -> None:
  """Each row's `speedup`: seconds of the uncached row of the same shape, sampler, answer and batch / its own."""
  setting = lambda r: (r["shape"], r["mode"], r["answer"], r["batch"], r["steps"])
  plain = {setting(r): r["seconds"] for r in sampler_rows if r["cache"] == "none"}
  for r in sampler_rows:
    r["speedup"] = plain[setting(r)] / r["seconds"] if setting(r) in plain else None


def _percent(x) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def _number(x, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


# What a train row written by an earlier version lacks (a report of docs/results/ JSON): it ran in bf16.
OLDER_ROW_DEFAULTS = {"matmul_dtype": "bfloat16", "fp8_gemms": 0, "x_bfloat16": None, "xla_memory_gib": None}


def format_report(report: dict) -> str:
  datasheet = report.get("datasheet_bf16_tflops")
  lines = [f"device: {report['device_count']} x {report['device']} ({report['backend']}, jax {report['jax']}); "
           f"bf16 peak: datasheet {datasheet or 'unknown'}, measured {report['peak_bf16_tflops']:.0f} TFLOP/s"
           + (" (MFU per device against each)" if report["train"] else "")]  # no MFU without a train table
  train = [OLDER_ROW_DEFAULTS | r for r in report["train"]]
  if train:
    lines += ["| shape | matmuls (FP8 GEMMs) | mesh (d x f x t) | devices | batch | step ms | tokens/s | x bf16 "
              "| tokens/s/device | weak scaling | MFU datasheet | MFU measured | peak mem GiB | XLA est. GiB "
              "| compile s |", "|---" * 15 + "|"]
  for r in train:
    fp8_gemms = f" ({r['fp8_gemms']})" if r["matmul_dtype"] == "fp8" else ""
    lines.append(f"| {r['shape']} | {r['matmul_dtype']}{fp8_gemms} | {r['mesh']} | {r['devices']} | {r['batch']} | "
                 f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {_number(r['x_bfloat16'], '.2f')} | "
                 f"{r['tokens_per_s_per_device']:,.0f} | {_percent(r['scaling_efficiency'])} "
                 f"| {_percent(r['mfu_datasheet'])} | {r['mfu']:.1%} | {_number(r['peak_memory_gib'], '.1f')} "
                 f"| {_number(r['xla_memory_gib'], '.1f')} | {r['compile_s']:.1f} |")
  if train and report["backend"] != "cpu" and any(r["peak_memory_gib"] is None for r in train):
    lines.append("peak mem n/a: that row did not raise the device's high-water mark (it cannot be reset within a "
                 "process), so its peak was at most an earlier row's; XLA's estimate is per row")
  if any(r["matmul_dtype"] == "fp8" and not r["fp8_gemms"] for r in train):
    lines.append(f"WARNING: an fp8 row's compiled step has no {FP8_GEMM_CALL} call: its matmuls did not run in FP8 "
                 f"({report['backend']}; only Hopper-class GPUs have FP8 GEMMs)")
  if report["samplers"]:
    lines += ["", "| shape | sampler | cache | answer | batch | steps | seconds | generated tok/s | passes/answer "
              "(whole rows) | speedup | floor s | x floor |", "|---" * 12 + "|"]
    for r in report["samplers"]:
      lines.append(f"| {r['shape']} | {r['mode']} | {r['cache']} | {r['answer']} | {r['batch']} | {r['steps']} | "
                   f"{r['seconds']:.3f} | {r['generated_tokens_per_s']:,.0f} | {r['passes_per_answer']:.1f} "
                   f"({r['full_passes_per_answer']:.1f}) | {_number(r['speedup'], '.2f')} | "
                   f"{_number(r['floor_s'], '.3f')} | {_number(r['x_floor'], '.2f')} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
