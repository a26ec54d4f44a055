"""FP8 matmuls for training (Hopper), with delayed per-tensor scaling (`model.matmul_dtype = "fp8"`).

Each FP8 matmul quantizes its two operands (activations and weights) to e4m3 and the gradient of its
output to e5m2 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning": e4m3's extra mantissa bit for
the forward, e5m2's range for gradients). A tensor is divided by its scale before the cast, so that its
largest value lands near the format's maximum; the product is multiplied back by both scales.
The scale is *delayed* (NVIDIA Transformer Engine's DelayedScaling, MaxText's fp8): each quantized
tensor keeps a history of its last AMAX_HISTORY absolute maxima, and a step quantizes with
scale = max(history) / fp8_max, from the steps before it; the step's own maximum then enters the history.

The arithmetic is flax's (`flax.linen.fp8_ops.fp8_scaled_dot_general`, the function behind
`Fp8DirectDotGeneralOp`, flax's current FP8 layer): the dot_general takes f8 operands directly, which
XLA's GPU compiler turns into cuBLASLt FP8 GEMMs (forward, and both products of the backward). The older
quantize-dequantize form (`Fp8DotGeneralOp`, in_qdq/out_qdq, deprecated in flax) hands the rewrite a
bf16 -> f8 -> bf16 round trip that XLA may simplify away in the forward pass.

The scaling state ("meta": per matmul three scales and three histories) is not a parameter. It enters
the loss as an argument and its "gradient" is its next value: flax's custom VJPs return the updated
scale and history in place of a cotangent (flax's OVERWRITE_WITH_GRADIENT collection). So one
`jax.value_and_grad` gives the parameter gradients and the new scaling state, which train.py stores in
the train state; the optimiser never sees it. Each meta array is read exactly once per forward pass,
so no two cotangents are ever summed into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

AMAX_HISTORY = 1024  # steps of absolute maxima a scale looks back on (Transformer Engine's and flax's default)
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
SCALES = ("lhs_scale", "rhs_scale", "grad_scale")  # lhs: activations, rhs: weights, grad: output gradient
HISTORIES = ("lhs_amax_history", "rhs_amax_history", "grad_amax_history")


def init_meta(leading: tuple[int, ...] = (), history: int = AMAX_HISTORY) -> dict[str, jax.Array]:
  """One matmul's scaling state (stacked along `leading`, e.g. (n_layers,)): scales 1, histories empty.

  With an empty history the first step quantizes with scale 1 (flax's `compute_scale` keeps the old
  scale while the maximum is 0), as Transformer Engine does.
  """
  return ({name: jnp.ones((*leading, 1), jnp.float32) for name in SCALES}
          | {name: jnp.zeros((*leading, history), jnp.float32) for name in HISTORIES})


def init_state(matmuls: tuple[str, ...], leading: tuple[int, ...] = (), history: int = AMAX_HISTORY) -> dict:
  """{matmul name: its scaling state}."""
  return {name: init_meta(leading, history) for name in matmuls}


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


def einsum(equation: str, x: jax.Array, w: jax.Array, meta: dict[str, jax.Array]) -> jax.Array:
  """`jnp.einsum(equation, x, w)` in FP8 with delayed scaling; the result has x's dtype.

  Quantization arithmetic runs in x's dtype (the compute dtype), as in flax's Fp8DirectDotGeneralOp.
  """
  return fp8_ops.fp8_scaled_dot_general(x, w.astype(x.dtype), dimension_numbers(equation),
                                        preferred_element_type=x.dtype, quantize_compute_type=x.dtype, **meta)


def combine_micro_batches(a: dict, b: dict) -> dict:
  """The scaling state after two micro-batches of one step, each updated from the same state.

  Both start from the same history, so their scales agree and their histories differ only in the newest
  entry, that micro-batch's maximum: the element-wise maximum keeps the step's maximum over all of them.
  """
  return jax.tree.map(jnp.maximum, a, b)
