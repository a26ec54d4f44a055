"""A Hugging Face model directory's safetensors files, read and written one tensor at a time.

Reading: `Checkpoint(directory)` indexes `model.safetensors` or the shards that `model.safetensors.index.json`
lists, from the files' headers alone; `read(name)` copies one tensor out of its file.
`load` builds our parameters from a table of `Tensor` entries: without shardings each as a whole numpy array,
with shardings through `jax.make_array_from_callback`, so that each device's shard is assembled on the host
from the per-layer HF tensors and put on its device at once. The host then never holds more than one
shard plus one HF tensor: no full host copy of the model, whatever its size.

Writing: `save` converts and writes the HF tensors shard by shard (`max_shard_bytes`, HF's 5 GB by default),
with an index file when there is more than one shard, reading one layer's slice of a parameter at a time.

Only names, shapes, dtypes and files: nothing here knows about a model family, runs or the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
from collections.abc import Callable, Mapping

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter of ours and the HF tensor that holds it (one HF tensor per layer when `per_layer`)."""
  ours: str
  hf: str                                # HF name; "{i}" stands for the layer index
  hf_shape: tuple[int, ...]              # one HF tensor's shape
  to_ours: Callable[[np.ndarray], np.ndarray]  # HF tensor -> our array (one layer's slice when per layer)
  to_hf: Callable[[np.ndarray], np.ndarray]    # the inverse
  per_layer: bool = False

  def names(self, n_layers: int) -> list[str]:
    return [self.hf.format(i=i) for i in range(n_layers)] if self.per_layer else [self.hf]


def reshaped(ours: str, hf: str, hf_shape, ours_shape, per_layer=False) -> Tensor:
  """The same values in another shape (norm weights, biases split into heads)."""
  hf_shape, ours_shape = tuple(hf_shape), tuple(ours_shape)
  return Tensor(ours, hf, hf_shape, lambda w: w.reshape(ours_shape), lambda w: w.reshape(hf_shape), per_layer)


def linear(ours: str, hf: str, hf_shape, ours_shape, per_layer=False) -> Tensor:
  """A torch Linear weight [out, in] <-> ours [in, ...out split into axes] (x @ W.T becomes x @ ours)."""
  hf_shape, ours_shape = tuple(hf_shape), tuple(ours_shape)
  out_dim, in_dim = hf_shape
  return Tensor(ours, hf, hf_shape, lambda w: w.T.reshape(ours_shape), lambda w: w.reshape(in_dim, out_dim).T,
                per_layer)


# --- reading ------------------------------------------------------------------------------------


class Checkpoint:
  """The tensors of one HF directory: names and shapes from the headers; values on request.

  Each `read` opens its file and closes it again. Kept open, safetensors' memory map would keep every page
  read so far resident in this process (measured: RSS grew by the whole 1 GiB of a file read through one
  handle, and stayed flat when each tensor had its own), i.e. the full 16 GB of an 8B model by the end.
  """

  def __init__(self, directory: str):
    from safetensors import safe_open

    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"model.pretrained: no {SINGLE_FILE} (or {INDEX_FILE}) in {directory}")
    self._file_of, self._shapes = {}, {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: {INDEX_FILE} lists {name}, which is not in {directory}")
      with safe_open(path, framework="np") as f:  # the header only
        for key in f.keys():
          self._file_of[key] = path
          self._shapes[key] = tuple(f.get_slice(key).get_shape())
    self.bytes_read = 0

  def names(self) -> list[str]:
    return list(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def read(self, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(self._file_of[name], framework="np") as f:
      tensor = f.get_tensor(name)
    self.bytes_read += tensor.nbytes
    return tensor


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
      params[t.ours] = jax.block_until_ready(jax.make_array_from_callback(tuple(want.shape), shardings[t.ours], fill))
  return params


def _shard(t: Tensor, ckpt: Checkpoint, shape, dtype, index) -> np.ndarray:
  """The part `index` (a tuple of slices) of our parameter, read one HF tensor at a time."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if not t.per_layer:
    return np.ascontiguousarray(t.to_ours(ckpt.read(t.hf))[index], dtype=dtype)
  layers = range(*index[0].indices(shape[0]))
  inner = tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:]))
  out = np.empty((len(layers), *inner), dtype)
  for row, layer in enumerate(layers):
    out[row] = t.to_ours(ckpt.read(t.hf.format(i=layer)))[index[1:]]
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
    _shareable(path)
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


def _shareable(path: str) -> None:
  """safetensors creates files owner-only; make them as readable as the rest of the directory."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)
