"""Where metrics go: `WORKDIR/metrics.jsonl`, `WORKDIR/samples.jsonl` and (optionally) wandb; and how the
figures, reports and the bench read metrics.jsonl back (`read_metrics`, `series`).

Only process 0 writes. wandb is imported lazily and defaults to offline with its files under the workdir;
`online` without a key or a server falls back to offline there (one warning naming the `wandb sync`
command). Any other failure of it is reported once and then ignored: tracking never stops training.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import time
from typing import Any

from flowlm_jax.errors import first_line

log = std_logging.getLogger(__name__)

SECRET_ENV_VARS = ("WANDB_API_KEY",)

Rows = list[dict]  # metrics.jsonl rows


class MetricsLogger:
  """`start_step`: rows of later steps (a previous attempt of this run beyond its restored checkpoint) are
  dropped from metrics.jsonl and samples.jsonl first, so that no step appears twice."""

  def __init__(self, workdir: str, config, *, is_main: bool = True, start_step: int = 0):
    self.workdir = workdir
    self.is_main = is_main
    self._wandb_run = None
    self._wandb_config = config.logging.wandb
    self.offline_run_dir = None  # a wandb run kept on disk: `wandb sync` it to upload it
    if not is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    for name in ("metrics.jsonl", "samples.jsonl"):
      _drop_rows_after(os.path.join(workdir, name), start_step)
    self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._samples = open(os.path.join(workdir, "samples.jsonl"), "a", buffering=1)
    if self._wandb_config.mode != "disabled":
      self._wandb_run = _start_wandb(workdir, config)
      if self._wandb_run is not None and getattr(self._wandb_run, "offline", False):
        self.offline_run_dir = self._wandb_run.sync_dir

  def write(self, row: dict[str, Any]) -> None:
    if not self.is_main:
      return
    row = {"time": round(time.time(), 3), **{k: _plain(v) for k, v in row.items()}}
    self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
    self._to_wandb({k: v for k, v in row.items() if k != "time" and v is not None}, step=row.get("step"))

  def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
    """Decoded inference examples: one JSON line each, and a wandb.Table."""
    if not self.is_main or not rows:
      return
    for r in rows:
      self._samples.write(json.dumps({"step": step, **r}) + "\n")
    if self._wandb_run is not None:
      try:
        import wandb
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
      except Exception as e:  # noqa: BLE001 - tracking must never stop training
        log.warning("wandb: could not build the samples table at step %d: %s", step, e)
        return
      self._to_wandb({"samples": table}, step=step)

  @property
  def logs_model(self) -> bool:
    return self._wandb_run is not None and self._wandb_config.log_model

  def checkpoint_saved(self, step: int, path: str) -> None:
    """Uploads a committed checkpoint as a version of the run's model artifact (wandb.log_model)."""
    if not self.logs_model:
      return
    try:
      import wandb
      artifact = wandb.Artifact(f"{self._wandb_run.id}-model", type="model", metadata={"step": step})
      artifact.add_dir(path)
      self._wandb_run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
      log.warning("wandb: could not log checkpoint %d as an artifact: %s", step, e)

  def _to_wandb(self, values: dict[str, Any], step) -> None:
    if self._wandb_run is None:
      return
    try:
      self._wandb_run.log(values, step=step)
    except Exception as e:  # noqa: BLE001
      log.warning("wandb: logging failed, disabling it for this run: %s", e)
      self._wandb_run = None

  def close(self) -> None:
    if not self.is_main:
      return
    self._metrics.close()
    self._samples.close()
    if self._wandb_run is not None:
      try:
        self._wandb_run.finish()
      except Exception as e:  # noqa: BLE001
        log.warning("wandb: finish failed: %s", e)


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites a .jsonl file without rows of steps > `step` (and without a line cut short by a kill)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except ValueError:
      pass
  if len(keep) != len(lines) or any(not line.endswith("\n") for line in lines):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


# Seconds allowed to find the tracking server before an online run falls back to offline, and (a backstop)
# for wandb.init online itself: with a key but no server, wandb retries until its init_timeout (90 s default).
ONLINE_PROBE_TIMEOUT = 5.0
ONLINE_INIT_TIMEOUT = 30.0


# The WANDB_*_DIR values this process set itself: a later run (a notebook's second) moves them to its own workdir,
# while a value the user set stays.
_WANDB_DIRS_SET: dict[str, str] = {}


def _keep_wandb_files_under(workdir: str) -> None:
  """Every wandb file (run, staging, cache) under the workdir unless the user pointed them elsewhere; wandb puts
  runs in `<dir>/wandb/`: dir=workdir gives `workdir/wandb/offline-run-*`."""
  wandb_dir = os.path.join(workdir, "wandb")
  os.makedirs(wandb_dir, exist_ok=True)
  wanted = {"WANDB_DIR": workdir, **dict.fromkeys(("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"), wandb_dir)}
  for var, path in wanted.items():
    if var not in os.environ or os.environ[var] == _WANDB_DIRS_SET.get(var):
      os.environ[var] = _WANDB_DIRS_SET[var] = path


def _start_wandb(workdir: str, config):
  w = config.logging.wandb
  mode = w.mode
  # WANDB_MODE=disabled|offline in the environment wins over the config (it may only make tracking more
  # private): wandb itself lets an explicit `mode=` argument beat the variable.
  env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
  if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
    return None
  if env_mode in ("offline", "dryrun") and mode == "online":
    mode = "offline"
  _keep_wandb_files_under(workdir)
  try:
    import wandb
  except ImportError as e:
    log.warning("wandb: cannot import it (%s); continuing without it", e)
    return None

  def init(mode: str, timeout: float):
    return wandb.init(
        project=w.project, name=w.name or os.path.basename(os.path.abspath(workdir)), entity=w.entity or None,
        tags=list(w.tags), mode=mode, dir=workdir, config=redact(config.to_dict()),
        settings=wandb.Settings(init_timeout=timeout, login_timeout=ONLINE_PROBE_TIMEOUT, silent=True))

  why_not_online = None
  if mode == "online":
    base_url = wandb.setup().settings.base_url
    # Without a key wandb asks for one on the terminal and waits (or, stdin closed, raises KeyboardInterrupt).
    why_not_online = _no_api_key(base_url) or _unreachable(base_url)
    if why_not_online is None:
      try:
        return init("online", ONLINE_INIT_TIMEOUT)
      except Exception as e:  # noqa: BLE001 - no key, key refused, server trouble: track offline instead
        why_not_online = first_line(e)
    mode = "offline"
  try:
    run = init(mode, ONLINE_INIT_TIMEOUT)
  except Exception as e:  # noqa: BLE001 - a broken wandb install or disk: train anyway
    log.warning("wandb: could not start (%s); continuing without it", first_line(e))
    return None
  if why_not_online is not None:  # one line, with what to run once the network or key is there
    log.warning("wandb: cannot track online (%s): logging offline instead; upload it later with `wandb sync %s`",
                why_not_online, run.sync_dir)
  return run


def _no_api_key(url: str) -> str | None:
  """Why there is no wandb API key for `url` (None: $WANDB_API_KEY, or a ~/.netrc / $NETRC entry for its host)."""
  import netrc
  import urllib.parse

  if os.environ.get("WANDB_API_KEY"):
    return None
  parsed = urllib.parse.urlparse(url)
  try:
    if netrc.netrc(os.environ.get("NETRC")).authenticators(parsed.hostname or url):
      return None
  except (OSError, netrc.NetrcParseError):
    pass
  return f"no API key for {parsed.netloc or url} (set WANDB_API_KEY or run `wandb login`)"


def _unreachable(url: str, timeout: float = ONLINE_PROBE_TIMEOUT) -> str | None:
  """Why the tracking server at `url` cannot be reached (None: it answered, whatever the status)."""
  import urllib.error
  import urllib.request

  try:
    urllib.request.urlopen(url, timeout=timeout).close()  # honours HTTP(S)_PROXY, as wandb does
  except urllib.error.HTTPError:
    return None  # an HTTP answer (401, 404, ...): the server is there
  except (OSError, ValueError) as e:
    reason = getattr(e, "reason", e)
    return f"{url} unreachable: {reason}"
  return None


def format_samples(rows: list[dict[str, Any]]) -> str:
  """Decoded answers for a console, a prompt's modes together: `  [llada ] 'prompt' -> 'answer'`."""
  width = max(len(r["mode"]) for r in rows)
  lines = []
  for prompt in dict.fromkeys(r["prompt"] for r in rows):
    lines += [f"  [{r['mode']:<{width}}] {prompt!r} -> {r['answer']!r}" for r in rows if r["prompt"] == prompt]
  return "\n".join(lines)


def redact(obj: Any) -> Any:
  """Drops values that look like secrets (env-var values, keys named *key*/*token*/*secret*)."""
  secrets = {os.environ[v] for v in SECRET_ENV_VARS if os.environ.get(v)}
  if isinstance(obj, dict):
    return {k: "<redacted>" if _is_secret_key(k) else redact(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [redact(v) for v in obj]
  if isinstance(obj, str) and obj in secrets:
    return "<redacted>"
  return obj


def _is_secret_key(key: str) -> bool:
  words = ("api_key", "token", "secret", "password")
  key = key.lower()
  return key in words or key.endswith(tuple("_" + w for w in words))


def _plain(v: Any) -> Any:
  """JSON-able Python value from numpy/jax scalars: floats to 7 significant digits (a learning rate of 2e-6 stays
  itself, not 0 after rounding to decimal places), and a non-finite one as null (bare NaN is not JSON)."""
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
    v = v.item()
  if isinstance(v, float):
    return float(f"{v:.7g}") if math.isfinite(v) else None
  return v


# --- reading metrics.jsonl back -------------------------------------------------------------


def metrics_path(workdir: str) -> str:
  return workdir if workdir.endswith(".jsonl") else os.path.join(workdir, "metrics.jsonl")


def read_metrics(workdir: str) -> Rows:
  """The rows of `WORKDIR/metrics.jsonl` (or of a .jsonl path). A torn last line (a killed run) is skipped."""
  path = metrics_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics file: {path}")
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, sorted by step. A step logged twice (a resumed run redoing steps after its
  last checkpoint) keeps the later value."""
  by_step = {}
  for row in rows:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      by_step[int(row["step"])] = float(value)
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]
