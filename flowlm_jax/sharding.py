"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel whose replicas also split parameters and
optimiser state, ZeRO-3 style), `tensor` (attention heads and MLP hidden split, Megatron style).
Batches are split over data x fsdp. A dimension whose size the mesh axes do not divide stays
replicated (e.g. 2 KV heads on a tensor axis of 8), so every config runs on every mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowlm_jax import config as config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "bias": None,
}


def make_mesh(c, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(c, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def single_device_mesh(device=None) -> Mesh:
  device = jax.devices()[0] if device is None else device
  return Mesh(np.asarray([device]).reshape(1, 1, 1), MESH_AXES)


def logical_to_spec(logical_axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for one array; dims the mesh axes do not divide are replicated."""
  spec = []
  for name, size in zip(logical_axes, shape):
    target = LOGICAL_RULES.get(name)
    if target is None:
      spec.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    ways = math.prod(mesh.shape[a] for a in axes)
    spec.append((axes[0] if len(axes) == 1 else axes) if ways > 1 and size % ways == 0 else None)
  return P(*spec)


def param_shardings(model_state, mesh: Mesh):
  """NamedShardings for an `nnx.State` of Params, as a pure dict matching `nnx.to_pure_dict`."""
  from flax import nnx

  def one(var):
    axes = var.get_metadata().get("logical_axes") or (None,) * var.get_value().ndim
    return NamedSharding(mesh, logical_to_spec(axes, var.get_value().shape, mesh))

  return nnx.to_pure_dict(jax.tree.map(one, model_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def like_params(tree, params_shardings, mesh: Mesh):
  """Shardings for a tree (an optimiser state) whose param-shaped subtrees mirror the params.

  A leaf whose key path ends with a parameter's key path (and has its shape) takes that parameter's
  sharding; everything else (step counters, scalars) is replicated.
  """
  by_path = {tuple(_key(k) for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(params_shardings)}
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = tuple(_key(k) for k in path)
    for n in range(len(keys), 0, -1):
      sharding = by_path.get(keys[-n:])
      if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def _key(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def traced_on(mesh: Mesh, fn):
  """`fn`, traced with `mesh` as the context mesh: what activation constraints (below) read."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def mesh_of(tree) -> Mesh | None:
  """The mesh a tree of arrays is sharded over (the first multi-device NamedSharding's), if any."""
  for leaf in jax.tree.leaves(tree):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None


def batch_rows_spec(rows: int):
  """The mesh axes that split `rows` batch rows in the context mesh (BATCH_AXES), or None: outside a
  mesh, on one device, or where data x fsdp is 1 or does not divide the rows."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
  return BATCH_AXES if ways > 1 and rows % ways == 0 else None


def attention_spec(batch: int, heads: int, kv_heads: int) -> P | None:
  """The one layout of q, k and v [B, T, heads, head_dim] in the context mesh; None outside one.

  Rows over data x fsdp, heads over tensor, sequence and head_dim whole: cuDNN's fused attention
  (jax's custom partitioner) rejects anything else — q, k, v whose shardings differ, or a split of
  the sequence or head_dim — while sharding propagation alone can give k and v another layout than q
  (under fsdp the projections' d_model split offers several). Heads split only when the tensor axis
  divides both head counts (grouped-query attention), rows only when data x fsdp divides them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or mesh.size == 1:
    return None
  rows = batch_rows_spec(batch)
  tensor = mesh.shape["tensor"]
  split_heads = tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0
  return P(rows, None, "tensor" if split_heads else None, None)


def constrain_attention_inputs(q, k, v):
  """q, k, v pinned to `attention_spec` (unchanged outside a mesh context)."""
  spec = attention_spec(q.shape[0], q.shape[2], k.shape[2])
  if spec is None:
    return q, k, v
  return tuple(jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
  """Sorted indices of the global batch rows that this process's devices hold (rows split over data x fsdp)."""
  rows = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values():
    rows.update(range(*index[0].indices(global_rows)))
  return np.asarray(sorted(rows), dtype=np.int64)


@functools.lru_cache(maxsize=16)
def check_process_split(mesh: Mesh, global_rows: int) -> None:
  """Raises unless every process holds its own 1/process_count of each global batch.

  data.BatchIterator gives process p its own rows, so no two processes may hold the same rows: the
  batch axes (data x fsdp) must split over the processes, i.e. `tensor` (and any axis the batch is
  replicated over) stays within a process. Process p's rows then land on its own devices: at rows
  [p·B/P, (p+1)·B/P) of the global batch when the mesh orders devices by process (CPU, GPU), else at
  other positions (the same rows, permuted). Without this check a batch replicated over processes that
  read different rows is silently inconsistent (and half its size).
  """
  count = jax.process_count()
  if count == 1:
    return
  held = len(process_rows(mesh, global_rows))
  if global_rows % count or held != global_rows // count:
    raise ValueError(
        f"mesh {dict(mesh.shape)}: each of the {count} processes must hold its own {global_rows // count} of the "
        f"{global_rows} rows of a batch, but this process's devices hold {held} rows: make mesh.data x mesh.fsdp "
        f"a multiple of the process count and keep mesh.tensor within one host")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's rows (rows split over data x fsdp)."""
  sharding = batch_sharding(mesh)
  local_rows = len(next(iter(local_batch.values())))
  global_rows = local_rows * jax.process_count()
  check_process_split(mesh, global_rows)
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
          for k, v in local_batch.items()}
