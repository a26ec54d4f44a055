"""wandb tracking (logging.py): offline runs under the workdir, history and samples table, no network.

The offline run is read back from its `.wandb` file (W&B's LevelDB-style record log of protobuf
`Record`s) with a small reader below: wandb 0.31 no longer ships `wandb.sdk.internal.datastore`, and
offline runs write no `wandb-summary.json`.
"""

import glob
import json
import logging
import os
import struct
import zlib
from unittest.mock import ANY

import pytest

from flowlm_jax.logging import MetricsLogger
from helpers import launch, metrics_rows, tiny_config

DEAD_URL = "http://127.0.0.1:9"  # nothing listens on the discard port: any network attempt fails loudly
# What a network attempt would leave in wandb's logs or our stderr.
NETWORK_ERRORS = ("connection refused", "connectionerror", "max retries", "127.0.0.1:9", "network error",
                  "failed to connect", "dial tcp", "name resolution", "api.wandb.ai", "timed out")


def wandb_env(root) -> dict[str, str]:
  """Offline wandb with every directory it uses under `root` and an unreachable server."""
  root = str(root)
  return {"WANDB_MODE": "offline", "WANDB_DIR": os.path.join(root, "dir"), "WANDB_DATA_DIR": os.path.join(root, "data"),
          "WANDB_CACHE_DIR": os.path.join(root, "cache"), "WANDB_CONFIG_DIR": os.path.join(root, "config"),
          "WANDB_BASE_URL": DEAD_URL, "WANDB_API_KEY": "", "WANDB_SILENT": "true",
          "HTTP_PROXY": DEAD_URL, "HTTPS_PROXY": DEAD_URL, "NO_PROXY": ""}


# --- reading an offline run -------------------------------------------------------------------

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str):
  """Yields the protobuf `Record`s of a `.wandb` file, checking every chunk's CRC."""
  from wandb.proto import wandb_internal_pb2 as pb

  with open(path, "rb") as f:
    buf = f.read()
  ident, magic, version = struct.unpack("<4sHB", buf[:_HEADER])
  assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb record log"
  pos, pending = _HEADER, b""
  while pos + _HEADER <= len(buf):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # block trailer padding
      pos += left
      continue
    crc, length, kind = struct.unpack("<IHB", buf[pos:pos + _HEADER])
    if (crc, length, kind) == (0, 0, 0):  # zero padding up to the next block
      pos += left
      continue
    data = buf[pos + _HEADER:pos + _HEADER + length]
    assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad checksum at byte {pos}"
    pos += _HEADER + length
    if kind == _FULL:
      chunk = data
    elif kind == _FIRST:
      pending = data
      continue
    elif kind == _MIDDLE:
      pending += data
      continue
    elif kind == _LAST:
      chunk, pending = pending + data, b""
    else:
      raise AssertionError(f"{path}: unknown chunk type {kind}")
    record = pb.Record()
    record.ParseFromString(chunk)
    yield record


def offline_run(workdir: str) -> dict:
  """{"dir", "run" (RunRecord), "history" ({_step: {key: value}}), "config"} of the one offline run in workdir."""
  files = glob.glob(os.path.join(workdir, "wandb", "**", "offline-run-*", "run-*.wandb"), recursive=True)
  assert len(files) == 1, f"expected one offline wandb run under {workdir}/wandb, found {files}"
  history, run = {}, None
  for record in wandb_records(files[0]):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run = record.run
    elif kind == "history":
      row = {}
      for item in record.history.item:
        key = item.key or "/".join(item.nested_key)
        row[key] = json.loads(item.value_json)
      history.setdefault(int(row["_step"]), {}).update(row)
  assert run is not None, f"{files[0]} holds no run record (not flushed yet?)"
  config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
  return {"dir": os.path.dirname(files[0]), "run": run, "history": history, "config": config}


def assert_no_network_errors(*texts: str, paths=(), except_line: str = ""):
  """`except_line`: a line that may name the network (our own fallback notice, also in wandb's output.log)."""
  for path in paths:
    with open(path, errors="replace") as f:
      texts += (f.read(),)
  for text in texts:
    lowered = text.replace(except_line, "").lower() if except_line else text.lower()
    hits = [e for e in NETWORK_ERRORS if e in lowered]
    assert not hits, f"network trouble mentioned ({hits}):\n{text[-2000:]}"


# --- in process: MetricsLogger ----------------------------------------------------------------


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
  env = wandb_env(tmp_path / "wandb-home")
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  return env


def test_offline_logger_writes_history_and_samples_table_under_the_workdir(tmp_path, offline_env):
  from flowlm_jax.logging import MetricsLogger

  c = tiny_config()
  c.logging.wandb.mode = "offline"
  c.logging.wandb.tags = ["t1"]
  workdir = str(tmp_path / "my-run")
  logger = MetricsLogger(workdir, c)
  assert logger._wandb_run is not None, "wandb did not start offline"
  logger.write({"step": 1, "loss": 2.5, "accuracy_mask": 0.25})
  logger.write({"step": 2, "loss": 2.0, "accuracy_mask": 0.5})
  logger.write({"step": 2, "eval_loss": 2.25})
  rows = [{"mode": "llada", "prompt": "add 1 2", "answer": "3"}, {"mode": "flowlm", "prompt": "add 1 2", "answer": "4"}]
  logger.samples(2, rows)
  logger.close()
  # wandb 0.31's finish() returns before the service has flushed the offline .wandb file (it can still be
  # just its 7-byte header); shutting the service down flushes it, as process exit does after a launch.
  import wandb
  wandb.teardown()

  run = offline_run(workdir)
  assert run["run"].display_name == "my-run" and run["run"].project == "flowlm-jax"
  assert list(run["run"].tags) == ["t1"]
  assert run["history"][1]["loss"] == 2.5 and run["history"][1]["accuracy_mask"] == 0.25
  assert run["history"][2]["loss"] == 2.0 and run["history"][2]["eval_loss"] == 2.25
  table = run["history"][2]
  assert table["samples/_type"] == "table-file" and table["samples/nrows"] == 2
  with open(os.path.join(run["dir"], "files", table["samples/path"])) as f:
    saved = json.load(f)
  assert saved["columns"] == ["mode", "prompt", "answer"]
  assert saved["data"] == [["llada", "add 1 2", "3"], ["flowlm", "add 1 2", "4"]]
  assert run["config"]["training"]["batch_size"] == c.training.batch_size
  assert_no_network_errors(paths=glob.glob(os.path.join(workdir, "wandb", "**", "*.log"), recursive=True))
  # The jsonl files are written as well.
  assert metrics_rows(workdir)[2]["loss"] == 2.0
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    assert [json.loads(line)["answer"] for line in f] == ["3", "4"]


def test_wandb_that_fails_to_start_never_stops_logging(tmp_path, offline_env, monkeypatch, caplog):
  import wandb
  from flowlm_jax.logging import MetricsLogger

  def refuse(**kwargs):
    raise wandb.errors.UsageError("api_key not configured (no-tty)")

  monkeypatch.setattr(wandb, "init", refuse)
  c = tiny_config()
  c.logging.wandb.mode = "online"
  with caplog.at_level(logging.WARNING):
    logger = MetricsLogger(str(tmp_path / "w"), c)
    logger.write({"step": 1, "loss": 1.0})
    logger.samples(1, [{"mode": "llada", "prompt": "p", "answer": "a"}])
    logger.close()
  assert logger._wandb_run is None
  assert "could not start" in caplog.text and "continuing without it" in caplog.text
  assert metrics_rows(str(tmp_path / "w"))[1]["loss"] == 1.0


def test_wandb_that_fails_mid_run_is_dropped_once(tmp_path, caplog):
  from flowlm_jax.logging import MetricsLogger

  class Broken:
    calls = 0

    def log(self, values, step=None):
      Broken.calls += 1
      raise RuntimeError("disk full")

    def finish(self):
      pass

  c = tiny_config()
  logger = MetricsLogger(str(tmp_path / "w"), c)
  logger._wandb_run = Broken()
  with caplog.at_level(logging.WARNING):
    logger.write({"step": 1, "loss": 1.0})
    logger.write({"step": 2, "loss": 0.5})
  logger.close()
  assert Broken.calls == 1 and caplog.text.count("logging failed") == 1
  assert sorted(metrics_rows(str(tmp_path / "w"))) == [1, 2]


def test_logger_of_a_resumed_run_drops_rows_beyond_the_restored_step(tmp_path):
  rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}, {"step": 3, "loss": 3.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # killed
  (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 3, "answer": "x"}) + "\n")
  logger = MetricsLogger(str(tmp_path), tiny_config(), start_step=2)
  logger.write({"step": 3, "loss": 3.5})
  logger.close()
  assert metrics_rows(str(tmp_path)) == {1: rows[0], 2: rows[1], 3: {"step": 3, "loss": 3.5, "time": ANY}}
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 2, 3]
  assert (tmp_path / "samples.jsonl").read_text() == ""


def test_log_model_uploads_every_saved_checkpoint_once_it_is_committed(tmp_path, monkeypatch):
  from flowlm_jax import loop

  uploads = []

  class Recorder(MetricsLogger):
    logs_model = True

    def checkpoint_saved(self, step, path):
      uploads.append((step, os.path.isfile(os.path.join(path, "commit_success.txt"))))

  monkeypatch.setattr(loop, "MetricsLogger", Recorder)
  c = tiny_config("flowlm", save_steps=2, async_checkpointing=True)
  loop.run(c, str(tmp_path / "w"))
  assert uploads == [(2, True), (4, True), (6, True)]


def test_wandb_mode_in_the_environment_can_only_make_tracking_more_private(tmp_path, offline_env, monkeypatch):
  import wandb
  from flowlm_jax.logging import MetricsLogger

  modes = []
  monkeypatch.setattr(wandb, "init", lambda **kwargs: modes.append(kwargs["mode"]))
  c = tiny_config()
  c.logging.wandb.mode = "online"
  monkeypatch.setenv("WANDB_MODE", "offline")
  MetricsLogger(str(tmp_path / "a"), c).close()
  monkeypatch.setenv("WANDB_MODE", "disabled")
  MetricsLogger(str(tmp_path / "b"), c).close()
  assert modes == ["offline"]


WANDB_DIR_VARS = ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")


def test_a_second_run_in_one_process_keeps_its_wandb_files_under_its_own_workdir(tmp_path, offline_env, monkeypatch):
  """A notebook that trains twice: the second run's wandb directories are its own workdir's, not the first's;
  a directory the user set stays as it was for both."""
  import wandb
  from flowlm_jax.logging import MetricsLogger

  for var in WANDB_DIR_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "mine"))
  seen = []
  monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.append({v: os.environ.get(v) for v in WANDB_DIR_VARS}))
  c = tiny_config()
  c.logging.wandb.mode = "offline"
  for name in ("a", "b"):
    MetricsLogger(str(tmp_path / name), c).close()
  assert [s["WANDB_DIR"] for s in seen] == [str(tmp_path / "a"), str(tmp_path / "b")]
  assert [s["WANDB_DATA_DIR"] for s in seen] == [str(tmp_path / n / "wandb") for n in "ab"]
  assert [s["WANDB_CONFIG_DIR"] for s in seen] == [str(tmp_path / "mine")] * 2


def test_redact_drops_secret_keys_and_env_secret_values(monkeypatch):
  from flowlm_jax.logging import redact

  monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value")
  config = {"logging": {"wandb": {"api_key": "abc", "project": "p"}}, "hub_token": "t", "tokenizer": "embedded",
            "notes": ["s3cr3t-value", "fine"], "password": "x"}
  assert redact(config) == {"logging": {"wandb": {"api_key": "<redacted>", "project": "p"}}, "hub_token": "<redacted>",
                            "tokenizer": "embedded", "notes": ["<redacted>", "fine"], "password": "<redacted>"}


# --- end to end: launch.py --------------------------------------------------------------------


@pytest.mark.integration
def test_launch_online_run_without_key_or_server_ends_up_offline_with_metrics_and_samples(tiny_overlay, tmp_path):
  workdir = str(tmp_path / "run")
  env = {**wandb_env(tmp_path / "wandb-home"), "WANDB_MODE": "online"}  # no key, no server
  r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}",
             "--config.logging.wandb.mode=online", "--config.training.max_steps=2",
             "--config.inference.every_steps=2", env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  fallback = [line for line in r.stderr.splitlines() if "wandb" in line]
  assert len(fallback) == 1 and "cannot track online" in fallback[0], r.stderr[-3000:]
  assert_no_network_errors(r.stdout, r.stderr, except_line=fallback[0])

  run = offline_run(workdir)
  assert os.path.commonpath([run["dir"], workdir]) == workdir
  assert run["run"].display_name == "run"
  assert fallback[0].endswith(f"`wandb sync {run['dir']}`")
  train = metrics_rows(workdir)
  evals = metrics_rows(workdir, "eval_loss")
  assert sorted(train) == [1, 2] and sorted(evals) == [2]
  for step, row in train.items():
    for key in ("loss", "grad_norm", "learning_rate", "accuracy", "accuracy_mask", "accuracy_ratio_gt_0.75"):
      assert run["history"][step][key] == pytest.approx(row[key]), (step, key)
  for key in ("eval_loss", "eval_accuracy", "eval_accuracy_random"):
    assert run["history"][2][key] == pytest.approx(evals[2][key]), key

  table = run["history"][2]
  assert table["samples/_type"] == "table-file", table
  with open(os.path.join(run["dir"], "files", table["samples/path"])) as f:
    saved = json.load(f)
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  assert saved["columns"] == ["mode", "prompt", "answer"]
  assert len(saved["data"]) == len(samples) == 2 * len(tiny_config().inference.test_prompts)  # x 2 modes
  assert [row[:2] for row in saved["data"]] == [[s["mode"], s["prompt"]] for s in samples]
  assert {s["step"] for s in samples} == {2}

  logs = glob.glob(os.path.join(workdir, "wandb", "**", "*.log"), recursive=True)
  logs += glob.glob(os.path.join(env["WANDB_DIR"], "**", "*.log"), recursive=True)
  assert_no_network_errors(paths=logs, except_line=fallback[0])


# --- online without a key or a server: offline in the workdir, nothing lost --------------------


def _log_a_short_run(workdir, c):
  logger = MetricsLogger(workdir, c)
  for step in (1, 2):
    logger.write({"step": step, "loss": 3.0 / step})
  logger.write({"step": 2, "eval_loss": 2.75})
  logger.close()
  import wandb
  wandb.teardown()  # flushes the offline record log (see the first test)
  return logger


@pytest.mark.parametrize("api_key", ["", "k" * 40], ids=["no key", "key but no server"])
def test_online_run_without_key_or_server_falls_back_to_offline_with_its_history(tmp_path, offline_env, monkeypatch,
                                                                                  caplog, api_key):
  monkeypatch.delenv("WANDB_MODE")  # nothing in the environment forces offline: the config asks for online
  monkeypatch.setenv("WANDB_API_KEY", api_key)
  c = tiny_config()
  c.logging.wandb.mode = "online"
  workdir = str(tmp_path / "w")
  with caplog.at_level(logging.WARNING):
    _log_a_short_run(workdir, c)
  run = offline_run(workdir)
  assert {s: {k: v for k, v in row.items() if not k.startswith("_")} for s, row in run["history"].items()} == {
      1: {"step": 1, "loss": 3.0}, 2: {"step": 2, "loss": 1.5, "eval_loss": 2.75}}
  warnings = [r.getMessage() for r in caplog.records if r.name == "flowlm_jax.logging"]
  assert len(warnings) == 1 and "cannot track online" in warnings[0] and "127.0.0.1:9" in warnings[0], warnings
  # Without a key, wandb is not even asked: it would prompt on a terminal and wait there
  assert ("no API key for 127.0.0.1:9" in warnings[0]) == (not api_key)
  assert warnings[0].endswith(f"`wandb sync {run['dir']}`")


def test_online_run_the_server_refuses_is_tracked_offline(tmp_path, offline_env, monkeypatch, caplog):
  from flowlm_jax import logging as logging_lib

  monkeypatch.delenv("WANDB_MODE")
  monkeypatch.setenv("WANDB_API_KEY", "")
  monkeypatch.setattr(logging_lib, "_unreachable", lambda url: None)  # the server answers, but refuses the key
  monkeypatch.setattr(logging_lib, "_no_api_key", lambda url: None)
  c = tiny_config()
  c.logging.wandb.mode = "online"
  workdir = str(tmp_path / "w")
  with caplog.at_level(logging.WARNING):
    _log_a_short_run(workdir, c)
  assert offline_run(workdir)["history"][2]["eval_loss"] == 2.75
  assert "cannot track online (UsageError" in caplog.text and "wandb sync" in caplog.text


def test_metrics_rows_are_strict_json_and_keep_small_values(tmp_path):
  """A learning rate of 2e-6 is logged as itself (not 0 after rounding to decimal places); a non-finite value as
  null (bare NaN is not JSON: strict readers reject the whole file)."""
  import numpy as np

  from flowlm_jax.logging import MetricsLogger

  c = tiny_config()
  c.logging.wandb.mode = "disabled"
  logger = MetricsLogger(str(tmp_path / "w"), c)
  logger.write({"step": 1, "learning_rate": 1.8834e-6, "grad_norm": np.float32("nan"), "loss": np.float32(2.5),
                "tokens": 4096})
  logger.close()
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    row = json.loads(f.readline(), parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
  assert (row["learning_rate"], row["grad_norm"], row["loss"], row["tokens"]) == (1.8834e-6, None, 2.5, 4096)
