import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from flowlm_jax import bench
from flowlm_jax.models.llama import ModelConfig
from helpers import REPO, jit_compiles


def script(name: str):
  """A module of scripts/ (not a package: loaded from its file)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_flops_per_token_follows_the_stated_formula():
  m = ModelConfig(vocab_size=32000, num_real_tokens=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                  d_ff=2048)
  d, L, ff, V, S = 768, 12, 2048, 32000, 1024
  assert bench.train_flops_per_token(m, S) == 6 * (L * (4 * d * d + 3 * d * ff) + d * V) + 12 * L * S * d
  assert bench.forward_flops_per_token(m, S) * 3 == bench.train_flops_per_token(m, S)


def test_sampler_floor_projects_the_vocabulary_only_where_the_sampler_does():
  m = ModelConfig(vocab_size=32000, num_real_tokens=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                  d_ff=2048)
  d, L, ff, V = 768, 12, 2048, 32000
  sampler = dict(batch=2, prompt=64, answer=256, steps=8, block=32)
  T = 64 + 256
  body = 2 * L * (4 * d * d + 3 * d * ff) + 4 * L * T * d  # per position, attention over T keys
  for mode, projected in (("llada", 32), ("flowlm", 256)):
    want = 8 * 2 * (T * body + projected * 2 * d * V)
    assert abs(bench.sampler_floor_flops(m, sampler, mode) - want) <= 1e-9 * want, mode


def test_smoke_run_prints_a_table_and_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--smoke", f"--out={out}"])
  report = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert "| smoke | bfloat16 |" in printed and "x floor" in printed
  row = report["train"][0]
  assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["compile_s"] > 0
  assert row["matmul_dtype"] == "bfloat16" and row["fp8_gemms"] == 0 and row["x_bfloat16"] == 1.0
  assert row["peak_memory_gib"] is None and row["xla_memory_gib"] > 0  # a CPU has no allocator statistics
  assert {r["mode"] for r in report["samplers"]} == {"llada", "flowlm"}
  assert all(r["x_floor"] > 0 for r in report["samplers"])


def test_fp8_rows_give_their_speed_over_bf16_and_warn_when_no_fp8_gemm_ran(capsys):
  """(The fp8 train step itself: tests/test_fp8.py; the same bench path runs on the GPU, scripts/gpu_bench.sh fp8.)"""
  def row(shape, matmul_dtype, tokens_per_s, fp8_gemms=0):
    return dict(shape=shape, matmul_dtype=matmul_dtype, fp8_gemms=fp8_gemms, mesh="1x1x1", devices=1, batch=8,
                step_s=0.1, tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s, scaling_efficiency=None,
                mfu_datasheet=None, mfu=0.5, peak_memory_gib=1.0, xla_memory_gib=0.9, compile_s=2.0)
  rows = [row("1b", "bfloat16", 100.0), row("1b", "fp8", 130.0, fp8_gemms=462), row("small", "fp8", 90.0)]
  bench.add_fp8_speedups(rows)
  assert [r["x_bfloat16"] for r in rows] == [1.0, 1.3, None]
  text = bench.format_report({"device": "H200", "device_count": 1, "backend": "gpu", "jax": "0.11.2",
                              "peak_bf16_tflops": 800.0, "datasheet_bf16_tflops": 989.0, "train": rows, "samplers": []})
  assert "| 1b | fp8 (462) | 1x1x1 | 1 | 8 | 100.0 | 130 | 1.30 |" in text and "| small | fp8 (0) |" in text
  assert text.splitlines()[-1].startswith("WARNING: an fp8 row's compiled step has no __cublas$lt$matmul$f8 call")


def test_a_rows_peak_memory_is_given_only_where_the_row_raised_the_high_water_mark():
  """The allocator's peak is never reset within a process: a row after a larger one would report that one's."""
  gib = 2 ** 30
  assert bench.own_peak_gib(None, 34 * gib) == 34.0 and bench.own_peak_gib(9 * gib, 34 * gib) == 34.0
  assert bench.own_peak_gib(34 * gib, 34 * gib) is None and bench.own_peak_gib(None, None) is None
  rows = [dict(shape="1b", matmul_dtype=dtype, fp8_gemms=0, mesh="1x1x1", devices=1, batch=8, step_s=0.1,
               tokens_per_s=1.0, tokens_per_s_per_device=1.0, scaling_efficiency=None, mfu_datasheet=None, mfu=0.5,
               x_bfloat16=None, peak_memory_gib=peak, xla_memory_gib=xla, compile_s=2.0)
          for dtype, peak, xla in (("bfloat16", 34.1, 33.2), ("fp8", None, 30.5))]
  text = bench.format_report({"device": "H200", "device_count": 1, "backend": "gpu", "jax": "0.11.2",
                              "peak_bf16_tflops": 800.0, "datasheet_bf16_tflops": 989.0, "train": rows, "samplers": []})
  assert "| 34.1 | 33.2 | 2.0 |" in text and "| n/a | 30.5 | 2.0 |" in text
  assert "peak mem n/a: that row did not raise the device's high-water mark" in text


def test_fp8_check_counts_fp8_gemm_calls_and_says_loudly_when_there_are_none(tmp_path, capsys):
  out = tmp_path / "check.json"
  bench.main(["--smoke", "--fp8_check", f"--out={out}"])
  check = json.loads(out.read_text())
  assert check["backend"] == "cpu" and check["fp8_gemm_calls"] == 0 and not check["fired"]
  assert "FP8 GEMM REWRITE DID NOT FIRE" in capsys.readouterr().out
  assert "f8e4m3fn" in (tmp_path / "check.hlo.txt").read_text()  # the quantized operands are in the program
  assert bench.fp8_gemm_calls('custom_call_target="__cublas$lt$matmul$f8" ... "__cublas$lt$matmul"') == 1


def test_loss_gap_compares_two_runs_at_their_common_steps(tmp_path):
  def run(name, rows):
    (tmp_path / name).mkdir()
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "loss": 0.'  # the torn line of a kill
    (tmp_path / name / "metrics.jsonl").write_text(text)
    return str(tmp_path / name)
  a = run("bf16", [{"step": 10, "loss": 4.0, "nll_corrupted": 2.0}, {"step": 20, "loss": 2.0, "nll_corrupted": 1.0},
                   {"step": 20, "eval_loss": 3.0}])
  b = run("fp8", [{"step": 10, "loss": 4.2, "nll_corrupted": 2.0}, {"step": 20, "loss": 1.9, "nll_corrupted": 1.0},
                  {"step": 30, "loss": 1.0}, {"step": 20, "eval_loss": 3.3}])
  out = tmp_path / "gap.json"
  bench.main([f"--loss_gap={a},{b}", f"--out={out}"])
  gap = json.loads(out.read_text())
  assert gap["loss"]["steps"] == [10, 20] and gap["loss"]["other"] == [4.2, 1.9]
  assert gap["loss"]["relative_gap"] == pytest.approx([0.05, -0.05])
  assert gap["loss"]["max_abs_relative_gap"] == pytest.approx(0.05)
  assert gap["nll_corrupted"]["max_abs_relative_gap"] == 0.0
  assert gap["eval_loss"]["steps"] == [20] and gap["eval_loss"]["relative_gap"] == pytest.approx([0.1])


def test_samplers_only_run_skips_the_train_table(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--smoke", "--no-train", "--samplers=flowlm", f"--out={out}"])
  report = json.loads(out.read_text())
  assert report["train"] == [] and [r["mode"] for r in report["samplers"]] == ["flowlm"]
  assert "MFU" not in capsys.readouterr().out


def test_trace_summary_counts_stream_kernels_only():
  """GPU time by kernel class from a Perfetto trace; op-level tracks and host events are left out."""
  trace_summary = script("trace_summary")
  meta = lambda kind, pid, name, tid=0: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
  kernel = lambda name, ts, dur, pid=1, tid=7: {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}
  trace = {"traceEvents": [
      meta("process_name", 1, "/device:GPU:0"), meta("process_name", 2, "/host:CPU"),
      meta("thread_name", 1, "Stream #7(Compute)", 7), meta("thread_name", 1, "XLA Ops", 8),
      kernel("nvjet_sm90_gemm", 0, 60), kernel("cudnn_flash_fprop", 60, 30), kernel("loop_add_fusion", 90, 10),
      kernel("fusion.3", 0, 100, tid=8),        # the same time again at op level: not counted
      kernel("python_step", 0, 500, pid=2)]}    # host: not counted
  events = trace_summary.gpu_kernel_events(trace)
  assert sorted(e["name"] for e in events) == ["cudnn_flash_fprop", "loop_add_fusion", "nvjet_sm90_gemm"]
  text = trace_summary.summarise(events, top=5)
  assert "GPU busy 0.1 ms of a 0.1 ms span (0% idle); 3 kernels" in text
  assert "| gemm | 0.06 | 60.0% |" in text and "| attention | 0.03 | 30.0% |" in text


def test_long_task_set_has_right_answers_of_128_to_511_tokens(tokenizer):
  """The embedded long-answer benchmark (scripts/build_assets.py): answers follow from their prompts, fit
  answer_length 512 with their [EOS], and no test prompt is in train."""
  folder = os.path.join(REPO, "flowlm_jax", "assets", "sft_tasks_long")
  read = lambda name: [json.loads(line) for line in open(os.path.join(folder, name))]
  train, test = read("train.jsonl"), read("test.jsonl")
  assert len(test) == 200 and not {r["prompt"] for r in test} & {r["prompt"] for r in train}
  for r in test + train[::20]:
    op, *items = r["prompt"].split()
    if op == "count":
      start, step, n = map(int, items)
      want = [str(start + step * i) for i in range(n)]
    else:
      want = {"sort": sorted(items), "reverse": items[::-1], "copy": items}[op]
    assert r["task"] == op and r["answer"] == " ".join(want), r["prompt"][:40]
    assert 128 <= len(tokenizer.encode(r["answer"], add_special_tokens=False)) <= 511, r["prompt"][:40]


def test_long_task_set_rebuilds_identically_and_a_larger_training_set_keeps_its_test_records():
  """scripts/build_assets.py reproduces the shipped set, and --long-train-per-task only adds new prompts."""
  build = script("build_assets")
  folder = os.path.join(REPO, "flowlm_jax", "assets", "sft_tasks_long")
  read = lambda name: [json.loads(line) for line in open(os.path.join(folder, name))]
  train, test, heldout, confirm = build.make_sft(build.SFT_LONG, build.SFT_LONG.train_per_task)
  assert (train, test, heldout, confirm) == (read("train.jsonl"), read("test.jsonl"), [], [])
  more_train, more_test, *_ = build.make_sft(build.SFT_LONG, build.SFT_LONG.train_per_task + 50)
  assert more_test == test and len(more_train) == len(train) + 4 * 50
  assert not {r["prompt"] for r in test} & {r["prompt"] for r in more_train}


def test_held_out_and_confirmation_sets_leave_the_sets_before_them_as_they_were_and_share_no_prompt():
  build = script("build_assets")
  train, test, *_ = build.make_sft(build.SFT_LONG, 100)
  same_train, same_test, heldout, none = build.make_sft(build.SFT_LONG, 100, heldout_per_task=30)
  assert (same_train, same_test, none) == (train, test, [])
  assert [r["task"] for r in heldout] == [t for t in build.SFT_LONG.tasks for _ in range(30)]
  assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train + test}
  *same, confirm = build.make_sft(build.SFT_LONG, 100, heldout_per_task=30, confirm_per_task=20)
  assert same == [train, test, heldout]
  assert [r["task"] for r in confirm] == [t for t in build.SFT_LONG.tasks for _ in range(20)]
  assert not {r["prompt"] for r in confirm} & {r["prompt"] for r in train + test + heldout}


@pytest.mark.parametrize("flags, message", [
    (["--long-tasks-only", "--long-confirm-per-task", "5"], "--long-confirm-per-task needs --long-heldout-per-task"),
    (["--long-tasks-only", "--long-heldout-per-task", "5", "--long-confirm-per-task", "-1"],
     "--long-confirm-per-task must be >= 0, got -1"),
    (["--long-confirm-per-task", "5", "--long-heldout-per-task", "5"], "need --long-tasks-only")])
def test_build_assets_refuses_a_confirmation_set_that_would_repeat_or_break_the_others(flags, message, monkeypatch,
                                                                                       capsys, tmp_path):
  build = script("build_assets")
  monkeypatch.setattr("sys.argv", ["build_assets.py", "--out", str(tmp_path), *flags])
  with pytest.raises(SystemExit):
    build.main()
  assert message in capsys.readouterr().err


def test_sampler_grid_is_every_answer_batch_and_cache_with_one_token_per_step_by_default():
  args = types.SimpleNamespace(answers="256,512", batches="1,32", caches="none,dual", sampler_steps=0)
  grid = bench.sampler_grid(args, smoke=False)
  assert [(g["answer"], g["batch"], g["cache"]) for g in grid] == [
      (a, b, c) for b in (1, 32) for a in (256, 512) for c in ("none", "dual")]  # batch 1 (the targets') first
  assert all(g["steps"] == g["answer"] and g["block"] == 32 for g in grid)
  assert {g["steps"] for g in bench.sampler_grid(types.SimpleNamespace(**{**vars(args), "sampler_steps": 64}), False)} == {64}


def test_cached_sampler_rows_count_passes_and_compare_with_the_uncached_row(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--smoke", "--no-train", "--samplers=llada", "--caches=none,dual", f"--out={out}"])
  none, dual = json.loads(out.read_text())["samplers"]
  steps, blocks = bench.SMOKE_SAMPLER["steps"], bench.SMOKE_SAMPLER["answer"] // bench.SMOKE_SAMPLER["block"]
  assert (none["cache"], dual["cache"]) == ("none", "dual")
  assert none["passes_per_answer"] == none["full_passes_per_answer"] == dual["passes_per_answer"] == steps
  assert dual["full_passes_per_answer"] == blocks  # one refresh per block
  assert none["speedup"] == 1.0 and dual["speedup"] == none["seconds"] / dual["seconds"]
  assert none["x_floor"] > 0 and dual["floor_s"] is None  # the floor formula counts whole-row passes
  out = capsys.readouterr().out
  assert "| smoke | llada | dual | 16 | 2 | 4 |" in out
  assert "timed smoke llada sampler, cache dual, answer 16, batch 2" in out  # each row as it is measured


def test_a_stopped_sampler_grid_leaves_the_rows_measured_so_far_with_speedups(tmp_path, monkeypatch):
  out = tmp_path / "bench.json"
  measure = bench.bench_sampler
  calls = []

  def stop_at_the_third(*args, **kwargs):  # a time limit arriving during the third setting
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return measure(*args, **kwargs)

  monkeypatch.setattr(bench, "bench_sampler", stop_at_the_third)
  with pytest.raises(KeyboardInterrupt):
    bench.main(["--smoke", "--no-train", "--samplers=llada", "--caches=none,dual,prefix", f"--out={out}"])
  report = json.loads(out.read_text())
  assert report["partial"] and report["jax"] and report["args"]["caches"] == "none,dual,prefix"
  none, dual = report["samplers"]
  assert none["speedup"] == 1.0 and dual["speedup"] == none["seconds"] / dual["seconds"]


def test_fast_sampling_bins_records_by_answer_length_and_scores_tokens_at_their_position():
  fast = script("fast_sampling")
  records = [{}] * 4
  assert fast.answer_bins(records, [[7] * 5, [7] * 16, [7] * 20, [7] * 40], [32, 16]) == {16: [0], 32: [1, 2]}
  tasks = [{"task": "copy"}, {"task": "sort"}, {"task": "copy"}]
  assert fast.token_accuracy(tasks, [[1, 2, 3, 4], [5], [7, 8]], [[1, 2, 9], [5, 6], [8, 7]]) == {
      "copy": (0.5 + 0.0) / 2, "sort": 1.0, "overall": (0.5 + 1.0 + 0.0) / 3}


def test_fast_sampling_probe_scores_masked_answer_tokens_per_task_and_ratio(vocab):
  """The probe masks only answer positions and scores only the masked answer tokens, not [EOS] padding."""
  import numpy as np

  from flowlm_jax import data

  fast = script("fast_sampling")
  tokens = np.random.default_rng(0).integers(10, 50, size=(5, 12)).astype(np.int32)
  tokens[:, 9:] = vocab.eos_id                                # answers end at column 9, [EOS] padding after
  corruptible = np.arange(12)[None, :] >= np.array([3, 4, 5, 3, 4])[:, None]
  split = data.TokenizedSplit(tokens, corruptible)
  tasks = ["copy", "sort", "copy", "sort", "copy"]
  seen = []

  def right_on(rows):  # batch=5: one call with every row; the true tokens on `rows`, its input elsewhere
    return lambda x: seen.append(x) or np.where(np.isin(np.arange(5), rows)[:, None], tokens, x)

  assert fast.masked_accuracy(right_on([0, 1, 2, 3, 4]), split, tasks, [0.5, 1.0], vocab, batch=5) == {
      "copy": {0.5: 1.0, 1.0: 1.0}, "sort": {0.5: 1.0, 1.0: 1.0}}
  assert np.array_equal(seen[-1] == vocab.mask_id, corruptible)  # ratio 1: every answer column, padding too
  assert not (seen[0] == vocab.mask_id)[~corruptible].any()      # a prompt column is never masked
  assert fast.masked_accuracy(right_on([0, 2, 4]), split, tasks, [1.0], vocab, batch=5) == {
      "copy": {1.0: 1.0}, "sort": {1.0: 0.0}}
  # Predicting [MASK] back is never right; 5 rows in batches of 2 (the last one padded) all get scored.
  assert fast.masked_accuracy(lambda x: x, split, tasks, [1.0], vocab, batch=2) == {"copy": {1.0: 0.0},
                                                                                 "sort": {1.0: 0.0}}
  # [EOS] padding predicted right counts for nothing: a model right only there scores 0.
  eos_only = lambda x: np.where(tokens[:len(x)] == vocab.eos_id, vocab.eos_id, x)
  assert fast.masked_accuracy(eos_only, split, tasks, [1.0], vocab, batch=5)["copy"][1.0] == 0.0
  # By index within the answer (the whole answer masked): right on the first two answer tokens only.
  index = np.arange(12)[None, :] - np.array([3, 4, 5, 3, 4])[:, None]
  first_two = lambda x: np.where(index[:len(x)] < 2, tokens[:len(x)], x)
  assert fast.accuracy_by_index(first_two, split, tasks, vocab, [0, 2, 4, 8], batch=5) == {
      "copy": {"0-1": 1.0, "2-3": 0.0, "4-7": 0.0}, "sort": {"0-1": 1.0, "2-3": 0.0, "4-7": 0.0}}
  # An answer index no row reaches (answers are 4-6 tokens here) is None, not 0.
  assert fast.accuracy_by_index(first_two, split, tasks, vocab, [0, 8, 16], batch=5)["copy"]["8-15"] is None
  # The first k answer tokens shown: only columns from k on are masked, and the next `block` of them scored.
  seen.clear()
  shown = fast.accuracy_after_prefix(right_on([0, 1, 2, 3, 4]), split, tasks, vocab, [0, 2, 8], block=2, batch=5)
  assert shown == {"copy": {"0 shown": 1.0, "2 shown": 1.0, "8 shown": None},
                   "sort": {"0 shown": 1.0, "2 shown": 1.0, "8 shown": None}}
  assert np.array_equal(seen[1] == vocab.mask_id, corruptible & (index >= 2))
  right_on_first_three = lambda x: np.where(index[:len(x)] < 3, tokens[:len(x)], x)  # answer tokens 0-2
  assert fast.accuracy_after_prefix(right_on_first_three, split, tasks, vocab, [0, 2], block=2, batch=5) == {
      "copy": {"0 shown": 1.0, "2 shown": 0.5}, "sort": {"0 shown": 1.0, "2 shown": 0.5}}
  table = fast.format_probe({"copy": {"0-7": 0.5, "8-15": None}})
  assert table.splitlines()[0] == "| task | 0-7 | 8-15 |" and table.splitlines()[2] == "| copy | 0.500 | - |"


def _tiny_run(tokenizer, vocab, variant: str = "tasks"):
  """A loaded run as fast_sampling sees one: a preset's config, a tiny random model."""
  from flowlm_jax import config as config_lib
  from flowlm_jax import train

  m = ModelConfig(vocab_size=vocab.size, num_real_tokens=vocab.size, d_model=32, n_layers=2, n_heads=2,
                  n_kv_heads=2, d_ff=64, compute_dtype="float32")
  return types.SimpleNamespace(config=config_lib.apply_variant(config_lib.base_config(), variant),
                               graphdef=train.abstract_model(m)[0], params=bench._init_params(m),
                               tokenizer=tokenizer, vocab=vocab)


def test_fast_sampling_table_on_a_tiny_run(tokenizer, vocab):
  from flowlm_jax import evaluate

  fast = script("fast_sampling")
  run = _tiny_run(tokenizer, vocab)
  records = evaluate.load_records(limit_per_task=1)  # answers of 1-11 tokens: all decoded at 16
  args = fast.parse_args(["--workdir=unused", "--answers=16", "--caches=none,dual", "--thresholds=0", "--block=8",
                          "--batch=2"])
  saved = []  # main saves the rows after each one: a stopped run keeps what it measured
  rows = fast.measure(run, records, args, on_row=lambda rows: saved.append(len(rows)))
  assert saved == [1, 2]
  assert [(r["cache"], r["threshold"], r["records"]) for r in rows] == [("none", 0, 4), ("dual", 0, 4)]
  assert rows[0]["agreement"] == rows[0]["speedup"] == 1.0
  assert all(r["passes_per_answer"] == 16 for r in rows)
  assert [r["full_passes_per_answer"] for r in rows] == [16, 2]  # dual: one refresh per block of 8
  assert all(0 <= r["exact_match"] <= 1 and 0 <= r["token_accuracy"] <= 1 for r in rows)
  assert all(set(r["token_accuracy_by_task"]) == set(r["exact_match_by_task"]) == {"sort", "reverse", "add", "copy",
                                                                                  "overall"} for r in rows)
  table = fast.format_by_task(rows).splitlines()
  assert len(table) == 2 + len(rows) and table[0].count("|") == 4 + 4 + 1
  assert (rows[0]["exact_won"], rows[0]["exact_lost"], rows[0]["exact_change"]) == (0, 0, 0.0)
  assert fast.HEADER.splitlines()[0].count("|") == fast.format_row(rows[1]).count("|")


def test_fast_sampling_does_not_count_an_answer_with_a_stray_special_token_as_exact(tokenizer, vocab, monkeypatch):
  """The reference's tokens with a [SEP] among them are not the reference (flowlm_jax.evaluate's rule)."""
  from flowlm_jax import evaluate

  fast = script("fast_sampling")
  records = evaluate.load_records(limit_per_task=1)
  references = [tokenizer.encode(r["answer"], add_special_tokens=False) for r in records]

  def decoded(stray: bool):
    answers = np.full((len(records), 16), vocab.eos_id, np.int32)
    for row, ids in zip(answers, references):
      ids = ids[:1] + [vocab.sep_id] + ids[1:] if stray else ids
      row[:len(ids)] = ids
    return lambda *args: (1.0, dict(answer=answers, passes=np.ones(len(records)), full_passes=np.ones(len(records))), 0)

  args = fast.parse_args(["--workdir=unused", "--answers=16", "--caches=none", "--thresholds=0"])
  for stray, exact in ((False, 1.0), (True, 0.0)):
    monkeypatch.setattr(fast, "decode_all", decoded(stray))
    assert fast.measure(_tiny_run(tokenizer, vocab), records, args)[0]["exact_match"] == exact


def test_fast_sampling_runs_the_parallel_rules_with_the_caches_asked_for():
  fast = script("fast_sampling")
  args = fast.parse_args(["--workdir=unused", "--thresholds=0,0.9", "--factors=1"])
  rules = fast.parallel_rules(args)
  assert rules == [(0.0, 0.0), (0.9, 0.0), (0.0, 1.0)]
  assert [fast.rule_name(dict(threshold=t, factor=f)) for t, f in rules] == ["0", "0.9", "factor 1"]
  assert fast.settings(args) == [(cache, rule) for cache in ("none", "prefix", "dual") for rule in rules]  # default
  only_dual = fast.parse_args(["--workdir=unused", "--caches=none,dual", "--thresholds=0,0.9", "--factors=1",
                               "--parallel_caches=dual"])
  assert fast.settings(only_dual) == [("none", (0.0, 0.0)), ("dual", (0.0, 0.0)), ("dual", (0.9, 0.0)),
                                      ("dual", (0.0, 1.0))]


@pytest.mark.parametrize("flags, message", [
    (["--parallel_caches=Dual"], "--parallel_caches: Dual not in --caches none,dual"),
    (["--parallel_caches=dual", "--thresholds=0.9,0"], "--parallel_caches needs --thresholds to start with 0")])
def test_fast_sampling_refuses_parallel_caches_that_would_drop_rows_or_the_baseline(flags, message, capsys):
  fast = script("fast_sampling")
  with pytest.raises(SystemExit):
    fast.parse_args(["--workdir=unused", "--caches=none,dual", *flags])
  assert message in capsys.readouterr().err


def test_fast_sampling_compares_exact_answers_with_the_baseline_record_by_record():
  """Of 100 records, 20 right only in the baseline and 10 right only here: -10 points, whatever the 40 both
  got right. The interval is Bonett-Price's: shares 11/102 and 21/102, centre -10/102, half-width
  1.96 sqrt((32/102 - (10/102)^2) / 102) = 10.7 points."""
  fast = script("fast_sampling")
  base = np.array([True] * 40 + [True] * 20 + [False] * 10 + [False] * 30)
  here = np.array([True] * 40 + [False] * 20 + [True] * 10 + [False] * 30)
  change = fast.paired_change(base, here)
  assert (change["exact_won"], change["exact_lost"]) == (10, 20)
  assert change["exact_change"] == pytest.approx(-0.1)
  centre, half = -10 / 102, 1.96 * np.sqrt((32 / 102 - (10 / 102) ** 2) / 102)
  np.testing.assert_allclose(change["exact_change_ci95"], (centre - half, centre + half), atol=1e-12)
  assert fast.format_change(change) == "+10 -20: -10.0 [-20.5, +0.9]"
  # Nothing changed in 318 records: no change, but not a certainty of none (the rule of three says up to ~1%).
  same = fast.paired_change(np.ones(318, bool), np.ones(318, bool))
  low, high = same["exact_change_ci95"]
  assert same["exact_change"] == 0 and -0.012 < low < -0.005 and high == pytest.approx(-low)


def test_fast_sampling_compiles_the_sampler_once_for_prompts_with_and_without_padding(tokenizer, vocab, caplog):
  """A prompt that fills the bucket must not compile a second program inside the timed loop (it cost the prefix
  row at 512 on the H200 13 s of its 20 s on 2026-11-29), nor a smaller last batch (every batch-32 row)."""
  from flowlm_jax import sampling

  fast = script("fast_sampling")
  run = _tiny_run(tokenizer, vocab)
  prompts = [[7] * 5 + [vocab.sep_id], [7] * 7 + [vocab.sep_id]]  # 6 tokens (padded to 8), then 8 (fills it)
  icfg = sampling.run_config(run.config.inference, answer_length=24, steps=24, max_steps=24, block_length=8,
                             cache="dual", parallel_threshold=0.0)  # a shape no other test compiles
  with jit_compiles(caplog, "llada_sample") as compiles:
    seconds, out, timed_compiles = fast.decode_all(run, prompts, icfg, "llada", batch=1, bucket=8)
  assert len(compiles) == 1 and out["answer"].shape == (2, 24) and seconds > 0
  assert timed_compiles == 0
  # Five prompts in batches of 3: the last batch (2 rows) is another shape, compiled before the timing too.
  with jit_compiles(caplog, "llada_sample") as compiles:
    *_, out, timed_compiles = fast.decode_all(run, (prompts * 3)[:5], icfg, "llada", batch=3, bucket=8)
  assert (len(compiles), timed_compiles, out["answer"].shape) == (2, 0, (5, 24))
  # The count sees a compile inside the timed loop: a prompt longer than the bucket (another shape; the warm-up
  # takes the last batch of each size, here the cached one) compiles there.
  *_, timed_compiles = fast.decode_all(run, [prompts[0] * 2, prompts[0]], icfg, "llada", batch=1, bucket=8)
  assert timed_compiles >= 1


def test_the_samplers_first_pass_is_the_probes_forward_pass_on_the_training_rows(tokenizer, vocab):
  """tasks_long rows as trained (answer slots) and as the LLaDA sampler feeds them ([answer | prompt | pads],
  prompts bucketed): the same prompt ids, the same answer length, the same answer logits from an all-[MASK]
  answer. What the probe measures is what the sampler's first pass sees."""
  import jax.numpy as jnp
  import numpy as np

  from flowlm_jax import evaluate, likelihood, sampling
  from flowlm_jax.decoding_passes import Rows, decoding_model

  fast = script("fast_sampling")
  run = _tiny_run(tokenizer, vocab, "tasks_long")
  records = evaluate.load_records(fast.LONG_TEST_FILE, 1)
  split = evaluate.sft_rows(run, records)
  probe_logits = np.asarray(likelihood.model_logits_fn(run.graphdef, run.params, vocab.pad_id)(
      jnp.asarray(np.where(split.corruptible, vocab.mask_id, split.tokens))))
  references = [tokenizer.encode(r["answer"], add_special_tokens=False) for r in records]
  bins = fast.answer_bins(records, references, [256, 512])
  assert set(bins) == {256, 512}
  model, layers = decoding_model(run.graphdef, run.params)
  for answer_length, idx in bins.items():
    prompts = [sampling.encode_prompt(tokenizer, records[i]["prompt"], chat=False) for i in idx]
    first = split.corruptible[idx].argmax(1)
    assert [split.tokens[i, :f].tolist() for i, f in zip(idx, first)] == prompts
    assert split.corruptible[idx].sum(1).tolist() == [answer_length] * len(idx)
    prompt_BxP, length_B = sampling.pad_prompts(prompts, vocab.pad_id, 8)
    rows = Rows(model, layers, jnp.asarray(prompt_BxP), jnp.asarray(length_B), padded=True)
    sampler = np.asarray(rows.full(jnp.full((len(idx), answer_length), vocab.mask_id, jnp.int32)))
    trained = np.stack([probe_logits[i, f:f + answer_length] for i, f in zip(idx, first)])
    np.testing.assert_allclose(sampler[..., :trained.shape[-1]], trained, atol=2e-5)


def test_gpu_scripts_parse_and_all_keep_nvlink_multicast_off():
  """Each lent-GPU call costs device time: a script must not die of a syntax error there, and every one
  runs with NCCL_NVLS_ENABLE=0 (NVLink multicast can take a shared host's GPUs out of service)."""
  import glob
  import subprocess

  scripts = sorted(glob.glob(os.path.join(REPO, "scripts", "gpu_*.sh")))
  assert len(scripts) >= 4
  for path in scripts:
    result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert result.returncode == 0, f"{path}: {result.stderr}"
    with open(path) as f:
      text = f.read()
    assert os.path.basename(path) == "gpu_env.sh" or 'source "$(dirname "$0")/gpu_env.sh"' in text, path
  with open(os.path.join(REPO, "scripts", "gpu_env.sh")) as f:
    assert "export NCCL_NVLS_ENABLE=0" in f.read()


def _fake_gpu_machine(tmp_path, gpus: int) -> dict:
  """An environment whose nvidia-smi lists `gpus` GPUs and whose python3 prints the GPU settings it got, then
  sleeps $FAKE_SLEEP seconds and exits with $FAKE_RC_<section> (0 by default); as `-m flowlm_jax.export RUN
  --out DIR` it also writes a one-line DIR/model.safetensors."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "nvidia-smi").write_text(
      "#!/bin/sh\n[ \"$1\" = -L ] && { i=0; while [ $i -lt %d ]; do echo \"GPU $i: H200\"; i=$((i+1)); done; "
      "exit 0; }\necho 'name, memory'\n" % gpus)
  (bin_dir / "python3").write_text(
      "#!/bin/bash\necho \"devices=${CUDA_VISIBLE_DEVICES:-all} memory=$XLA_PYTHON_CLIENT_MEM_FRACTION\"\n"
      "sleep ${FAKE_SLEEP:-0}\n[ \"$2\" = flowlm_jax.export ] && mkdir -p \"$5\" && echo weights > \"$5/model.safetensors\"\n"
      "for a in \"$@\"; do case $a in *llada-long*) exit ${FAKE_RC_llada:-0};; "
      "*flowlm-long*) exit ${FAKE_RC_flowlm:-0};; esac; done\n")
  for tool in ("nvidia-smi", "python3"):
    (bin_dir / tool).chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}


def _run_fast_sampling_script(tmp_path, env: dict, *sections: str):
  import subprocess

  return subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_fast_sampling.sh"), *sections], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("gpus, settings", [(2, ["devices=0 memory=0.92", "devices=1 memory=0.92"]),
                                            (1, ["devices=all memory=0.45"] * 2)])
def test_gpu_fast_sampling_runs_joined_sections_side_by_side(tmp_path, gpus, settings):
  """`a+b` runs each section in a child of the script: on a GPU of its own where there is one per section,
  else sharing the GPU's memory; the script fails when a child fails."""
  env = _fake_gpu_machine(tmp_path, gpus)
  result = _run_fast_sampling_script(tmp_path, env, "quality_llada+quality_flowlm")
  assert result.returncode == 0, result.stdout + result.stderr
  got = sorted(line for line in result.stdout.splitlines() if "devices=" in line)
  assert got == sorted([f"[quality_llada] {settings[0]}", f"[quality_flowlm] {settings[1]}"])
  failing = _run_fast_sampling_script(tmp_path, {**env, "FAKE_RC_flowlm": "3"}, "quality_llada+quality_flowlm")
  assert failing.returncode == 1 and "=== quality_flowlm failed (exit 3)" in failing.stdout
  assert _run_fast_sampling_script(tmp_path, env, "no_such_section").returncode == 1


def test_gpu_fast_sampling_counts_a_training_stopped_by_its_time_limit_as_done(tmp_path):
  """A training stopped by TRAIN_TIMEOUT saves a checkpoint and resumes next call; a stopped measurement failed."""
  env = {**_fake_gpu_machine(tmp_path, 2), "FAKE_SLEEP": "5", "TRAIN_TIMEOUT": "1", "SECTION_TIMEOUT": "1"}
  assert _run_fast_sampling_script(tmp_path, env, "train_llada+train_flowlm").returncode == 0
  stopped = _run_fast_sampling_script(tmp_path, env, "quality_llada")
  assert stopped.returncode == 1 and "=== quality_llada failed (exit 124)" in stopped.stdout


def test_gpu_fast_sampling_measures_the_run_named_by_llada_run_and_exports_the_trained_one(tmp_path):
  """Quality sections read LLADA_RUN / FLOWLM_RUN (weights exported and carried back: no training again), with
  QUALITY_ARGS after the table's options; export sections write the trained runs under $OUT."""
  env = {**_fake_gpu_machine(tmp_path, 1), "LLADA_RUN": "models/llada-long", "QUALITY_ARGS": "--steps 1"}
  result = _run_fast_sampling_script(tmp_path, env, "quality_llada", "quality_flowlm", "export_llada")
  assert result.returncode == 0, result.stdout + result.stderr
  commands = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
  assert "--workdir=models/llada-long" in commands[0]
  assert commands[0].index("--limit") < commands[0].index("--steps 1") < commands[0].index("--out")
  assert "--workdir=runs/flowlm-long" in commands[1]
  assert commands[2].endswith(f"device_transfer.sh export runs/llada-long {tmp_path / 'out'}/llada-long")
  assert (tmp_path / "out" / "llada-long" / "llada-long.tar.part00").is_file()
  # The clean-prefix LLaDA run: its own directory, the option on, the same data and TRAIN_ARGS.
  env = {**env, "TRAIN_ARGS": "--config.training.max_steps=7"}
  result = _run_fast_sampling_script(tmp_path, env, "train_llada_prefix", "quality_llada_prefix")
  assert result.returncode == 0, result.stdout + result.stderr
  train, quality = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
  assert "--workdir=runs/llada-long-prefix --config.masking.clean_prefix_prob=0.5" in train
  assert train.endswith("--config.training.max_steps=7") and "--workdir=runs/llada-long-prefix " in quality
  # ... and its FlowLM twin, measured with both samplers from the run FLOWLM_PREFIX_RUN names.
  env = {**env, "FLOWLM_PREFIX_RUN": "models/flowlm-long-prefix"}
  result = _run_fast_sampling_script(tmp_path, env, "train_flowlm_prefix", "quality_flowlm_prefix")
  assert result.returncode == 0, result.stdout + result.stderr
  train, quality = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
  assert "configs/flowlm.py:tasks_long --workdir=runs/flowlm-long-prefix --config.masking.clean_prefix_prob" in train
  assert "--workdir=models/flowlm-long-prefix " in quality and "--modes llada,flowlm" in quality


def test_fast_sampling_probe_only_saves_the_probe_of_a_run_and_decodes_nothing(reference_run, tmp_path):
  from flowlm_jax.tokenizer import ASSETS_DIR

  fast = script("fast_sampling")
  out = tmp_path / "probe.json"
  assert fast.main([f"--workdir={reference_run}", f"--records={ASSETS_DIR}/sft_tasks/test.jsonl", "--limit=2",
                    "--probe_ratios=0.5,1.0", "--probe_only", f"--out={out}"]) == []
  report = json.loads(out.read_text())
  assert not report["partial"] and "rows" not in report and not os.path.exists(f"{out}.partial")
  assert (set(report["masked_accuracy"]) == set(report["accuracy_by_index"]) == set(report["accuracy_after_prefix"])
          == {"add", "copy", "reverse", "sort"})
  # "k shown" scores the by-index column of the same 32 answer tokens (there with the whole answer masked)
  assert report["accuracy_after_prefix"]["add"]["0 shown"] == report["accuracy_by_index"]["add"]["0-31"]
  assert all(f"{k}-{k + 31}" in report["accuracy_by_index"]["add"] for k in map(int, (c.split()[0] for c in
                                                                               report["accuracy_after_prefix"]["add"])))
  assert all(set(by_ratio) == {"0.5", "1.0"} and all(0 <= a <= 1 for a in by_ratio.values())
             for by_ratio in report["masked_accuracy"].values())
  assert report["accuracy_by_index"]["add"]["0-31"] is not None and report["accuracy_by_index"]["add"]["32-63"] is None


def test_gpu_fast_sampling_resume_only_refuses_to_start_a_training_from_step_0(tmp_path):
  env = {**_fake_gpu_machine(tmp_path, 2), "RESUME_ONLY": "1"}
  (tmp_path / "runs" / "llada-long" / "checkpoints").mkdir(parents=True)  # only the LLaDA run exists
  result = _run_fast_sampling_script(tmp_path, env, "train_llada+train_flowlm")
  assert result.returncode == 1
  assert "=== train_flowlm: RESUME_ONLY, but runs/flowlm-long has no checkpoint" in result.stdout
  assert any(line.startswith("[train_llada] devices=0") for line in result.stdout.splitlines())  # it resumed
