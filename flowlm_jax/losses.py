"""Diffusion losses and accuracy metrics, as pure functions of per-token quantities.

The losses take per-token NLL and correctness rather than logits, so the per-token values can come from full
logits (`token_nll_and_correct`) or from a chunked output head that never materialises [B, L, V] at once.

Metrics are returned as sums and counts, never ratios: sums add up over gradient-accumulation micro-batches,
eval batches and devices, and `finalize_metrics` divides once at the edge.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from flowlm_jax import masking, sharding

WEIGHTINGS = ("inverse_t", "none")  # per-token NLL weightings (`diffusion_loss_weights`)
GIDD = "gidd"  # the exact ELBO of the mixed [MASK] + uniform process: not an NLL weighting (`fused_gidd_loss`)
LOSS_WEIGHTINGS = (*WEIGHTINGS, GIDD)  # what `training.loss_weighting` may name

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
  elif weighting == "none":
    weight_BxL = corrupted_BxL.astype(jnp.float32)
  else:
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  return weight_BxL, loss_normaliser(weighting, corrupted_BxL, corruptible_BxL)


def loss_normaliser(weighting: str, corrupted_BxL: jax.Array, corruptible_BxL: jax.Array) -> jax.Array:
  """float32 count a loss sum is divided by: corruptible positions for the likelihood bounds ("inverse_t",
  "gidd": nats per token), corrupted ones for the plain masked-LM mean ("none")."""
  return jnp.sum(corrupted_BxL if weighting == "none" else corruptible_BxL, dtype=jnp.float32)


def weighted_nll_sum(nll_BxL: jax.Array, weight_BxL: jax.Array) -> jax.Array:
  # where(), not a product alone: outside the weighted positions nll may be inf (e.g. masked-out logits).
  return jnp.sum(jnp.where(weight_BxL != 0, nll_BxL.astype(jnp.float32) * weight_BxL, 0.0))


def diffusion_loss_sum_and_count(
  nll_BxL: jax.Array, corrupted_BxL: jax.Array, t_B: jax.Array, corruptible_BxL: jax.Array, weighting: str
) -> tuple[jax.Array, jax.Array]:
  """(weighted NLL sum, normaliser) as float32 scalars; see `diffusion_loss_weights`."""
  weight_BxL, count = diffusion_loss_weights(corrupted_BxL, t_B, corruptible_BxL, weighting)
  return weighted_nll_sum(nll_BxL, weight_BxL), count


def weighting_of(name: str, weighting: str) -> str:
  """The weighting `training.loss` = `name` trains with: "llada" is always 1/t, its likelihood bound's weight."""
  return "inverse_t" if name == "llada" else weighting


def loss_weights(name: str, weighting: str, corrupted_BxL, t_B, corruptible_BxL, denominator=None) -> jax.Array:
  """Per-token weights w such that `loss_fn(name, weighting)(nll, ...) == sum(w * nll)`; with `denominator`
  (e.g. a whole step's normaliser, for one of its micro-batches) the weighted sum is divided by that instead."""
  loss_fn(name, weighting)  # validates the names
  weight_BxL, count = diffusion_loss_weights(corrupted_BxL, t_B, corruptible_BxL, weighting_of(name, weighting))
  return weight_BxL / (jnp.maximum(count, 1.0) if denominator is None else denominator)


def fused_weighted_cross_entropy(hidden_BxLxD, w_DxV, targets_BxL, weight_BxL, num_real_tokens: int, chunk_size: int,
                                 bias_V=None):
  """(sum(weight * nll), nll_BxL, correct_BxL) of logits = hidden @ w (+ bias_V), one sequence chunk at a time.

  The per-token weights are known before the forward pass (they depend only on the corruption), so the
  gradient of the weighted sum with respect to hidden and w is computed in the same pass over each
  chunk's logits: no float32 [B, L, V] array is ever held, and unlike remat the logits are not
  recomputed in the backward pass. `nll` and `correct` are metrics: no gradient flows through them.
  `bias_V` (float32, optional) is an output bias such as ModernBERT's decoder bias; it gets a gradient too.
  """
  return fused_output_loss(_weighted_ce_chunk, num_real_tokens, chunk_size, hidden_BxLxD, w_DxV, bias_V,
                           (targets_BxL, weight_BxL), ())


def _weighted_ce_chunk(logits_BxCxV, log_z_BxC, nll_BxC, per_position, per_row):
  """(sum(weight * nll), its gradient wrt the logits): wt * (softmax - onehot), written out."""
  (y_BxC, wt_BxC), () = per_position, per_row
  probs = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
  g32 = (probs - jax.nn.one_hot(y_BxC, logits_BxCxV.shape[-1], dtype=jnp.float32)) * wt_BxC[..., None]
  return weighted_nll_sum(nll_BxC, wt_BxC), g32


# A chunk loss: (logits f32[B, C, V], log_z [B, C], nll [B, C], per-position chunks (targets first),
# per-row arrays) -> (loss sum, its gradient wrt the logits f32[B, C, V]).
ChunkLoss = Callable[..., tuple[jax.Array, jax.Array]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def fused_output_loss(chunk_loss: ChunkLoss, num_real_tokens: int, chunk_size: int, hidden_BxLxD, w_DxV, bias_V,
                      per_position: tuple, per_row: tuple):
  """(loss sum, nll_BxL, correct_BxL): `chunk_loss` summed over sequence chunks of logits = hidden @ w (+ bias).

  `per_position` ([B, L, ...] arrays, the targets first) is cut into the same chunks; `per_row` ([B, ...]
  arrays) goes whole to every chunk. The chunk loss returns its gradient wrt the logits, so the gradients
  wrt hidden, w and bias are accumulated in the forward pass over each chunk (`fused_weighted_cross_entropy`):
  at most one chunk's float32 [B, C, V] logits are alive. nll and correct (of the targets) are metrics.
  """
  out, _ = _fused_fwd(chunk_loss, num_real_tokens, chunk_size, hidden_BxLxD, w_DxV, bias_V, per_position, per_row)
  return out


def _fused_fwd(chunk_loss, num_real_tokens, chunk_size, hidden_BxLxD, w_DxV, bias_V, per_position, per_row):
  """Per device on its own rows when traced on a mesh that splits the batch (sharding.traced_on).

  Left to sharding propagation, the chunk loop's [D, V] gradient accumulator (sharded like w over fsdp)
  made XLA all-gather every chunk's float32 logits across the batch shards, so each fsdp device
  computed the whole batch's output layer (seen in the compiled CPU program). Here each device gathers
  w once, runs the loop on its rows, and the sums and dw are reduced once after it.
  """
  local = functools.partial(_fused_local, chunk_loss, num_real_tokens, chunk_size)
  rows = sharding.batch_rows_spec(hidden_BxLxD.shape[0])
  if rows is None:
    return local(hidden_BxLxD, w_DxV, bias_V, per_position, per_row)
  has_bias = bias_V is not None

  def on_rows(h, w, positions, row_inputs, *bias):
    (total, nll, correct), (dh, dw, db) = local(h, w, *(bias or (None,)), positions, row_inputs)
    reduce = lambda x: None if x is None else jax.lax.psum(x, sharding.BATCH_AXES)
    return (reduce(total), nll, correct), (dh, reduce(dw), reduce(db))

  row, whole = P(rows), P()
  rows_of = lambda tree: jax.tree.map(lambda _: row, tree)
  bias = (bias_V,) if has_bias else ()  # no None through shard_map
  return jax.shard_map(
      on_rows, mesh=jax.sharding.get_abstract_mesh(),
      in_specs=(row, whole, rows_of(per_position), rows_of(per_row)) + (whole,) * has_bias,
      out_specs=((whole, row, row), (row, whole, whole if has_bias else None)),
      check_vma=False,  # the loop's carries start as (unvarying) zeros; the psums above make the outputs whole
  )(hidden_BxLxD, w_DxV, per_position, per_row, *bias)


def sequence_chunks(L: int, chunk_size: int):
  """(to_chunks, from_chunks) for scanning over the sequence axis `chunk_size` positions at a time (0: one
  chunk): to_chunks [B, L, ...] -> [n, B, C, ...] (zero-padded at the end), from_chunks the inverse."""
  chunk = min(chunk_size or L, L)
  n_chunks = -(-L // chunk)
  pad = n_chunks * chunk - L

  def to_chunks(x):
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
    return x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

  def from_chunks(x):
    return x.swapaxes(0, 1).reshape(x.shape[1], n_chunks * chunk, *x.shape[3:])[:, :L]

  return to_chunks, from_chunks


def _fused_local(chunk_loss, num_real_tokens, chunk_size, hidden_BxLxD, w_DxV, bias_V, per_position, per_row):
  _, L, D = hidden_BxLxD.shape
  V = w_DxV.shape[1]
  to_chunks, from_chunks = sequence_chunks(L, chunk_size)
  vocab_real_V = jnp.arange(V) < num_real_tokens

  def one_chunk(carry, xs):
    dw_DxV, db_V = carry
    h_BxCxD, positions = xs
    logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
    if bias_V is not None:
      logits = logits + bias_V.astype(jnp.float32)
    logits = jnp.where(vocab_real_V, logits, jnp.finfo(jnp.float32).min)
    nll, correct, log_z = _nll_correct_and_log_z(logits, positions[0])
    total, g32 = chunk_loss(logits, log_z, nll, positions, per_row)
    g = g32.astype(h_BxCxD.dtype)
    dh = jnp.einsum("bcv,dv->bcd", g, w_DxV, preferred_element_type=jnp.float32).astype(h_BxCxD.dtype)
    dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", h_BxCxD, g, preferred_element_type=jnp.float32)
    if db_V is not None:
      db_V = db_V + jnp.sum(g32, axis=(0, 1))
    return (dw_DxV, db_V), (total, nll, correct, dh)

  db0 = None if bias_V is None else jnp.zeros((V,), jnp.float32)
  (dw, db), (sums, nll, correct, dh) = jax.lax.scan(
    one_chunk, (jnp.zeros((D, V), jnp.float32), db0),
    (to_chunks(hidden_BxLxD), jax.tree.map(to_chunks, per_position)))
  out = (jnp.sum(sums), from_chunks(nll), from_chunks(correct))
  db = None if db is None else db.astype(bias_V.dtype)
  return out, (from_chunks(dh), dw.astype(w_DxV.dtype), db)


def _fused_bwd(chunk_loss, num_real_tokens, chunk_size, residuals, cotangents):
  dh, dw, db = residuals
  ct = cotangents[0]
  db = None if db is None else (ct * db).astype(db.dtype)
  return (ct * dh).astype(dh.dtype), (ct * dw).astype(dw.dtype), db, None, None


fused_output_loss.defvjp(_fused_fwd, _fused_bwd)


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
  if weighting == GIDD:
    raise ValueError("training.loss_weighting='gidd' needs the model's whole distribution, not one NLL per token: "
                     "use fused_gidd_loss")
  if weighting not in WEIGHTINGS:  # fail at setup, not at the first traced step
    raise ValueError(f"unknown training.loss_weighting={weighting!r}; expected one of {LOSS_WEIGHTINGS}")
  return functools.partial(flowlm_loss, weighting=weighting)


# --- the exact ELBO of mixed [MASK] + uniform noise (GIDD) -------------------------------------


@dataclasses.dataclass(frozen=True)
class MixedNoise:
  """The corruption `masking.corrupt` applies, read as an interpolating diffusion process (GIDD).

  A corruptible position is chosen with probability t and then becomes [MASK] (mask_prob), a token drawn
  uniformly from the R `random_token_ids` (random_prob) or stays itself (keep_prob). Its marginal is
      q_t(z | x) = (1 - s t) [z = x] + s t pi(z),   pi = p_m [z = MASK] + p_u / R [z in random ids],
  with s = 1 - keep_prob, p_m = mask_prob / s, p_u = random_prob / s: a "kept" position is one not chosen,
  so keep_prob only slows the clock (tau = s t). Hashable: closed over by jitted functions.
  """
  time_scale: float  # s
  mask_prob: float   # p_m
  random_prob: float  # p_u
  mask_id: int
  random_token_ids: tuple[int, ...]

  def __post_init__(self):
    if not 0.0 < self.time_scale <= 1.0:
      raise ValueError("mixed noise: keep_prob must be < 1 (with keep_prob = 1 nothing is ever corrupted)")
    if self.random_prob > 0 and not self.random_token_ids:
      raise ValueError("mixed noise: random_prob > 0 but there are no random token ids")

  @classmethod
  def from_masking(cls, spec: masking.MaskingSpec) -> MixedNoise:
    if spec.mix_prob > 0:
      raise ValueError("the GIDD loss is the ELBO of one noise process; masking.mix_prob > 0 mixes two")
    s = spec.mask_prob + spec.random_prob
    return cls(time_scale=s, mask_prob=spec.mask_prob / s, random_prob=spec.random_prob / s,
               mask_id=spec.mask_id, random_token_ids=spec.random_token_ids)

  def as_masking(self) -> masking.MaskingSpec:
    """The `masking.corrupt_at` strategy that draws z ~ q_t(. | x) at a given t (inverse of `from_masking`):
    choosing at rate t and keeping with 1 - s is choosing at rate s t. Its t range is unused."""
    s = self.time_scale
    return masking.MaskingSpec(mask_prob=s * self.mask_prob, random_prob=s * self.random_prob, keep_prob=1.0 - s,
                               min_ratio=0.0, max_ratio=1.0, eps=0.0, mask_id=self.mask_id,
                               random_token_ids=self.random_token_ids)

  def is_random_id(self, vocab_size: int) -> jax.Array:
    """bool[V]: the ids uniform noise draws from."""
    return jnp.zeros((vocab_size,), bool).at[jnp.asarray(self.random_token_ids, jnp.int32)].set(True)

  def in_random_ids(self, ids: jax.Array) -> jax.Array:
    """bool[ids.shape]: whether each id is one uniform noise draws from (any id; larger ones are not)."""
    table = self.is_random_id(max(self.random_token_ids, default=0) + 1)
    return jnp.take(table, ids, mode="fill", fill_value=False)


# t is clipped into (0, 1) so that 1 / (t (1 - t)) stays finite at a sampled endpoint; the ELBO's integrand is
# bounded near t = 1 and the mass cut off at either end is below float32 resolution of the loss.
GIDD_T_MIN, GIDD_T_MAX = 1e-6, 1.0 - 1e-6


def gidd_weights(noisy_BxL: jax.Array, targets_BxL: jax.Array, corruptible_BxL: jax.Array, t_B: jax.Array,
                 noise: MixedNoise) -> jax.Array:
  """float32[B, L]: the ELBO weight w_t(z, x) of each position's state z (the noisy token) given x.

  GIDD (von Rütte et al. 2025, Sec. 3) writes the continuous-time ELBO of a process with marginals
  q_t(z|x) = alpha_t [z = x] + (1 - alpha_t) pi_t(z) as
      -log p(x) <= E_{t ~ U(0,1), z ~ q_t(.|x)} [ w_t(z, x) (KL(q_t(.|x) || q_t(.|x_theta)) + IS(z)) ],
      w_t(z, x) = ( (1 - alpha_t) pi_t'(z) - (alpha_t' / alpha_t) pi_t(z) ) / q_t(z | x),
      IS(z) = r - log r - 1, r = q_t(z|x) / q_t(z|x_theta),
  x_theta being the model's distribution over clean tokens (their reference code's hybrid schedule gives the
  same weights through this formula). Derivation for a fixed pi: the process is a CTMC in which a token is
  redrawn from pi at rate lambda = -alpha'/alpha, so the reverse rate z -> z' given x is
  lambda pi(z) q_t(z'|x) / q_t(z|x), and the model's is the same with x_theta plugged in. The path-space
  bound (Campbell et al. 2022) sums R_theta - R + R log(R / R_theta) over z' != z, which collapses to
  lambda pi(z) / q_t(z|x) (KL + IS). With alpha = 1 - tau and tau = s t, per unit of t
      w = s pi(z) / ((1 - tau) q_tau(z | x)),
  and the three states a position can hold give
      [MASK]:       q = tau p_m                          -> w = s / (tau (1 - tau))
      wrong token:  q = tau p_u / R                      -> w = s / (tau (1 - tau))
      right token:  q = (1 - tau) + tau p_u / R          -> w = s (p_u / R) / ((1 - tau) (1 - tau + tau p_u / R))
  ([MASK] and wrong tokens share a weight because the mix is fixed; their loss terms differ). A right token
  outside the random ids (e.g. [EOS]) has pi(x) = 0: weight 0. Positions outside `corruptible` get 0. With pure
  [MASK] noise (p_u = 0) w (KL + IS) is the 1/t-weighted cross-entropy. A full bound needs keep_prob = 0:
  otherwise tau only reaches s and the prior term at tau = 1 is left out (as a training loss that is fine).
  """
  tau_B = jnp.clip(noise.time_scale * t_B.astype(jnp.float32), GIDD_T_MIN, GIDD_T_MAX)[:, None]
  a, r_count = 1.0 - tau_B, max(len(noise.random_token_ids), 1)
  c = tau_B * noise.random_prob / r_count  # q_tau(z|x) of one random id z != x
  in_random_x = noise.in_random_ids(targets_BxL)
  is_mask, is_right = noisy_BxL == noise.mask_id, noisy_BxL == targets_BxL
  reachable_wrong = ~is_mask & ~is_right & noise.in_random_ids(noisy_BxL)
  reachable_wrong &= noise.random_prob > 0
  noised = jnp.where(is_mask & (noise.mask_prob > 0) | reachable_wrong, 1.0 / (tau_B * a), 0.0)
  right = jnp.where(is_right & in_random_x, (noise.random_prob / r_count) / (a * (a + c)), 0.0)
  return jnp.where(corruptible_BxL, noise.time_scale * (noised + right), 0.0)


def gidd_divergences(logits_BxLxV: jax.Array, targets_BxL: jax.Array, noisy_BxL: jax.Array, t_B: jax.Array,
                     noise: MixedNoise) -> jax.Array:
  """float32[B, L]: KL(q_t(.|x) || q_t(.|x_theta)) + IS(z) of each position (see `gidd_weights`).

  x_theta = softmax(logits) with [MASK] banned (a clean token is never [MASK]). With a = 1 - tau and
  c = tau p_u / R the two marginals differ only on the random ids and on x:
      KL = q(x|x) log(q(x|x) / (a x_theta(x) + c_x)) - sum_{z in R, z != x} c log(1 + a x_theta(z) / c),
  where c_x = c if x is a random id, else 0; the [MASK] entries (tau p_m on both sides) cancel. IS is 0 on
  [MASK]; r = c / (a x_theta(z) + c) on a wrong token z and r = q(x|x) / (a x_theta(x) + c_x) on the right one.
  log(1 + a p / c) is computed as softplus(log(a / c) + log p), stable for tiny c and p.
  """
  V = logits_BxLxV.shape[-1]
  logits = jnp.where(jnp.arange(V) == noise.mask_id, -jnp.inf, logits_BxLxV.astype(jnp.float32))
  log_p = jax.nn.log_softmax(logits, axis=-1)
  tau = jnp.clip(noise.time_scale * t_B.astype(jnp.float32), GIDD_T_MIN, GIDD_T_MAX)[:, None]
  a = 1.0 - tau
  at = lambda ids: jnp.take_along_axis(log_p, ids[..., None], axis=-1)[..., 0]
  log_p_x = at(targets_BxL)
  if noise.random_prob > 0:
    c = tau * noise.random_prob / len(noise.random_token_ids)
    c_x = jnp.where(noise.in_random_ids(targets_BxL), c, 0.0)
    log_gain = lambda lp: jax.nn.softplus(jnp.log(a / c) + lp)  # log(1 + a p / c), lp [B, L]
    spread_V = jnp.where(noise.is_random_id(V), jax.nn.softplus(jnp.log(a / c)[..., None] + log_p), 0.0)
    others = jnp.sum(spread_V, axis=-1) - jnp.where(c_x > 0, log_gain(log_p_x), 0.0)
    kl_rest = -c * others
  else:
    c_x, kl_rest = jnp.zeros_like(log_p_x), 0.0
  q_x, has_c = a + c_x, c_x > 0
  log_q_theta_x = jnp.where(has_c, jnp.logaddexp(jnp.log(a) + log_p_x, jnp.log(jnp.where(has_c, c_x, 1.0))),
                            jnp.log(a) + log_p_x)
  log_r_right = jnp.log(q_x) - log_q_theta_x
  kl = q_x * log_r_right + kl_rest
  is_mask, is_right = noisy_BxL == noise.mask_id, noisy_BxL == targets_BxL
  log_r_wrong = -log_gain(at(noisy_BxL)) if noise.random_prob > 0 else jnp.zeros_like(log_p_x)
  # r = 1 (IS = 0) on [MASK], and on a right token outside the random ids, whose weight is 0 and whose r
  # (1 / x_theta(x)) may overflow.
  log_r = jnp.where(is_mask | (is_right & ~has_c), 0.0, jnp.where(is_right, log_r_right, log_r_wrong))
  return kl + jnp.expm1(log_r) - log_r


def gidd_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, noisy_BxL: jax.Array,
                    corruptible_BxL: jax.Array, t_B: jax.Array, noise: MixedNoise) -> jax.Array:
  """float32[B, L]: w_t(z, x) (KL + IS) per position, 0 outside `corruptible`; its sum is one draw of the
  mixed-noise ELBO's integrand (`gidd_weights`)."""
  weight_BxL = gidd_weights(noisy_BxL, targets_BxL, corruptible_BxL, t_B, noise)
  divergence_BxL = gidd_divergences(logits_BxLxV, targets_BxL, noisy_BxL, t_B, noise)
  return jnp.where(weight_BxL != 0, weight_BxL * divergence_BxL, 0.0)


def fused_gidd_loss(hidden_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array, noisy_BxL: jax.Array,
                    corruptible_BxL: jax.Array, t_B: jax.Array, noise: MixedNoise, num_real_tokens: int,
                    chunk_size: int, bias_V: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of `gidd_token_loss`, nll_BxL, correct_BxL) of logits = hidden @ w (+ bias_V), `chunk_size` positions
  at a time (0: all at once), through the fused path of the cross-entropy (`fused_output_loss`): per device on
  its rows on a mesh, gradients accumulated in the forward pass, one chunk's float32 [B, C, V] alive.

  The loss needs each position's whole predicted distribution (KL over the random ids), not one NLL, so each
  chunk's gradient wrt its logits comes from autodiff of `gidd_token_loss` on that chunk alone.
  """
  return fused_output_loss(functools.partial(_gidd_chunk, noise), num_real_tokens, chunk_size, hidden_BxLxD, w_DxV,
                           bias_V, (targets_BxL, noisy_BxL, corruptible_BxL), (t_B,))


def _gidd_chunk(noise, logits_BxCxV, log_z_BxC, nll_BxC, per_position, per_row):
  del log_z_BxC, nll_BxC  # the mixed-noise loss normalises with [MASK] banned (gidd_divergences)
  (y_BxC, noisy_BxC, corruptible_BxC), (t_B,) = per_position, per_row
  loss = lambda logits: jnp.sum(gidd_token_loss(logits, y_BxC, noisy_BxC, corruptible_BxC, t_B, noise))
  return jax.value_and_grad(loss)(logits_BxCxV)


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
