"""FP8 matmuls for training (Hopper), with delayed per-tensor scaling (`model.matmul_dtype = "fp8"`).

Each FP8 matmul quantizes its two operands (activations and weights) to e4m3 and the gradient of its
output to e5m2 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning": e4m3's extra mantissa bit for
the forward, e5m2's range for gradients). A tensor is divided by its scale before the cast, so that its
largest value lands near the format's maximum; the product is multiplied back by both scales.
The scale is *delayed* (NVIDIA Transformer Engine's DelayedScaling, MaxText's fp8): each quantized
tensor keeps a history of its last AMAX_HISTORY absolute maxima, and a step quantizes with
scale = max(history) / fp8_max, from the steps before it; the step's own maximum then enters the history.

The arithmetic is flax's: the pieces of `flax.linen.fp8_ops.fp8_scaled_dot_general` (the function behind
`Fp8DirectDotGeneralOp`, flax's current FP8 layer). Its dot_general takes f8 operands directly, which
XLA's GPU compiler turns into FP8 GEMMs, cuBLASLt's or Triton's, for the forward and both products of
the backward. The older quantize-dequantize form (`Fp8DotGeneralOp`, in_qdq/out_qdq, deprecated in
flax) hands the rewrite a bf16 -> f8 -> bf16 round trip that XLA may simplify away in the forward pass.

The scaling state ("meta": a scale and a history per quantized tensor) is not a parameter. It enters
the loss as an argument and its "gradient" is its next value: flax's custom VJPs return the updated
scale and history in place of a cotangent (flax's OVERWRITE_WITH_GRADIENT collection). So one
`jax.value_and_grad` gives the parameter gradients and the new scaling state, which train.py stores in
the train state; the optimiser never sees it. Each meta array is read exactly once per forward pass,
so no two cotangents are ever summed into it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

AMAX_HISTORY = 1024  # steps of absolute maxima a scale looks back on (Transformer Engine's and flax's default)
E4M3 = jnp.float8_e4m3fn  # activations and weights; output gradients are e5m2 (inside flax's quantized_dot)


class Quantized(NamedTuple):
  """An e4m3 operand: the tensor itself (its gradient flows through it), its cast and the scale of the cast."""
  x: jax.Array
  q: jax.Array
  scale: jax.Array


def tensor_meta(leading: tuple[int, ...] = (), history: int = AMAX_HISTORY) -> dict[str, jax.Array]:
  """One quantized tensor's scaling state (stacked along `leading`, e.g. (n_layers,)): scale 1, empty history.

  With an empty history the first step quantizes with scale 1 (flax's `compute_scale` keeps the old
  scale while the maximum is 0), as Transformer Engine does.
  """
  return {"scale": jnp.ones((*leading, 1), jnp.float32), "amax_history": jnp.zeros((*leading, history), jnp.float32)}


def init_state(activations: tuple[str, ...], matmuls: tuple[str, ...], leading: tuple[int, ...] = (),
               history: int = AMAX_HISTORY) -> dict:
  """The scaling state of a network's FP8 products: each activation that some products take (quantized once
  for all of them), and each product's weight and output gradient."""
  metas = lambda names: {name: tensor_meta(leading, history) for name in names}
  return {"activations": metas(activations), "weights": metas(matmuls), "gradients": metas(matmuls)}


def quantize(x: jax.Array, meta: dict[str, jax.Array]) -> Quantized:
  """x cast to e4m3 with its delayed scale, divided by it in float32 (flax's fp8_scaled_dot_general default):
  in a bf16 compute dtype the scale rounded to bf16 scaled every product by up to ~2^-9 per operand. out_dq
  (flax's, as in its default) still multiplies back by the scales' product rounded to the compute dtype, a gain
  error of at most ~2^-9 per product; dequantizing in float32 instead is untested against XLA's FP8 GEMM
  rewrite on the GPU, which must keep firing (docs/performance.md, "FP8 matmuls")."""
  q, scale = fp8_ops.in_q(jnp.float32, E4M3, x, meta["scale"], meta["amax_history"])
  return Quantized(x, q, scale)


def dimension_numbers(equation: str):
  """dot_general dimension numbers of a two-operand einsum that contracts the trailing axes of x with the
  leading axes of w and keeps the rest in order ("btd,dhk->bthk"), the form of every projection here."""
  inputs, out = equation.split("->")
  x, w = inputs.split(",")
  contracted = [c for c in x if c in w and c not in out]
  kept = [c for c in x if c not in contracted] + [c for c in w if c not in contracted]
  if "".join(kept) != out or any(c in x for c in w if c not in contracted):
    raise ValueError(f"fp8 einsum {equation!r}: only 'x-free, contracted -> x-free w-free' products are supported")
  return (tuple(x.index(c) for c in contracted), tuple(w.index(c) for c in contracted)), ((), ())


def einsum(equation: str, x: Quantized, w: jax.Array, weight_meta: dict, grad_meta: dict) -> jax.Array:
  """`jnp.einsum(equation, x, w)` in FP8: x already quantized, w cast to e4m3 here, the output's gradient cast
  to e5m2 in the backward pass; the result has x's dtype.

  flax's `fp8_scaled_dot_general` split in two, so that the products of one activation (q, k and v; gate
  and up) share its quantization: one absolute maximum, one cast, and one transposed copy for the weight
  gradients (FP8 GEMMs on Hopper take only that layout) instead of one per product.
  """
  dtype = x.x.dtype
  w = quantize(w.astype(dtype), weight_meta)
  y = fp8_ops.quantized_dot(x.x, x.q, x.scale, w.x, w.q, w.scale, grad_meta["scale"], grad_meta["amax_history"],
                            dimension_numbers(equation), dtype)
  return fp8_ops.out_dq(dtype, x.scale, w.scale, y)


def product_meta(history: int = AMAX_HISTORY) -> dict:
  """The scaling state of one stand-alone product (`product`): its input, weight and output gradient."""
  return {"x": tensor_meta((), history), "w": tensor_meta((), history), "g": tensor_meta((), history)}


def product(equation: str, x: jax.Array, w: jax.Array, meta: dict) -> jax.Array:
  """One FP8 product with its own scaling state (`product_meta`): the bench's check and the tests."""
  return einsum(equation, quantize(x, meta["x"]), w, meta["w"], meta["g"])


def uncalibrated(state: dict) -> jax.Array:
  """bool: no step has filled any amax history yet (a fresh state: every scale is still 1).

  Quantizing at scale 1 flushes most of a first step's output gradients (~1e-5) below e5m2's smallest
  subnormal (1.5e-5): that step's weight gradients are mostly zero, so it should only calibrate.
  """
  metas = jax.tree.leaves(state, is_leaf=lambda node: "amax_history" in node)
  return jnp.logical_not(jnp.any(jnp.stack([jnp.any(m["amax_history"] != 0) for m in metas])))


def combine_micro_batches(a: dict, b: dict) -> dict:
  """The scaling state after two micro-batches of one step, each updated from the same state.

  Both start from the same history, so their scales agree and their histories differ only in the newest
  entry, that micro-batch's maximum: the element-wise maximum keeps the step's maximum over all of them.
  """
  return jax.tree.map(jnp.maximum, a, b)
