"""Multi-GPU checks for one host (docs/scaling.md): every mesh trains like one GPU, checkpoints move
between meshes, and one process per GPU logs the same losses as one process driving them all.

  python scripts/pod_check.py meshes --out meshes.json
      One process, all visible GPUs. A 1-GPU reference trains STEPS steps of a small bf16 llama (and the
      tiny ModernBERT fixture); each mesh in MESHES that fits the GPU count trains the same global batches
      with the same noise from the same initial state. Reports the losses' largest relative difference
      to the reference, whether the compiled step calls cuDNN's fused attention, and: a checkpoint saved
      on one mesh after SAVE_AT steps, restored on others, continuing to the reference's losses.
  python scripts/pod_check.py processes --gpus 4 --out processes.json
      launch.py on a small preset: one process driving GPUs 0..n-1, then n processes with one GPU each
      (--coordinator_address=127.0.0.1:PORT --num_processes=n --process_id=i, CUDA_VISIBLE_DEVICES=i);
      compares their metrics.jsonl losses and step throughput.
  python scripts/pod_check.py faults --gpus 2 --out faults.json
      One process per GPU through two pod faults: the test prompts sampled at each evaluation (answers split
      over the processes), and a relaunch after process 1's own file of the newest checkpoint was truncated
      (every process sets that step aside and restores the one before, without a hang).
  python scripts/pod_check.py big --gpus 4 --out 8b.json
      The `8b` preset (LLaDA-8B shape) with FSDP over the GPUs: tries each (remat, global batch) of
      BIG_CHOICES until one fits, trains BIG_STEPS steps, saves the sharded checkpoint, restores it, and
      checks the restored state's next loss equals the live state's. Run it with
      XLA_PYTHON_CLIENT_MEM_FRACTION set to hold each GPU to 80 GB.
  python scripts/pod_check.py report --out report.md RESULT.json ...
      Markdown tables of the results above (and of bench --scaling JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # mesh_worker.Run: the tests' mesh harness, shared

STEPS, SAVE_AT = 20, 10
MESHES = {  # name -> (data, fsdp, tensor)
    "data2": (2, 1, 1), "fsdp2": (1, 2, 1), "tensor2": (1, 1, 2),
    "data4": (4, 1, 1), "fsdp4": (1, 4, 1), "tensor4": (1, 1, 4), "data2xfsdp2": (2, 2, 1), "fsdp2xtensor2": (1, 2, 2),
}
MODERNBERT_MESHES = ("fsdp2", "fsdp4", "data2xfsdp2")
SAVE_MESH, RESTORE_MESHES = "fsdp4", ("tensor2", "data2xfsdp2", "one")
ATTENTION = "cudnn"  # --attention: "auto" lets the script run on simulated CPU devices too


def llama_config():
  from helpers import tiny_config

  c = tiny_config("llada")
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 256, 4, 8, 8, 768
  m.compute_dtype, m.attention = "bfloat16", ATTENTION
  c.dataset.max_length, c.training.batch_size, c.training.max_steps = 256, 16, STEPS
  c.dataset.max_train_examples = 0
  c.training.learning_rate, c.training.adam_eps = 1e-3, 1e-6
  return c


def modernbert_config():
  c = llama_config()
  fixture = os.path.join(REPO, "tests", "fixtures", "modernbert_tiny")
  c.model.family, c.model.pretrained, c.model.tokenizer = "modernbert", fixture, fixture
  return c


def uses_cudnn_attention(run, state, batch) -> bool:
  return "cudnn$fmha" in run.step.lower(state, batch).compile().as_text()


def train_family(config, mesh_names, checkpoints: str | None) -> dict:
  import jax
  import numpy as np
  from flowlm_jax import checkpoint as ckpt_lib
  from flowlm_jax import loop, sharding
  from mesh_worker import Run

  setup = loop.prepare(config())
  batches = [next(setup.iterator) for _ in range(STEPS)]
  ref = Run(setup, (1, 1, 1))
  initial = jax.device_get(ref.init())
  _, ref_losses = ref.train(ref.place(initial), batches)
  out = {"reference": ref_losses, "meshes": {}, "restores": {}}
  runs = {"one": ref}
  for mesh_name in mesh_names:
    shape = MESHES[mesh_name]
    if int(np.prod(shape)) > jax.device_count():
      continue
    run = runs[mesh_name] = Run(setup, shape)
    t0 = time.perf_counter()
    state = run.place(initial)
    cudnn = uses_cudnn_attention(run, state, sharding.global_batch(batches[0], run.mesh))
    state, losses = run.train(state, batches[:SAVE_AT])
    if mesh_name == SAVE_MESH and checkpoints:
      saver = ckpt_lib.Checkpointer(checkpoints, async_save=False)
      saver.save(SAVE_AT, state, {"epoch": 0, "position": SAVE_AT}, {})
      saver.close()
    state, more = run.train(state, batches[SAVE_AT:])
    losses += more
    out["meshes"][mesh_name] = {"losses": losses, "max_rel_diff": _rel(losses, ref_losses), "cudnn": cudnn,
                                "seconds": round(time.perf_counter() - t0, 1)}
  if checkpoints and os.path.isdir(checkpoints):
    for mesh_name in RESTORE_MESHES:
      if mesh_name not in runs:
        continue
      run = runs[mesh_name]
      reader = ckpt_lib.Checkpointer(checkpoints, async_save=False)
      state, _ = reader.restore(SAVE_AT, run.abstract())
      reader.close()
      _, losses = run.train(state, batches[SAVE_AT:])
      out["restores"][f"{SAVE_MESH}->{mesh_name}"] = {"losses": losses,
                                                      "max_rel_diff": _rel(losses, ref_losses[SAVE_AT:])}
  return out


def _rel(a, b) -> float:
  return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def meshes(args) -> dict:
  import jax

  out = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}
  with tempfile.TemporaryDirectory() as tmp:
    out["llama"] = train_family(llama_config, list(MESHES), os.path.join(tmp, "llama"))
  out["modernbert"] = train_family(modernbert_config, MODERNBERT_MESHES, None)
  return out


# --- one process per GPU ---------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_args(workdir: str, gpus: int) -> list[str]:
  return [sys.executable, os.path.join(REPO, "launch.py"), "--config=configs/llada.py", f"--workdir={workdir}",
          "--config.model.compute_dtype=bfloat16", f"--config.model.attention={ATTENTION}",
          f"--config.training.max_steps={STEPS}", "--config.training.save_steps=1000",
          "--config.logging.log_every=1", "--config.logging.progress_bar=False", "--config.evaluation.eval_steps=0",
          f"--config.mesh.data=1", f"--config.mesh.fsdp={gpus}"]


def _losses(workdir: str) -> dict[int, dict]:
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        rows[row["step"]] = row
  return rows


def processes(args) -> dict:
  env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    one = os.path.join(tmp, "one")
    t0 = time.perf_counter()
    r = subprocess.run(_launch_args(one, args.gpus), env={**env, "CUDA_VISIBLE_DEVICES": ",".join(
        map(str, range(args.gpus)))}, capture_output=True, text=True, timeout=args.timeout)
    out["one_process_s"] = round(time.perf_counter() - t0, 1)
    if r.returncode != 0:
      return {**out, "error": f"single process exited {r.returncode}: {r.stderr[-2000:]}"}
    many = os.path.join(tmp, "many")
    port = _free_port()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_launch_args(many, args.gpus) + [
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={args.gpus}", f"--process_id={i}"],
        env={**env, "CUDA_VISIBLE_DEVICES": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(args.gpus)]
    results = [p.communicate(timeout=args.timeout) for p in procs]
    out["processes_s"] = round(time.perf_counter() - t0, 1)
    bad = [(i, p.returncode, err[-1500:]) for i, (p, (_, err)) in enumerate(zip(procs, results)) if p.returncode]
    if bad:
      return {**out, "error": f"processes failed: {bad}"}
    a, b = _losses(one), _losses(many)
    steady = lambda rows: sorted(r["tokens_per_second"] for s, r in rows.items() if s > 3)[len(rows) // 2 - 2]
    out.update({"steps": sorted(a) == sorted(b) == list(range(1, STEPS + 1)),
                "losses_one": [a[s]["loss"] for s in sorted(a)], "losses_many": [b[s]["loss"] for s in sorted(b)],
                "max_rel_diff": _rel([b[s]["loss"] for s in sorted(b)], [a[s]["loss"] for s in sorted(a)]),
                "median_tokens_per_s_one": steady(a), "median_tokens_per_s_many": steady(b)})
  return out


def _run_processes(args, workdir: str, more: list[str]) -> list[tuple[int, str, str]]:
  """launch.py as one process per GPU (jax.distributed on 127.0.0.1): (exit code, stdout, stderr) of each."""
  env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
  port = _free_port()
  procs = [subprocess.Popen(_launch_args(workdir, args.gpus) + more + [
      f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={args.gpus}", f"--process_id={i}"],
      env={**env, "CUDA_VISIBLE_DEVICES": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(args.gpus)]
  try:
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:  # both read at once: no pipe stalls a collective
      outputs = list(pool.map(lambda p: p.communicate(timeout=args.timeout), procs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def faults(args) -> dict:
  """One process per GPU through two faults of a pod job: (1) the test prompts sampled at every evaluation, as
  many prompts as GPUs (answers split over the processes); (2) process 1's own checkpoint file of the newest
  step truncated, then the same command relaunched: every process must agree to set that step aside, restore
  the one before and finish (not hang)."""
  out = {}
  sampling = ["--config.training.save_steps=2", "--config.evaluation.eval_steps=2", "--config.inference.at_evaluation=True",
              "--config.inference.every_steps=0", *[f"--config.inference.test_prompts=prompt {i}" for i in range(args.gpus)]]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    t0 = time.perf_counter()
    first = _run_processes(args, workdir, ["--config.training.max_steps=4", *sampling])
    out["first_s"], out["first_exit_codes"] = round(time.perf_counter() - t0, 1), [r[0] for r in first]
    out["first_errors"] = [err[-800:] for code, _, err in first if code]
    samples = os.path.join(workdir, "samples.jsonl")
    with open(samples) if os.path.isfile(samples) else contextlib.nullcontext([]) as f:
      rows = [json.loads(line) for line in f]
    out["sampled_steps"] = sorted({r["step"] for r in rows})
    out["samples_per_step"] = len(rows) // max(len(out["sampled_steps"]), 1)
    files = glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_1", "d", "*"))
    if not files:
      return {**out, "error": "no ocdbt.process_1 data files in step 4"}
    damaged = max(files, key=os.path.getsize)
    with open(damaged, "r+b") as f:
      f.truncate(min(1000, os.path.getsize(damaged) // 2))
    t0 = time.perf_counter()
    again = _run_processes(args, workdir, ["--config.training.max_steps=6", *sampling])
    out["relaunch_s"], out["relaunch_exit_codes"] = round(time.perf_counter() - t0, 1), [r[0] for r in again]
    out["relaunch_errors"] = [err[-800:] for code, _, err in again if code]
    out["set_aside_on"] = [i for i, (_, _, err) in enumerate(again) if "is damaged" in err and "moved to" in err]
    out["resumed_from"] = [line for _, stdout, _ in again[:1] for line in stdout.splitlines() if "resumed from" in line]
    out["checkpoints"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  return out


# --- report -----------------------------------------------------------------------------------


def report(paths: list[str]) -> str:
  lines = []
  for path in paths:
    name = os.path.basename(path)
    try:
      with open(path) as f:
        r = json.load(f)
    except (OSError, ValueError) as e:
      lines.append(f"{name}: unreadable ({e})")
      continue
    if "llama" in r:
      lines += [f"### meshes ({len(r['devices'])} x {r['devices'][0]}, jax {r['jax']}): first {STEPS} losses vs 1 GPU",
                "| family | mesh | cuDNN attention | max relative loss diff | seconds |", "|---|---|---|---|---|"]
      for family in ("llama", "modernbert"):
        for mesh, m in r.get(family, {}).get("meshes", {}).items():
          lines.append(f"| {family} | {mesh} | {m['cudnn']} | {m['max_rel_diff']:.2e} | {m['seconds']} |")
        for move, m in r.get(family, {}).get("restores", {}).items():
          lines.append(f"| {family} | checkpoint {move}, steps {SAVE_AT + 1}-{STEPS} | | {m['max_rel_diff']:.2e} | |")
    elif "one_process_s" in r:
      if "error" in r:
        lines.append(f"{name}: {r['error'][:500]}")
        continue
      lines += [f"### {name}: one process per GPU vs one process", "| | value |", "|---|---|",
                f"| same steps logged | {r['steps']} |", f"| max relative loss diff | {r['max_rel_diff']:.2e} |",
                f"| median tokens/s, one process | {r['median_tokens_per_s_one']:,.0f} |",
                f"| median tokens/s, one process per GPU | {r['median_tokens_per_s_many']:,.0f} |"]
    elif "first_exit_codes" in r:
      lines += [f"### {name}: pod faults, one process per GPU", "| | value |", "|---|---|",
                f"| exit codes, training with test prompts sampled at evaluations | {r['first_exit_codes']} |",
                f"| steps sampled, answers per step | {r.get('sampled_steps')}, {r.get('samples_per_step')} |",
                f"| exit codes, relaunch after process 1's file of step 4 was truncated | {r.get('relaunch_exit_codes')} |",
                f"| processes that set step 4 aside | {r.get('set_aside_on')} |",
                f"| resumed | {'; '.join(r.get('resumed_from') or []) or r.get('error', '-')} |",
                f"| checkpoints after | {', '.join(r.get('checkpoints', []))} |"]
    elif "attempts" in r:
      lines += ["### 8b preset, FSDP", "| remat | batch | step s | tokens/s/GPU | MFU (989) | peak GiB | save s "
                "| restore s | next loss live / restored | note |", "|---" * 10 + "|"]
      for a in r["attempts"]:
        if "error" in a:
          lines.append(f"| {a['remat']}, unroll {a.get('scan_unroll')} | {a['batch_size']} | | | | | | | | "
                       f"{a.get('compiled_gib')} {a['error'][:120]} |")
          continue
        lines.append(f"| {a['remat']}, unroll {a.get('scan_unroll')} | {a['batch_size']} | {a['step_s']:.2f} | {a['tokens_per_s_per_gpu']:,.0f} | "
                     f"{a['mfu_datasheet']:.1%} | {a['peak_memory_gib']:.1f} | {a.get('save_s')} | {a.get('restore_s')} | "
                     f"{a.get('live_next_loss')} / {a.get('restored_next_loss')} | {a.get('checkpoint_gb')} GB |")
    elif "train" in r:
      from flowlm_jax import bench
      lines.append(bench.format_report(r))
    lines.append("")
  return "\n".join(lines)


# --- the 8b preset ------------------------------------------------------------------------------

BIG_STEPS = 32
# (remat, global batch, layers per scan iteration): B_dev 2 or 4 on 4 GPUs. The preset unrolls its 32
# layers; under fsdp a rolled scan gathers one layer's weights at a time.
BIG_CHOICES = (("save_dots", 8, 1), ("full", 16, 1), ("save_dots", 8, 32), ("full", 8, 1))


def big(args) -> dict:
  import jax
  import numpy as np
  from flowlm_jax import checkpoint as ckpt_lib
  from flowlm_jax import loop, sharding, train
  from helpers import load_preset

  out = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "attempts": []}
  for remat, batch_size, unroll in BIG_CHOICES:
    c = load_preset("llada", "8b")
    c.model.remat, c.training.batch_size, c.training.max_steps = remat, batch_size, BIG_STEPS + 1
    c.model.scan_unroll = unroll
    c.mesh.data, c.mesh.fsdp = 1, args.gpus
    c.logging.wandb.mode = "disabled"
    s = loop.prepare(c)
    graphdef, abstract_model_state = train.abstract_model(s.model_cfg)
    tx, _ = train.make_optimizer(c.training, s.total_steps, abstract_model_state)
    shardings = train.state_shardings(s.model_cfg, tx, s.mesh)
    step_fn, _ = train.compile_steps(graphdef, tx, s.step_cfg, shardings, s.mesh)
    attempt = {"remat": remat, "batch_size": batch_size, "scan_unroll": unroll, "seq_len": c.dataset.max_length,
               "mesh": dict(s.mesh.shape)}
    out["attempts"].append(attempt)
    try:
      t0 = time.perf_counter()
      state = train.init_state(s.model_cfg, tx, 0, shardings)
      batches = [sharding.global_batch(next(s.iterator), s.mesh) for _ in range(BIG_STEPS + 1)]
      compiled = step_fn.lower(state, batches[0]).compile()
      attempt["init_and_compile_s"] = round(time.perf_counter() - t0, 1)
      memory = compiled.memory_analysis()
      attempt["compiled_gib"] = {k: round(getattr(memory, f"{k}_size_in_bytes") / 2**30, 1)
                                 for k in ("argument", "output", "alias", "temp")}
      print(attempt, flush=True)
      times, losses = [], []
      for batch in batches[:BIG_STEPS]:
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step: per-step wall time
        times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - an out-of-memory attempt moves on to the next choice
      attempt["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      state = None
      jax.clear_caches()
      continue
    step_s = float(np.median(times[2:]))
    tokens = batch_size * c.dataset.max_length
    flops = _train_flops_per_token(s.model_cfg, c.dataset.max_length)
    attempt.update({"losses": losses, "step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s / args.gpus,
                    "mfu_datasheet": tokens / step_s / args.gpus * flops / 989e12,
                    "peak_memory_gib": max(d.memory_stats()["peak_bytes_in_use"] for d in jax.local_devices()) / 2**30,
                    "params_b": sum(int(np.prod(p.shape)) for p in state.params.values()) / 1e9})
    directory = os.path.join(args.checkpoint_dir, f"{remat}-{batch_size}")
    try:
      _save_and_restore(attempt, directory, state, s, compiled, batches[BIG_STEPS],
                        ckpt_lib.restore_target(s.model_cfg, tx, shardings))
    except Exception as e:  # noqa: BLE001 - reported with the training figures
      attempt["checkpoint_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    break
  return out


def _save_and_restore(attempt: dict, directory: str, state, s, compiled, batch, target) -> None:
  """Saves `state` (synchronously), restores it into `target`'s shardings, and compares one more step."""
  import jax
  from flowlm_jax import checkpoint as ckpt_lib

  saver = ckpt_lib.Checkpointer(directory, async_save=False)
  t0 = time.perf_counter()
  saver.save(BIG_STEPS, state, s.iterator.state(), {})
  saver.wait()
  attempt["save_s"] = round(time.perf_counter() - t0, 1)
  attempt["checkpoint_gb"] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
                                       for f in fs) / 1e9, 1)
  _, live = compiled(state, batch)  # donates `state`; the new state is dropped at once (no room for two)
  attempt["live_next_loss"] = float(live["loss"])
  del _
  t0 = time.perf_counter()
  restored, _ = saver.restore(BIG_STEPS, target)
  jax.block_until_ready(restored)
  attempt["restore_s"] = round(time.perf_counter() - t0, 1)
  saver.close()
  attempt["restored_next_loss"] = float(compiled(restored, batch)[1]["loss"])


def _train_flops_per_token(model_cfg, seq_len: int) -> float:
  from flowlm_jax import bench
  return bench.train_flops_per_token(model_cfg, seq_len)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("mode", choices=["meshes", "processes", "faults", "big", "report"])
  p.add_argument("results", nargs="*", help="report: JSON files")
  p.add_argument("--checkpoint_dir", default="/tmp/pod_check_8b")
  p.add_argument("--gpus", type=int, default=2)
  p.add_argument("--timeout", type=int, default=400)
  p.add_argument("--attention", default="cudnn")
  p.add_argument("--out", required=True)
  args = p.parse_intermixed_args()
  global ATTENTION
  ATTENTION = args.attention
  if args.mode == "report":
    text = report(args.results)
    with open(args.out, "w") as f:
      f.write(text)
    print(text)
    return
  result = {"meshes": meshes, "processes": processes, "faults": faults, "big": big}[args.mode](args)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result)[:3000])


if __name__ == "__main__":
  main()
