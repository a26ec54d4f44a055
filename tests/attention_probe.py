"""A CPU stand-in for the GPU's cuDNN attention as the SPMD partitioner sees it.

On GPUs `jax.nn.dot_product_attention(implementation="cudnn")` is a `custom_partitioning` op whose
Shardy rule ties only the query's dimensions (and the value's head_dim) to its output: the key and value
keep whatever sharding their producers got, and its partition callback then rejects q, k, v whose
shardings differ, or a split sequence or head_dim ("Query, key and value should have same sharding").
XLA attention on CPU is plain einsums, which propagation keeps consistent, so CPU meshes never hit that
rule. `probed_attention` is the same kind of op with the same rule and the same checks, computing XLA
attention on each shard, so a CPU compile fails where a GPU compile would, and `CALLS` records the
shardings each compile handed it.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import BATCHING, ArrayMapping, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

XLA_ATTENTION = jax.nn.dot_product_attention  # the real one, kept before a test patches it
CALLS: list[dict] = []  # one entry per partitioned call: {"kind": forward|backward, "q": spec, "k": ..., "v": ...}


def padded_spec(arg, ndim: int) -> tuple:
  spec = () if arg.sharding is None else tuple(arg.sharding.spec)
  return spec + (None,) * (ndim - len(spec))


def check_and_record(q_spec, k_spec, v_spec, kind: str = "forward") -> None:
  """cuDNN's checks (jax/_src/cudnn/fused_attention_stablehlo.py), after recording what arrived."""
  CALLS.append({"kind": kind, "q": list(q_spec), "k": list(k_spec), "v": list(v_spec)})
  if not q_spec == k_spec == v_spec:
    raise ValueError(f"Query, key and value should have same sharding: {q_spec}, {k_spec}, {v_spec}")
  if q_spec[1] is not None:
    raise ValueError("Sharding on sequence dim is not allowed.")
  if q_spec[3] is not None:
    raise ValueError("Sharding on head dim is not allowed.")


@functools.lru_cache(maxsize=None)
def _kernel(has_lengths: bool, has_mask: bool, local_window):
  """The probe op for one combination of optional operands (q, k, v[, kv_lengths][, mask])."""

  def local_attention(q, k, v, *extra):
    lengths = extra[0] if has_lengths else None
    mask = extra[-1] if has_mask else None
    return XLA_ATTENTION(q, k, v, mask=mask, key_value_seq_lengths=lengths,
                                        local_window_size=local_window, implementation="xla")

  op = custom_partitioning(local_attention)

  def output_sharding(mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, P(*padded_spec(arg_shapes[0], 4)))

  def partition(mesh, arg_shapes, result_shape):
    q_spec, k_spec, v_spec = (padded_spec(a, 4) for a in arg_shapes[:3])
    check_and_record(q_spec, k_spec, v_spec)
    rows = q_spec[0]
    args = [NamedSharding(mesh, P(*q_spec))] * 3
    if has_lengths:
      args.append(NamedSharding(mesh, P(rows)))
    if has_mask:
      args.append(NamedSharding(mesh, P(rows, None, None, None)))
    return mesh, local_attention, output_sharding(mesh, arg_shapes, result_shape), tuple(args)

  def rule(mesh, value_types, result_types):
    inputs = [ArrayMapping(f"{BATCHING}{n}") for n in range(len(value_types))]
    inputs[0] = ArrayMapping("batch", "qseq", "nhead", "head")
    inputs[2] = ArrayMapping(*inputs[2], "v")  # as cuDNN's rule: value's head_dim feeds the output's
    return SdyShardingRule(tuple(inputs), (ArrayMapping("batch", "qseq", "nhead", "v"),))

  op.def_partition(partition=partition, infer_sharding_from_operands=output_sharding, sharding_rule=rule)

  def local_gradients(q, k, v, g, *extra):
    return jax.vjp(lambda q, k, v: local_attention(q, k, v, *extra), q, k, v)[1](g)

  grad_op = custom_partitioning(local_gradients)

  def grad_shardings(mesh, arg_shapes, result_shape):
    return tuple(NamedSharding(mesh, P(*padded_spec(a, 4))) for a in arg_shapes[:3])

  def grad_partition(mesh, arg_shapes, result_shape):
    specs = [padded_spec(a, 4) for a in arg_shapes[:3]]
    check_and_record(*specs, kind="backward")
    args = grad_shardings(mesh, arg_shapes, result_shape) + (NamedSharding(mesh, P(*specs[0])),)
    args += tuple(NamedSharding(mesh, P(specs[0][0], *([None] * (a.ndim - 1)))) for a in arg_shapes[4:])
    return mesh, local_gradients, grad_shardings(mesh, arg_shapes, result_shape), args

  def grad_rule(mesh, value_types, result_types):  # as cuDNN's backward: no dimension tied to another
    inputs = tuple(ArrayMapping(f"{BATCHING}{n}") for n in range(len(value_types)))
    return SdyShardingRule(inputs, inputs[:3])

  grad_op.def_partition(partition=grad_partition, infer_sharding_from_operands=grad_shardings,
                        sharding_rule=grad_rule)
  return op, grad_op


def probed_attention(q, k, v, *, mask=None, key_value_seq_lengths=None, local_window_size=None,
                     implementation=None, **unused):
  """Drop-in for `jax.nn.dot_product_attention`: probe ops forward and backward, as cuDNN has."""
  window = None if local_window_size is None else tuple(local_window_size)
  op, grad_op = _kernel(key_value_seq_lengths is not None, mask is not None, window)
  extra = tuple(x for x in (key_value_seq_lengths, mask) if x is not None)

  @jax.custom_vjp
  def attend(q, k, v, extra):
    return op(q, k, v, *extra)

  def forward(q, k, v, extra):
    return op(q, k, v, *extra), (q, k, v, extra)

  def backward(residuals, g):
    *qkv, extra = residuals
    return (*grad_op(*qkv, g, *extra), None)

  attend.defvjp(forward, backward)
  return attend(q, k, v, extra)
