"""Diffusion losses and accuracy metrics, as pure functions of per-token quantities.

The losses take per-token NLL and correctness rather than logits, so the per-token values can come from full
logits (`token_nll_and_correct`) or from a chunked output head that never materialises [B, L, V] at once.

Metrics are returned as sums and counts, never ratios: sums add up over gradient-accumulation micro-batches,
eval batches and devices, and `finalize_metrics` divides once at the edge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from flowlm_jax import masking, sharding

WEIGHTINGS = ("inverse_t", "none")

# Upper edges of the per-sequence t buckets; the last bucket is open. Names say which t they hold.
RATIO_EDGES = (0.25, 0.5, 0.75)
RATIO_BUCKETS = ("ratio_le_0.25", "ratio_0.25_to_0.5", "ratio_0.5_to_0.75", "ratio_gt_0.75")


def token_nll_and_correct(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(nll float32[B, L], correct bool[B, L]): -log softmax(logits)[target] and argmax == target.

  Upcast first: a bf16 logsumexp over a large vocab loses most of the loss's precision.
  """
  nll_BxL, correct_BxL, _ = _nll_correct_and_log_z(logits_BxLxV.astype(jnp.float32), targets_BxL)
  return nll_BxL, correct_BxL


def _nll_correct_and_log_z(logits_BxLxV, targets_BxL):
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)  # max-shifted, so stable for large logits
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return log_z_BxL - target_logit_BxL, correct_BxL, log_z_BxL



def diffusion_loss_weights(
  corrupted_BxL: jax.Array, t_B: jax.Array, corruptible_BxL: jax.Array, weighting: str
) -> tuple[jax.Array, jax.Array]:
  """(per-token weight float32[B, L], normaliser): the loss is sum(weight * nll) / max(normaliser, 1).

  weighting="inverse_t": sum of nll / t over corrupted positions, normalised by the number of corruptible
    positions. This is LLaDA's pretraining objective (Nie et al. 2025, Eq. 3 and Alg. 1), whose 1/t weight
    makes the loss an upper bound on the negative log-likelihood; LLaDA divides by the token count B * L,
    which equals the corruptible count for packed text without specials.
  weighting="none": plain masked-LM cross-entropy, the mean NLL over corrupted positions.
  """
  if weighting == "inverse_t":
    # t is data, not a parameter; where() keeps a t == 0 sequence (nothing corrupted) from making 0 * inf.
    weight_BxL = jnp.where(corrupted_BxL, 1.0 / t_B.astype(jnp.float32)[:, None], 0.0)
    count = jnp.sum(corruptible_BxL, dtype=jnp.float32)
  elif weighting == "none":
    weight_BxL = corrupted_BxL.astype(jnp.float32)
    count = jnp.sum(corrupted_BxL, dtype=jnp.float32)
  else:
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  return weight_BxL, count


def weighted_nll_sum(nll_BxL: jax.Array, weight_BxL: jax.Array) -> jax.Array:
  # where(), not a product alone: outside the weighted positions nll may be inf (e.g. masked-out logits).
  return jnp.sum(jnp.where(weight_BxL != 0, nll_BxL.astype(jnp.float32) * weight_BxL, 0.0))


def diffusion_loss_sum_and_count(
  nll_BxL: jax.Array, corrupted_BxL: jax.Array, t_B: jax.Array, corruptible_BxL: jax.Array, weighting: str
) -> tuple[jax.Array, jax.Array]:
  """(weighted NLL sum, normaliser) as float32 scalars; see `diffusion_loss_weights`."""
  weight_BxL, count = diffusion_loss_weights(corrupted_BxL, t_B, corruptible_BxL, weighting)
  return weighted_nll_sum(nll_BxL, weight_BxL), count


def loss_weights(name: str, weighting: str, corrupted_BxL, t_B, corruptible_BxL) -> jax.Array:
  """Per-token weights w such that `loss_fn(name, weighting)(nll, ...) == sum(w * nll)`."""
  loss_fn(name, weighting)  # validates the names
  weight_BxL, count = diffusion_loss_weights(corrupted_BxL, t_B, corruptible_BxL,
                                             "inverse_t" if name == "llada" else weighting)
  return weight_BxL / jnp.maximum(count, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_weighted_cross_entropy(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, num_real_tokens: int, chunk_size: int,
                                 bias_V=None):
  """(sum(weight * nll), nll_BxL, correct_BxL) of logits = hidden @ w (+ bias_V), one sequence chunk at a time.

  The per-token weights are known before the forward pass (they depend only on the corruption), so the
  gradient of the weighted sum with respect to hidden and w is computed in the same pass over each
  chunk's logits: no float32 [B, L, V] array is ever held, and unlike remat the logits are not
  recomputed in the backward pass. `nll` and `correct` are metrics: no gradient flows through them.
  `bias_V` (float32, optional) is an output bias such as ModernBERT's decoder bias; it gets a gradient too.
  """
  out, _ = _fused_ce_fwd(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, num_real_tokens, chunk_size, bias_V)
  return out


def _fused_ce_fwd(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, num_real_tokens, chunk_size, bias_V=None):
  """Per device on its own rows when traced on a mesh that splits the batch (sharding.traced_on).

  Left to sharding propagation, the chunk loop's [D, V] gradient accumulator (sharded like w over fsdp)
  made XLA all-gather every chunk's float32 logits across the batch shards, so each fsdp device
  computed the whole batch's output layer (seen in the compiled CPU program). Here each device gathers
  w once, runs the loop on its rows, and the sums and dw are reduced once after it.
  """
  rows = sharding.batch_rows_spec(hidden_BxLxD.shape[0])
  if rows is None:
    return _fused_ce_local(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, num_real_tokens, chunk_size, bias_V)
  has_bias = bias_V is not None

  def local(h, w, y, wt, *bias):
    (total, nll, correct), (dh, dw, db) = _fused_ce_local(h, w, y, wt, num_real_tokens, chunk_size, *bias)
    reduce = lambda x: None if x is None else jax.lax.psum(x, sharding.BATCH_AXES)
    return (reduce(total), nll, correct), (dh, reduce(dw), reduce(db))

  row, whole = P(rows), P()
  bias = (bias_V,) if has_bias else ()
  return jax.shard_map(
      local, mesh=jax.sharding.get_abstract_mesh(),
      in_specs=(row, whole, row, row) + (whole,) * has_bias,
      out_specs=((whole, row, row), (row, whole, whole if has_bias else None)),
      check_vma=False,  # the loop's carries start as (unvarying) zeros; the psums above make the outputs whole
  )(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, *bias)


def _fused_ce_local(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, num_real_tokens, chunk_size, bias_V=None):
  B, L, D = hidden_BxLxD.shape
  V = w_DxV.shape[1]
  chunk = min(chunk_size, L)
  n_chunks = -(-L // chunk)
  pad = n_chunks * chunk - L
  if pad:
    hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    weight_BxL = jnp.pad(weight_BxL, ((0, 0), (0, pad)))
  to_chunks = lambda x: x.reshape(B, n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
  vocab_real_V = jnp.arange(V) < num_real_tokens

  def one_chunk(carry, xs):
    dw_DxV, db_V = carry
    h_BxCxD, y_BxC, wt_BxC = xs
    logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
    if bias_V is not None:
      logits = logits + bias_V.astype(jnp.float32)
    logits = jnp.where(vocab_real_V, logits, jnp.finfo(jnp.float32).min)
    nll, correct, log_z = _nll_correct_and_log_z(logits, y_BxC)
    # d(sum wt * nll)/d logits = wt * (softmax - onehot)
    probs = jnp.exp(logits - log_z[..., None])
    g32 = (probs - jax.nn.one_hot(y_BxC, V, dtype=jnp.float32)) * wt_BxC[..., None]
    g = g32.astype(h_BxCxD.dtype)
    dh = jnp.einsum("bcv,dv->bcd", g, w_DxV, preferred_element_type=jnp.float32).astype(h_BxCxD.dtype)
    dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", h_BxCxD, g, preferred_element_type=jnp.float32)
    if db_V is not None:
      db_V = db_V + jnp.sum(g32, axis=(0, 1))
    return (dw_DxV, db_V), (weighted_nll_sum(nll, wt_BxC), nll, correct, dh)

  db0 = None if bias_V is None else jnp.zeros((V,), jnp.float32)
  (dw, db), (sums, nll, correct, dh) = jax.lax.scan(
    one_chunk, (jnp.zeros((D, V), jnp.float32), db0),
    (to_chunks(hidden_BxLxD), to_chunks(targets_BxL), to_chunks(weight_BxL)))
  from_chunks = lambda x: x.swapaxes(0, 1).reshape(B, n_chunks * chunk, *x.shape[3:])[:, :L]
  out = (jnp.sum(sums), from_chunks(nll), from_chunks(correct))
  db = None if db is None else db.astype(bias_V.dtype)
  return out, (from_chunks(dh), dw.astype(w_DxV.dtype), db)


def _fused_ce_bwd(num_real_tokens, chunk_size, residuals, cotangents):
  dh, dw, db = residuals
  ct = cotangents[0]
  db = None if db is None else (ct * db).astype(db.dtype)
  return (ct * dh).astype(dh.dtype), (ct * dw).astype(dw.dtype), None, None, db


fused_weighted_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def diffusion_loss(
  nll_BxL: jax.Array, corrupted_BxL: jax.Array, t_B: jax.Array, corruptible_BxL: jax.Array, weighting: str
) -> jax.Array:
  """float32 scalar; see `diffusion_loss_sum_and_count`. A batch with nothing to count gives 0, not NaN."""
  total, count = diffusion_loss_sum_and_count(nll_BxL, corrupted_BxL, t_B, corruptible_BxL, weighting)
  return total / jnp.maximum(count, 1.0)


def llada_loss(nll_BxL: jax.Array, corrupted_BxL: jax.Array, t_B: jax.Array, corruptible_BxL: jax.Array) -> jax.Array:
  """LLaDA: 1/t-weighted NLL of the corrupted positions per corruptible token."""
  return diffusion_loss(nll_BxL, corrupted_BxL, t_B, corruptible_BxL, "inverse_t")


def flowlm_loss(
  nll_BxL: jax.Array,
  corrupted_BxL: jax.Array,
  t_B: jax.Array,
  corruptible_BxL: jax.Array,
  weighting: str = "none",
) -> jax.Array:
  """FlowLM: loss on every corrupted position, masked, random-replaced and unchanged alike, so the model learns
  to repair any token, not only to fill [MASK]s."""
  return diffusion_loss(nll_BxL, corrupted_BxL, t_B, corruptible_BxL, weighting)


LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]  # (nll, corrupted, t, corruptible)
LOSSES: dict[str, LossFn] = {"llada": llada_loss, "flowlm": flowlm_loss}


def loss_fn(name: str, weighting: str | None = None) -> LossFn:
  """`(nll_BxL, corrupted_BxL, t_B, corruptible_BxL) -> loss` for `training.loss`.

  `weighting` (`training.loss_weighting`) applies to "flowlm" only (None: flowlm_loss's default); "llada" is
  always 1/t-weighted, since that weight is what makes it LLaDA's likelihood bound.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown training.loss={name!r}; expected one of {list(LOSSES)}")
  if name == "llada" or weighting is None:
    return LOSSES[name]
  if weighting not in WEIGHTINGS:  # fail at setup, not at the first traced step
    raise ValueError(f"unknown training.loss_weighting={weighting!r}; expected one of {WEIGHTINGS}")
  return functools.partial(flowlm_loss, weighting=weighting)


def ratio_bucket_ids(t_B: jax.Array) -> jax.Array:
  """int32[B]: index into RATIO_BUCKETS; bucket i holds RATIO_EDGES[i-1] < t <= RATIO_EDGES[i]."""
  return jnp.sum(t_B[:, None] > jnp.asarray(RATIO_EDGES, jnp.float32), axis=-1, dtype=jnp.int32)


def masking_metric_sums(
  correct_BxL: jax.Array, corruption_kind_BxL: jax.Array, corrupted_BxL: jax.Array, t_B: jax.Array
) -> dict[str, jax.Array]:
  """Flat dict of float32 scalars `correct/<group>` and `count/<group>` over corrupted positions.

  Groups: `corrupted` (all), by corruption kind (`mask`, `random`, `unchanged`), and by the sequence's t
  (RATIO_BUCKETS). Add dicts from several batches key by key, then call `finalize_metrics`.
  """
  bucket_B = ratio_bucket_ids(t_B)
  groups_BxL = {
    "corrupted": corrupted_BxL,
    "mask": corrupted_BxL & (corruption_kind_BxL == masking.KIND_MASK),
    "random": corrupted_BxL & (corruption_kind_BxL == masking.KIND_RANDOM),
    "unchanged": corrupted_BxL & (corruption_kind_BxL == masking.KIND_UNCHANGED),
  }
  for i, bucket in enumerate(RATIO_BUCKETS):
    groups_BxL[bucket] = corrupted_BxL & (bucket_B == i)[:, None]
  sums = {}
  for group, in_group_BxL in groups_BxL.items():
    sums[f"correct/{group}"] = jnp.sum(in_group_BxL & correct_BxL, dtype=jnp.float32)
    sums[f"count/{group}"] = jnp.sum(in_group_BxL, dtype=jnp.float32)
  return sums


def finalize_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
  """Accuracies from `masking_metric_sums` (possibly summed): `accuracy` over all corrupted positions, and
  `accuracy_<group>` per group. Groups with a zero count are left out rather than reported as NaN."""
  metrics = {}
  for key, correct in sums.items():
    if not key.startswith("correct/"):
      continue
    group = key.removeprefix("correct/")
    count = float(sums[f"count/{group}"])
    if count > 0:
      metrics["accuracy" if group == "corrupted" else f"accuracy_{group}"] = float(correct) / count
  return metrics
