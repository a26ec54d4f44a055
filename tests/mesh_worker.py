"""Subprocess side of the mesh tests, plus the environment that simulates CPU devices.

The device count must be set before jax starts, so the tests run this file in a subprocess whose
environment `cpu_env(n)` gives (XLA_FLAGS=--xla_force_host_platform_device_count=n, CPU only, gloo
collectives, and XLA flags that cut CPU compile time ~5x). The result is one stdout line, MARKER + JSON.

  python tests/mesh_worker.py meshes WORKDIR
      A single-device reference trains STEPS steps; each mesh of MESHES trains STEPS - 1 steps on the
      same global batches with the same state rng (so the same corruption noise) and reports its losses,
      its largest parameter difference to the reference, every parameter's PartitionSpec and the Adam
      moments whose sharding differs from their parameter's. The (8, 1, 1) state is saved with
      checkpoint.Checkpointer after STEPS - 1 steps and restored on (2, 2, 2) and on one device; each
      restore reports whether every leaf equals what was saved and the loss of one more step.

  python tests/mesh_worker.py attention
      Compiles the train step of a tiny llama and a tiny ModernBERT on ATTENTION_MESHES with
      tests/attention_probe.py standing in for cuDNN attention: reports the q, k, v shardings its
      partitioner received and the compile error, if any (what a GPU compile would raise).

  python tests/mesh_worker.py split COORDINATOR PROCESS_ID   (2 processes x 4 devices)
      jax.distributed over 127.0.0.1; each process reads its rows with data.BatchIterator and
      sharding.global_batch assembles them on several meshes; reports the rows each process read and
      held and whether the assembled batch equals the single-process global batch.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
SAVE_MESH, RESTORE_MESHES = (8, 1, 1), ((2, 2, 2), (1, 1, 1))
INIT_MESH = (2, 2, 2)  # init_state is compiled on this mesh (others get the reference's initial state)
STEPS = 4
MARKER = "MESH_WORKER_RESULT "
SPLIT_MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8))
ATTENTION_MESHES = ((1, 2, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8))  # every axis, alone and combined

# Test-only compile-time savers (XLA CPU, 2 cores: a train-step compile ~10 s -> ~5 s with the first two,
# ~1.5 s with all three). The first two are what jax's own tests use (jax_disable_most_optimizations);
# jaxlib 0.10.2 knows the third but 0.11.2 aborts on it ("Unknown flag in XLA_FLAGS"), hence the probe.
FAST_XLA = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
FAST_XLA_OPTIONAL = ("--xla_cpu_use_fusion_emitters=false",)


@functools.lru_cache(maxsize=None)
def fast_xla_flags() -> tuple[str, ...]:
  """FAST_XLA plus the optional flags if XLA accepts them (an unknown XLA flag aborts the process)."""
  if set(FAST_XLA + FAST_XLA_OPTIONAL) <= set(os.environ.get("XLA_FLAGS", "").split()):
    return FAST_XLA + FAST_XLA_OPTIONAL  # probed already by a parent process (conftest.py): no second probe
  flags = " ".join(FAST_XLA + FAST_XLA_OPTIONAL)
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags})
  return FAST_XLA + FAST_XLA_OPTIONAL if probe.returncode == 0 else FAST_XLA


def cpu_env(devices: int) -> dict[str, str]:
  """Environment for a subprocess with `devices` simulated CPU devices."""
  return {"XLA_FLAGS": " ".join((f"--xla_force_host_platform_device_count={devices}", *fast_xla_flags())),
          "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "WANDB_MODE": "disabled",
          "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def run_worker(*args: str, devices: int = 8, timeout: int = 300) -> dict:
  """Runs this file in a subprocess and returns its JSON (raises with the stderr tail on failure)."""
  r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=REPO, capture_output=True, text=True,
                     timeout=timeout, env={**os.environ, **cpu_env(devices)})
  if r.returncode != 0:
    raise RuntimeError(f"mesh_worker {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}")
  return parse(r.stdout)


def parse(stdout: str) -> dict:
  """The worker's result from its stdout (other lines, e.g. gloo's connection logs, are skipped)."""
  lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
  if not lines:
    raise RuntimeError(f"no {MARKER!r} line in the worker's output:\n{stdout[-3000:]}")
  return json.loads(lines[-1][len(MARKER):])


# --- the meshes run ------------------------------------------------------------------------------


def mesh_config():
  """Tiny, float32, and every sharded dimension divisible by 8 (heads, kv heads, d_ff, vocab, d_model)."""
  from helpers import tiny_config

  c = tiny_config("flowlm")
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 64, 2, 8, 8, 128
  m.compute_dtype = m.param_dtype = "float32"
  # Adam divides by sqrt(nu) + eps: with the default 1e-8 a gradient entry of ~1e-9 turns float32
  # reduction-order noise into an O(lr) update difference. 1e-6 keeps the comparison tight.
  c.training.adam_eps = 1e-6
  c.training.batch_size = 16
  c.training.max_steps = STEPS
  c.model.loss_chunk_size = 8  # the fused chunked cross-entropy, per device on its rows (losses.py)
  return c


class Run:
  """Compiled step and shardings for one mesh (compiled once, reused by the checkpoint restores)."""

  def __init__(self, setup, shape):
    import jax
    import numpy as np
    from flowlm_jax import sharding, train

    c = setup.config
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
    self.mesh = sharding.make_mesh(c, jax.devices()[:int(np.prod(shape))])
    assert tuple(self.mesh.shape.values()) == shape, (dict(self.mesh.shape), shape)
    self.setup = setup
    graphdef, abstract_model_state = train.abstract_model(setup.model_cfg)
    self.tx, _ = train.make_optimizer(c.training, setup.total_steps, abstract_model_state)
    self.shardings = train.state_shardings(setup.model_cfg, self.tx, self.mesh)
    self.step, _ = train.compile_steps(graphdef, self.tx, setup.step_cfg, self.shardings, self.mesh)

  def init(self):
    from flowlm_jax import train
    return train.init_state(self.setup.model_cfg, self.tx, self.setup.config.training.seed, self.shardings)

  def place(self, host_state):
    """A host copy of a state put onto this mesh."""
    import jax
    return jax.device_put(host_state, self.shardings)

  def abstract(self):
    import jax
    from flowlm_jax import checkpoint as ckpt_lib
    return ckpt_lib.abstract_state(jax.eval_shape(self.init), self.shardings)

  def train(self, state, batches):
    from flowlm_jax import sharding
    losses = []
    for batch in batches:
      state, metrics = self.step(state, sharding.global_batch(batch, self.mesh))
      losses.append(float(metrics["loss"]))
    return state, losses


def spec_of(array) -> list:
  """An array's PartitionSpec as a list of length ndim (tuples of axes as lists)."""
  spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
  return [list(s) if isinstance(s, tuple) else s for s in spec]


def moment_mismatches(state) -> tuple[int, list[str]]:
  """Adam mu/nu leaves checked, and those whose sharding or shape differs from their parameter's."""
  import jax
  from flowlm_jax import sharding

  checked, bad = 0, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    keys = [sharding._key(k) for k in path]
    if not {"mu", "nu"} & set(keys):
      continue
    param = state.params[keys[-1]]
    checked += 1
    if leaf.sharding != param.sharding or leaf.shape != param.shape:
      bad.append(f"{'/'.join(map(str, keys))}: {leaf.sharding} vs {param.sharding}")
  return checked, bad


def max_diff(a, b) -> float:
  import jax
  import numpy as np
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def count_over(a, b, tol: float) -> int:
  """Entries of two trees that differ by more than `tol`."""
  import jax
  import numpy as np
  return sum(int(np.sum(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) > tol))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def identical(a, b) -> bool:
  import jax
  import numpy as np
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def name(shape) -> str:
  return "x".join(map(str, shape))


def meshes(workdir: str) -> dict:
  import jax
  import numpy as np
  from flowlm_jax import checkpoint as ckpt_lib
  from flowlm_jax import loop, sharding

  t0 = time.perf_counter()
  setup = loop.prepare(mesh_config())
  batches = [next(setup.iterator) for _ in range(STEPS - 1)]
  data_state = setup.iterator.state()  # saved with the checkpoint: the next batch is batches[-1]
  batches.append(next(setup.iterator))
  out = {"device_count": jax.device_count(), "meshes": {}, "restores": {}}

  ref = Run(setup, (1, 1, 1))
  initial = jax.device_get(ref.init())
  state, ref_losses = ref.train(ref.place(initial), batches[:-1])
  ref_params = jax.device_get(state.params)
  state, last = ref.train(state, batches[-1:])
  out["reference"] = {"losses": ref_losses + last}

  runs, saved = {(1, 1, 1): ref}, None
  for shape in MESHES:
    run = runs[shape] = Run(setup, shape)
    if shape == INIT_MESH:  # parameters created directly in their shards equal the unsharded ones
      state = run.init()
      out["init_identical"] = {name(shape): identical(jax.device_get(state), initial)}
    else:
      state = run.place(initial)
    state, losses = run.train(state, batches[:-1])
    checked, bad = moment_mismatches(state)
    out["meshes"][name(shape)] = {
        "losses": losses, "max_param_diff": max_diff(state.params, ref_params),
        "params_over_1e-5": count_over(state.params, ref_params, 1e-5),
        "param_count": sum(int(np.size(p)) for p in ref_params.values()),
        "specs": {k: spec_of(p) for k, p in state.params.items()},
        "opt_moments_checked": checked, "opt_moment_mismatches": bad,
        "batch_spec": spec_of(sharding.global_batch(batches[0], run.mesh)["tokens"])}
    if shape == SAVE_MESH:
      saved = jax.device_get(state)
      ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
      ckpt.save(STEPS - 1, state, data_state, {})
      ckpt.close()
      state, last = run.train(state, batches[-1:])
      out["saved_next_loss"] = last[0]

  for shape in RESTORE_MESHES:
    run = runs[shape]
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step, state, restored_data = ckpt.restore_latest_good(run.abstract())
    ckpt.close()
    wrong = [jax.tree_util.keystr(p) for (p, a), s in
             zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(run.shardings)) if a.sharding != s]
    restored = jax.device_get(state)
    setup.iterator.restore(restored_data)
    batch = next(setup.iterator)
    state, last = run.train(state, [batch])
    out["restores"][name(shape)] = {
        "step": step, "state_step": int(restored.step), "identical": identical(restored, saved),
        "max_param_diff": max_diff(restored.params, saved.params), "wrong_shardings": wrong,
        "next_batch_matches": all(np.array_equal(batch[k], batches[-1][k]) for k in batch),
        "next_loss": last[0]}
  out["seconds"] = round(time.perf_counter() - t0, 1)
  return out


# --- what reaches the attention kernel ------------------------------------------------------------


def modernbert_mesh_config():
  """The tiny ModernBERT fixture (4 heads, d_model 32) as a training run."""
  c = mesh_config()
  fixture = os.path.join(HERE, "fixtures", "modernbert_tiny")
  c.model.family, c.model.pretrained, c.model.tokenizer = "modernbert", fixture, fixture
  return c


def attention_shardings() -> dict:
  """{family: {mesh: {"calls": [{q, k, v specs}, ...], "error": str}}}: the train step compiled with
  attention_probe's stand-in for cuDNN attention (its partitioner's checks, its sharding rule)."""
  import jax
  import jax.numpy as jnp
  import attention_probe
  from flowlm_jax import loop, sharding

  kernel, jax.nn.dot_product_attention = jax.nn.dot_product_attention, attention_probe.probed_attention
  out = {}
  try:
    for family, config in (("llama", mesh_config), ("modernbert", modernbert_mesh_config)):
      setup = loop.prepare(config())
      rows, length = setup.config.training.batch_size, setup.config.dataset.max_length
      out[family] = {}
      for shape in ATTENTION_MESHES:
        run = Run(setup, shape)
        batch_sh = sharding.batch_sharding(run.mesh)
        batch = {"tokens": jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sh),
                 "corruptible": jax.ShapeDtypeStruct((rows, length), jnp.bool_, sharding=batch_sh)}
        attention_probe.CALLS.clear()
        result = out[family][name(shape)] = {}
        try:
          run.step.lower(run.abstract(), batch).compile()
        except Exception as e:  # noqa: BLE001 - reported to the test
          result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result["calls"] = [dict(call) for call in attention_probe.CALLS]
  finally:
    jax.nn.dot_product_attention = kernel
  return out


# --- the two-process data split ------------------------------------------------------------------


def split(coordinator: str, process_id: int) -> dict:
  import jax
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)

  import numpy as np
  from jax.experimental import multihost_utils
  from flowlm_jax import config as config_lib, data, sharding

  rows, length, batch_size = 40, 4, 8
  tokens = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
  split_ = data.TokenizedSplit(tokens=tokens, corruptible=np.ones_like(tokens, bool))
  mine = data.BatchIterator(split_, batch_size, seed=3, process_index=jax.process_index(),
                            process_count=jax.process_count())
  whole = data.BatchIterator(split_, batch_size, seed=3)
  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "local_device_count": jax.local_device_count(), "meshes": {}}
  c = config_lib.base_config()
  for shape in SPLIT_MESHES:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
    mesh = sharding.make_mesh(c)
    mine.restore({"epoch": 0, "position": 1})
    whole.restore({"epoch": 0, "position": 1})
    local, expected = next(mine), next(whole)
    result = {"read_rows": sorted(int(r) for r in local["tokens"][:, 0] // length)}
    try:
      batch = sharding.global_batch(local, mesh)
    except ValueError as e:
      result["error"] = str(e)
    else:
      gathered = multihost_utils.process_allgather(batch["tokens"], tiled=True)
      result["held_rows"] = sharding.process_rows(mesh, batch_size).tolist()
      result["global_shape"] = list(batch["tokens"].shape)
      result["equals_single_process_batch"] = bool(np.array_equal(gathered, expected["tokens"]))
    out["meshes"][name(shape)] = result
  return out


# --- two processes restoring a damaged newest step -------------------------------------------------------


def damaged(coordinator: str, process_id: int, directory: str, delay: str, only_process_1: str = "") -> dict:
  """Both processes restore from `directory` (steps 1 and 2, step 2 damaged); process 1 looks at the step
  directory `delay` seconds later than process 0 (a slower host), which may by then have renamed it aside.
  `only_process_1`: step 2 is whole, but process 1's reads of it fail as a damaged file of its own would, inside
  Orbax's restores (the config's, then the state's: process 0, reading fine, goes on to their closing barriers)."""
  import jax
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
  import os
  import time

  import orbax.checkpoint as ocp

  from flowlm_jax import checkpoint as ckpt_lib, loop, train
  from helpers import tiny_config

  if only_process_1 and process_id == 1:
    read = ocp.Checkpointer._restore

    def damaged_on_this_host(self, directory, *args, **kwargs):
      if os.path.basename(str(directory)) == "2":
        raise FileNotFoundError(f"{directory}/state/ocdbt.process_1/d/0: truncated")
      return read(self, directory, *args, **kwargs)
    ocp.Checkpointer._restore = damaged_on_this_host

  setup = loop.prepare(tiny_config("flowlm"))
  _, abstract_model = train.abstract_model(setup.model_cfg)
  tx, _ = train.make_optimizer(setup.config.training, 20, abstract_model)
  abstract = ckpt_lib.restore_target(setup.model_cfg, tx, train.state_shardings(setup.model_cfg, tx, setup.mesh))
  ckpt_lib.RETRY_DELAYS_S = (0.0, 0.0)
  if process_id == 1 and float(delay):
    isdir = os.path.isdir
    os.path.isdir = lambda path: (time.sleep(float(delay)), isdir(path))[1]
  ckpt = ckpt_lib.Checkpointer(directory, async_save=bool(only_process_1))  # Orbax's asynchronous checkpointer too
  # With a config to check, as a resumed run restores: process 1 then fails in the first of two Orbax restores.
  config_dict = ckpt.read_config(1) if only_process_1 else None
  found = ckpt.restore_latest_good(abstract, config_dict=config_dict)
  ckpt.close()
  return {"restored": found[0], "listing": sorted(os.listdir(directory))}


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  if mode == "meshes":
    result = meshes(*args)
  elif mode == "attention":
    result = attention_shardings()
  elif mode == "split":
    result = split(args[0], int(args[1]))
  elif mode == "damaged":
    result = damaged(args[0], int(args[1]), *args[2:])
  else:
    raise SystemExit(f"unknown mode {mode!r}")
  sys.stdout.write(f"\n{MARKER}{json.dumps(result)}\n")  # one write: other output (gloo logs) can't split it
  sys.stdout.flush()
