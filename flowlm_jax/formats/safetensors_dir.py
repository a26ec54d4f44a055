"""A Hugging Face model directory's safetensors files, read and written one tensor at a time.

Reading: `Checkpoint(directory)` indexes `model.safetensors` or the shards that `model.safetensors.index.json`
lists, from the files' headers alone; `read(name, index)` copies one tensor, or one slice of it, out of its file.
`load` builds our parameters from a table of `Tensor` entries: without shardings each as a whole numpy array,
with shardings through `jax.make_array_from_callback`, so that each device's shard is assembled on the host
from the slices of the per-layer HF tensors it covers (`Tensor.read_part` maps its index back through the
transpose and head split) and put on its device at once. Each distinct part is read once (devices that replicate
it share the read), and the host holds one parameter's parts for this process's devices at a time, each parameter
placed before the next is read: no full host copy of the model, whatever its size.

Writing: `save` converts and writes the HF tensors shard by shard (`max_shard_bytes`, HF's 5 GB by default),
with an index file when there is more than one shard, reading one layer's slice of a parameter at a time.

Only names, shapes, dtypes and files: nothing here knows about a model family, runs or the training loop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import resource
from collections.abc import Callable, Mapping

import numpy as np

from flowlm_jax.errors import first_line

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # a header's dtype -> numpy's name


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter of ours and the HF tensor that holds it (one HF tensor per layer when `per_layer`).

  Ours is the HF tensor with its axes reversed when `transposed` (a torch Linear's [out, in] read as [in, out]),
  then each axis split into consecutive axes of `ours_shape` (heads out of H·Dh). Knowing that, a slice of ours
  maps back to a slice of the file's tensor (`read_part`), so each device reads only the part it holds.
  """
  ours: str
  hf: str                                # HF name; "{i}" stands for the layer index
  hf_shape: tuple[int, ...]              # one HF tensor's shape
  ours_shape: tuple[int, ...]            # its values in our layout (one layer's slice when per layer)
  transposed: bool = False
  per_layer: bool = False

  def __post_init__(self):
    self.groups()  # a shape that no split of the HF axes gives fails here, where the table is built

  def names(self, n_layers: int) -> list[str]:
    return [self.hf.format(i=i) for i in range(n_layers)] if self.per_layer else [self.hf]

  @property
  def axes_order(self) -> tuple[int, ...]:
    """The HF axes in the order ours holds them."""
    n = len(self.hf_shape)
    return tuple(reversed(range(n))) if self.transposed else tuple(range(n))

  def groups(self) -> list[list[int]]:
    """For each HF axis in `axes_order`, the consecutive axes of `ours_shape` it splits into."""
    groups, axis = [], 0
    for size in (self.hf_shape[a] for a in self.axes_order):
      group, product = [], 1
      while axis < len(self.ours_shape) and (not group or product < size):
        product *= self.ours_shape[axis]
        group.append(axis)
        axis += 1
      if product != size:
        break
      groups.append(group)
    if len(groups) != len(self.hf_shape) or axis != len(self.ours_shape):
      raise ValueError(f"safetensors_dir: {self.hf} {self.hf_shape} does not split into {self.ours} {self.ours_shape}")
    return groups

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    """Our values (one layer's when per layer) as the HF tensor."""
    return np.transpose(w.reshape([self.hf_shape[a] for a in self.axes_order]), np.argsort(self.axes_order))

  def read_part(self, read: Callable[[tuple[slice, ...]], np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
    """Our part `index` (slices of `ours_shape`) of the HF tensor that `read(slices of hf_shape)` reads from.

    Of the axes split from one HF axis (heads out of H·Dh) the first is read as sliced, the others whole: exact
    for the shardings in use (heads split, head_dim whole); a sharded inner axis would read its whole rows.
    """
    hf_index, shape, local = [None] * len(self.hf_shape), [], []
    for hf_axis, axes in zip(self.axes_order, self.groups()):
      sizes = [self.ours_shape[a] for a in axes]
      outer, local_outer = _contiguous(index[axes[0]], sizes[0])
      inner = math.prod(sizes[1:])
      hf_index[hf_axis] = slice(outer.start * inner, outer.stop * inner)
      shape += [outer.stop - outer.start, *sizes[1:]]
      local += [local_outer, *(index[a] for a in axes[1:])]
    return np.transpose(read(tuple(hf_index)), self.axes_order).reshape(shape)[tuple(local)]


def _contiguous(s: slice, n: int) -> tuple[slice, slice]:
  """(a step-1 range of an axis of size n that covers `s`, `s` relative to that range)."""
  start, stop, step = s.indices(n)
  if step == 1 and start <= stop:
    return slice(start, stop), slice(None)
  return slice(0, n), s  # strided or reversed (jax never asks for these): read the axis whole


def reshaped(ours: str, hf: str, hf_shape, ours_shape, per_layer=False) -> Tensor:
  """The same values in another shape (norm weights, biases split into heads)."""
  return Tensor(ours, hf, tuple(hf_shape), tuple(ours_shape), transposed=False, per_layer=per_layer)


def linear(ours: str, hf: str, hf_shape, ours_shape, per_layer=False) -> Tensor:
  """A torch Linear weight [out, in] <-> ours [in, ...out split into axes] (x @ W.T becomes x @ ours)."""
  return Tensor(ours, hf, tuple(hf_shape), tuple(ours_shape), transposed=True, per_layer=per_layer)


# --- reading ------------------------------------------------------------------------------------


class Checkpoint:
  """The tensors of one HF directory: names and shapes from the headers; values on request.

  Each `read` opens its file and closes it again. Kept open, safetensors' memory map would keep every page
  read so far resident in this process (measured: RSS grew by the whole 1 GiB of a file read through one
  handle, and stayed flat when each tensor had its own), i.e. the full 16 GB of an 8B model by the end.
  """

  def __init__(self, directory: str):
    from safetensors import SafetensorError, safe_open

    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          files = sorted(set(json.load(f)["weight_map"].values()))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} does not read as a safetensors index ({first_line(e)})") from None
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"model.pretrained: no {SINGLE_FILE} (or {INDEX_FILE}) in {directory}")
    self._file_of, self._shapes, self._dtypes = {}, {}, {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: {INDEX_FILE} lists {name}, which is not in {directory}")
      try:
        with safe_open(path, framework="np") as f:  # the header only
          for key in f.keys():
            self._file_of[key] = path
            self._shapes[key] = tuple(f.get_slice(key).get_shape())
            self._dtypes[key] = f.get_slice(key).get_dtype()  # safetensors' names: BF16, F16, F32, ...
      except SafetensorError as e:  # a damaged or truncated file: its message does not name it
        raise ValueError(f"{path} does not read ({first_line(e)})") from None
    self.bytes_read = 0

  def names(self) -> list[str]:
    return list(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def stored_dtype(self) -> str | None:
    """The dtype most of the tensors are stored in, as numpy names it (bfloat16, float16, float32), or None."""
    counts = collections.Counter(self._dtypes.values())
    return STORED_DTYPES.get(counts.most_common(1)[0][0]) if counts else None

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor `name`, or only its part `index`: safetensors copies just that part out of the file."""
    from safetensors import safe_open

    with safe_open(self._file_of[name], framework="np") as f:
      tensor = f.get_tensor(name) if index is None else f.get_slice(name)[index]
    self.bytes_read += tensor.nbytes
    return tensor


def read_json(path: str, what: str = "") -> dict:
  """A JSON object from `path`; a damaged file is a one-line ValueError naming it (prefixed `what: `)."""
  with open(path) as f:
    try:
      value = json.load(f)
    except ValueError as e:
      raise ValueError(f"{what + ': ' if what else ''}{path} does not read as JSON ({first_line(e)})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{what + ': ' if what else ''}{path} holds a JSON {type(value).__name__}, not an object")
  return value


def check(table: list[Tensor], ckpt: Checkpoint, n_layers: int, may_lack: tuple[str, ...] = ()) -> None:
  """One-line ValueError naming the first problems: missing, unexpected or mis-shaped tensors.

  `may_lack`: HF names a checkpoint may leave out (a tied output layer).
  """
  expected = {name: t.hf_shape for t in table for name in t.names(n_layers)}
  present = set(ckpt.names())
  missing = [n for n in expected if n not in present and n not in may_lack]
  unexpected = sorted(present - set(expected) - set(may_lack))
  where = ckpt.directory
  if missing:
    raise ValueError(f"{where}: missing {len(missing)} tensor(s) {_few(missing)} for config.json's architecture")
  if unexpected:
    raise ValueError(f"{where}: unexpected {len(unexpected)} tensor(s) {_few(unexpected)} (not the layout "
                     "config.json's model_type and architecture describe?)")
  for name, want in expected.items():
    if name in present and ckpt.shape(name) != want:
      raise ValueError(f"{where}: tensor {name!r} has shape {ckpt.shape(name)}, config.json implies {want}")


def _few(names: list[str]) -> str:
  return ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")


def load(table: list[Tensor], ckpt: Checkpoint, template: Mapping, shardings: Mapping | None = None) -> dict:
  """{our name: array} for every entry of `table`, each in its template's shape and dtype.

  `template`: {name: ShapeDtypeStruct} (per-layer entries are stacked on axis 0). Without `shardings`,
  numpy arrays; with them ({name: jax.sharding.Sharding}), jax Arrays placed shard by shard.
  """
  params = {}
  for t in table:
    want = template[t.ours]
    fill = lambda index, t=t, want=want: _shard(t, ckpt, want.shape, np.dtype(want.dtype), index)
    if shardings is None:
      params[t.ours] = fill(tuple(slice(None) for _ in want.shape))
    else:
      import jax

      # Waiting for each parameter's transfers bounds the host memory to its shards (transfers are async).
      params[t.ours] = jax.block_until_ready(jax.make_array_from_callback(
          tuple(want.shape), shardings[t.ours], _once_per_part(fill, want.shape)))
  return params


def _once_per_part(fill, shape):
  """`fill` (index -> part) called once per distinct part: jax asks once per local device, and devices that
  replicate a part (an axis the parameter is not split over) would each read it from the file again."""
  parts = {}

  def once(index):
    key = tuple(s.indices(n) for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape))
    if key not in parts:
      parts[key] = fill(index)
    return parts[key]
  return once


def _shard(t: Tensor, ckpt: Checkpoint, shape, dtype, index) -> np.ndarray:
  """The part `index` (a tuple of slices) of our parameter, read one HF tensor at a time, each only as far as
  the part covers it."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if not t.per_layer:
    return np.ascontiguousarray(t.read_part(functools.partial(ckpt.read, t.hf), index), dtype=dtype)
  layers = range(*index[0].indices(shape[0]))
  inner = tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:]))
  out = np.empty((len(layers), *inner), dtype)
  for row, layer in enumerate(layers):
    out[row] = t.read_part(functools.partial(ckpt.read, t.hf.format(i=layer)), index[1:])
  return out


def peak_host_memory_bytes() -> int:
  """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if os.uname().sysname == "Darwin" else peak * 1024


# --- writing ------------------------------------------------------------------------------------


def save(table: list[Tensor], n_layers: int, params: Mapping, out: str, dtype,
         max_shard_bytes: int = 5 * 10**9) -> dict:
  """Writes the HF tensors of `params` (numpy or jax arrays) in `dtype`; returns a summary.

  One `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json`
  (HF's layout) when they exceed `max_shard_bytes`. A per-layer parameter is read one layer at a time.
  """
  from safetensors.numpy import save_file

  dtype = np.dtype(dtype)
  plan = [(t, name, layer) for t in table for layer, name in enumerate(t.names(n_layers))]
  sizes = [math.prod(t.hf_shape) * dtype.itemsize for t, _, _ in plan]
  shards, current, current_bytes = [], [], 0
  for entry, size in zip(plan, sizes):
    if current and current_bytes + size > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(entry)
    current_bytes += size
  shards.append(current)
  files = [SINGLE_FILE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                                   for k in range(len(shards))]
  os.makedirs(out, exist_ok=True)
  for file, shard in zip(files, shards):
    tensors = {name: np.ascontiguousarray(t.to_hf(_host(params[t.ours], layer if t.per_layer else None)), dtype=dtype)
               for t, name, layer in shard}
    path = os.path.join(out, file)
    save_file(tensors, path, metadata={"format": "pt"})  # transformers refuses files without a framework tag
    shareable(path)
  if len(files) > 1:
    weight_map = {name: file for file, shard in zip(files, shards) for _, name, _ in shard}
    with open(os.path.join(out, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
      f.write("\n")
  return {"out": out, "files": files, "tensors": len(plan), "bytes": sum(sizes),
          "parameters": sum(math.prod(t.hf_shape) for t, _, _ in plan)}


def _host(value, layer: int | None) -> np.ndarray:
  """One layer's slice (or all) of a numpy or jax array, on the host."""
  return np.asarray(value if layer is None else value[layer])


def shareable(path: str, mode: int = 0o666) -> None:
  """`mode` under the process's umask, what a plain open/mkdir would give: safetensors creates files and
  tempfile.mkdtemp directories owner-only."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, mode & ~umask)
