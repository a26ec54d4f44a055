import os; os.environ.setdefault("WANDB_MODE", "disabled"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E401,E702
import atexit  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for the session, before jax is imported: the end-to-end tests start
# many launch.py subprocesses (they inherit the environment) that compile the same tiny programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flowlm-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Every interpreter the suite starts (pytest-xdist workers, launch.py runs, mesh workers, the notebook's kernel)
# imports jax, transformers, datasets, orbax...: ~2000 modules. Where the environment sets PYTHONDONTWRITEBYTECODE
# (as on the 2-core CI machine) and the venv holds no bytecode, each one compiles them from source again
# (~6 s each, ~2.4 s once compiled). A bytecode cache private to the session, outside the tree and the venv:
if os.environ.get("PYTHONDONTWRITEBYTECODE") and "PYTHONPYCACHEPREFIX" not in os.environ:
  del os.environ["PYTHONDONTWRITEBYTECODE"]
  os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = tempfile.mkdtemp(prefix="flowlm-pycache-")
  sys.dont_write_bytecode = False  # this process too: without xdist it is the first to import jax
  atexit.register(shutil.rmtree, sys.pycache_prefix, ignore_errors=True)

# XLA's optimisation passes cost seconds per compile and the suite compiles hundreds of tiny programs whose run
# time is negligible: every test (and every launch.py subprocess, which inherits the environment) compiles with
# mesh_worker's fast flags (jax's own tests use the first two). The tests check this project's math, sharding
# and I/O, not XLA's optimiser; processes that must agree bit for bit all see the same flags.
from mesh_worker import fast_xla_flags  # noqa: E402

_given_xla_flags = os.environ.get("XLA_FLAGS", "").split()  # a flag set by the caller keeps the caller's value
_given_names = {f.split("=")[0] for f in _given_xla_flags}
_added = [f for f in fast_xla_flags() if f.split("=")[0] not in _given_names]
os.environ["XLA_FLAGS"] = " ".join(_given_xla_flags + _added)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
  """The embedded tokenizer (loaded once: importing transformers takes seconds)."""
  from flowlm_jax.tokenizer import load_tokenizer

  return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def vocab(tokenizer):
  from flowlm_jax.tokenizer import vocab_of

  return vocab_of(tokenizer)


@pytest.fixture(scope="session")
def tiny_overlay(tmp_path_factory):
  """YAML overlay turning the flowlm demo preset into a 6-step tiny run (for launch.py subprocesses)."""
  from helpers import diff_yaml, tiny_config

  c = tiny_config("flowlm")
  c.training.max_steps = 6
  c.training.save_steps = 2
  return diff_yaml("flowlm", None, c, str(tmp_path_factory.mktemp("overlay") / "tiny.yaml"))


@pytest.fixture(scope="session")
def reference_run(tiny_overlay, tmp_path_factory):
  """An uninterrupted tiny run: the baseline that resumed runs must reproduce exactly. Tests only read it.

  The pytest-xdist workers share one (the first to need it trains it, the others wait on a lock): it is the
  same deterministic run everywhere, and a launch.py start costs each worker ~10 s of a 2-core machine."""
  import fcntl

  from helpers import launch

  # Under xdist the basetemp's parent is this session's directory, shared by its workers and no one else.
  shared = "PYTEST_XDIST_WORKER" in os.environ
  root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("reference")
  workdir, done = str(root / "reference-run"), root / "reference-run.done"
  with open(root / "reference-run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # what a worker that failed here left
      r = launch("--config=configs/flowlm.py", f"--config_yaml={tiny_overlay}", f"--workdir={workdir}")
      assert r.returncode == 0, r.stderr[-3000:]
      done.touch()
  return workdir
