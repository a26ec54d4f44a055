"""FP8 matmuls with delayed scaling (model.matmul_dtype = "fp8"; models/fp8.py).

Error bounds. A format with m mantissa bits rounds a normal value v to v(1 + d), |d| <= u = 2^-(m+1):
e4m3 (m = 3) u = 1/16, e5m2 (m = 2) u = 1/8. Below the smallest normal a value is off by at most half the
subnormal spacing, e = 2^-10 (e4m3) or 2^-17 (e5m2), in units of its scale s. So a quantized operand
a^ = a + da with |da| <= u|a| + e s, and each term of a product a b (summed over the contracted axis) is
off by |a^ b^ - a b| <= (u_a|a| + e_a s_a)((1 + u_b)|b| + e_b s_b) + |a|(u_b|b| + e_b s_b): for two e4m3
operands and no subnormals that is (2u + u^2)|a||b| = 0.1289 |a||b|. With the scale taken from the exact
absolute maximum nothing saturates, and the float32 accumulation adds a relative 2^-24 per term (covered
by the small relative slack below).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowlm_jax import checkpoint as ckpt_lib
from flowlm_jax import config as config_lib
from flowlm_jax import loop, train
from flowlm_jax.models import fp8
from helpers import REPO, tiny_config

E4M3 = (2.0 ** -4, 2.0 ** -10, 448.0)     # (u, subnormal half-spacing, largest value)
E5M2 = (2.0 ** -3, 2.0 ** -17, 57344.0)
EQUATION = "btd,df->btf"


def product_error_bound(a, b, fa, fb, scale_a, scale_b):
  """Per-element bound on |a^ @ b^ - a @ b| for a [M, K] in format fa, b [K, N] in fb (see the docstring)."""
  (ua, ea, _), (ub, eb, _) = fa, fb
  a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
  return (ua * a + ea * scale_a) @ ((1 + ub) * b + eb * scale_b) + a @ (ub * b + eb * scale_b)


def operands(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (2, 8, 64), jnp.float32)
  w = jax.random.normal(k[1], (64, 32), jnp.float32) * 0.05
  g = jax.random.normal(k[2], (2, 8, 32), jnp.float32) * 1e-3  # the loss's gradient w.r.t. the product
  return x, w, g


def _loss(x, w, meta, g):
  y = fp8.product(EQUATION, x, w, meta)
  return jnp.sum(y * g), y


_loss_and_grads = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2), has_aux=True))


def step(x, w, g, meta):
  """(product, d/dx, d/dw, next scaling state) of the loss sum(product * g), whose output gradient is g."""
  (_, y), grads = _loss_and_grads(x, w, meta, g)
  return (y, *grads)


def amax(a) -> float:
  return float(np.max(np.abs(np.asarray(a))))


def calibrated_meta(x, w, g, history=3):
  """A scaling state whose histories already hold these operands' exact maxima (as after one earlier step)."""
  meta = fp8.product_meta(history)
  for name, a in (("x", x), ("w", w), ("g", g)):
    meta[name]["amax_history"] = meta[name]["amax_history"].at[0].set(amax(a))
  return meta


def test_fp8_product_matches_float32_within_e4m3_error_and_is_coarser_than_bf16():
  x, w, g = operands()
  y = step(x, w, g, calibrated_meta(x, w, g))[0]
  x2, w2 = np.asarray(x).reshape(-1, 64), np.asarray(w)
  want = (x2.astype(np.float64) @ w2).reshape(y.shape)
  bound = product_error_bound(x2, w2, E4M3, E4M3, amax(x) / 448, amax(w) / 448).reshape(y.shape)
  err = np.abs(np.asarray(y, np.float64) - want)
  assert np.all(err <= bound * (1 + 1e-5))
  relative = np.linalg.norm(err) / np.linalg.norm(want)
  assert 0.01 < relative < 0.1  # quantized indeed: bf16 operands would be off by ~0.003


def test_a_bf16_operand_is_divided_by_its_float32_scale_not_a_bf16_rounding_of_it():
  """Scales just off a bf16 rounding boundary whose product is 1 (bf16-exact, so out_dq's rounding of it costs
  nothing): dividing by bf16-rounded scales scaled the product by 1/(bf16(s_x) bf16(s_w)), +0.4% here. In float32
  they cancel: the bf16 product matches the float32 compute dtype's (same e4m3 values) up to unbiased rounding."""
  x, w, _ = operands(2)
  x, w = x / amax(x) * 300.0, w / amax(w) * 300.0  # below 448 x the scale: nothing saturates
  scale_x = 1.0 + 2.0 ** -8 * 0.99  # bf16(scale_x) == 1.0
  meta = fp8.product_meta(4)
  for name, scale in (("x", scale_x), ("w", 1.0 / scale_x)):
    meta[name]["amax_history"] = meta[name]["amax_history"].at[0].set(scale * E4M3[2])
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  y = np.asarray(fp8.product(EQUATION, xb, wb, meta), np.float64)
  want = np.asarray(fp8.product(EQUATION, xb.astype(jnp.float32), wb.astype(jnp.float32), meta), np.float64)
  assert abs(np.sum(y * want) / np.sum(want * want) - 1) < 1e-3


def test_fp8_gradients_match_float32_within_e5m2_times_e4m3_error():
  x, w, g = operands(1)
  _, dx, dw, _ = step(x, w, g, calibrated_meta(x, w, g))
  x2, g2 = np.asarray(x).reshape(-1, 64), np.asarray(g).reshape(-1, 32)
  s_x, s_w, s_g = amax(x) / E4M3[2], amax(w) / E4M3[2], amax(g) / E5M2[2]
  dx_bound = product_error_bound(g2, np.asarray(w).T, E5M2, E4M3, s_g, s_w)
  dw_bound = product_error_bound(x2.T, g2, E4M3, E5M2, s_x, s_g)
  dx_want, dw_want = g2.astype(np.float64) @ np.asarray(w).T, x2.T.astype(np.float64) @ g2
  assert np.all(np.abs(np.asarray(dx).reshape(-1, 64) - dx_want) <= dx_bound * (1 + 1e-5))
  assert np.all(np.abs(np.asarray(dw) - dw_want) <= dw_bound * (1 + 1e-5))


def test_scaling_is_delayed_each_step_quantizes_with_the_maxima_of_the_steps_before():
  x, w, g = operands(2)
  meta = fp8.product_meta(history=3)
  seen = []
  for i in range(4):  # operand maxima differ each step; 4 steps through a history of 3 drop the first
    xi, gi = x * (i + 1), g * (4 - i)
    *_, meta = step(xi, w, gi, meta)
    seen.append((amax(xi), amax(gi)))
    kept = [a for a, _ in seen[-3:]]
    history = np.asarray(meta["x"]["amax_history"])
    np.testing.assert_allclose(history[0], kept[-1], rtol=1e-6)  # the newest first
    np.testing.assert_allclose(np.sort(history), np.sort(kept + [0.0] * (3 - len(kept))), rtol=1e-6)
    np.testing.assert_allclose(meta["g"]["amax_history"][0], seen[-1][1], rtol=1e-6)
    np.testing.assert_allclose(meta["w"]["amax_history"][0], amax(w), rtol=1e-6)
    before = seen[:-1][-3:]  # the history this step quantized with
    want_scale = max(a for a, _ in before) / E4M3[2] if before else 1.0  # empty history: scale 1
    np.testing.assert_allclose(meta["x"]["scale"], [want_scale], rtol=1e-6)
    want_grad_scale = max(b for _, b in before) / E5M2[2] if before else 1.0
    np.testing.assert_allclose(meta["g"]["scale"], [want_grad_scale], rtol=1e-6)


def test_micro_batches_of_one_step_combine_into_the_largest_maximum():
  x, w, g = operands(3)
  start = calibrated_meta(x, w, g)
  *_, small = step(x, w, g, start)
  *_, large = step(3 * x, w, g, start)
  combined = fp8.combine_micro_batches(small, large)
  np.testing.assert_allclose(combined["x"]["amax_history"][0], 3 * amax(x), rtol=1e-6)
  np.testing.assert_array_equal(combined["x"]["amax_history"][1:], small["x"]["amax_history"][1:])
  np.testing.assert_array_equal(combined["x"]["scale"], small["x"]["scale"])


def test_only_projection_shaped_equations_are_accepted():
  assert fp8.dimension_numbers("bthk,hkd->btd") == (((2, 3), (0, 1)), ((), ()))
  with pytest.raises(ValueError, match="fp8 einsum"):
    fp8.dimension_numbers("btd,bdf->btf")  # a batch axis


@pytest.fixture(scope="module")
def fp8_run():
  """A tiny LLaDA model trained 12 steps on one batch with matmul_dtype fp8: (setup, pieces, states, losses)."""
  c = tiny_config("llada", learning_rate=3e-3)
  c.model.matmul_dtype = "fp8"
  setup = loop.prepare(c)
  graphdef, abstract = train.abstract_model(setup.model_cfg)
  tx, _ = train.make_optimizer(setup.config.training, 50, abstract)
  shardings = train.state_shardings(setup.model_cfg, tx, setup.mesh)
  step_fn, _ = train.compile_steps(graphdef, tx, setup.step_cfg, shardings, setup.mesh)
  state = train.init_state(setup.model_cfg, tx, 0, shardings)
  batch = jax.tree.map(jnp.asarray, {"tokens": setup.train_split.tokens[:8],
                                     "corruptible": setup.train_split.corruptible[:8]})
  trained = lambda state: jax.tree.map(np.asarray, (state.params, state.opt_state))
  params = [trained(state)]  # params and optimiser state before step 1 and after it (steps donate their input)
  losses = []
  for _ in range(12):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
    if len(params) == 1:
      params.append(trained(state))
  return dict(setup=setup, tx=tx, shardings=shardings, step=step_fn, batch=batch, state=state, losses=losses,
              params=params)


def test_a_tiny_model_trains_with_fp8_and_its_loss_falls(fp8_run):
  losses = fp8_run["losses"]
  assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_the_first_step_only_calibrates_the_scales_then_training_moves_the_weights(fp8_run):
  """A fresh state quantizes at scale 1, which flushes most gradients below e5m2's smallest value: step 1 leaves
  weights and AdamW's moments (which would keep that gradient even at a warmup learning rate of 0) as they were."""
  before, after_first = fp8_run["params"]
  for got, want in zip(jax.tree.leaves(after_first), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(got, want)
  assert int(fp8_run["state"].nonfinite_count) == 0
  assert not np.array_equal(np.asarray(fp8_run["state"].params["final_norm"]), before[0]["final_norm"])


def test_the_logged_learning_rate_is_the_one_the_optimiser_applied(tmp_path):
  """FP8's first step applies no update, so the optimiser's schedule runs one step behind the train state's: the
  metrics rows log the rate of the newest applied update (before, schedule(step - 1), one step ahead)."""
  import json
  import os

  c = tiny_config("llada", learning_rate=1.0, warmup_steps=4, max_steps=8)
  c.model.matmul_dtype, c.logging.log_every = "fp8", 1
  workdir = str(tmp_path / "run")
  loop.run(c, workdir, stop_at_step=4)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]
  assert [row["learning_rate"] for row in rows] == [0.0, 0.0, 0.25, 0.5]  # warmup 0, 0.25, 0.5, 0.75 by update


def test_train_state_carries_a_per_layer_scaling_state_the_steps_update(fp8_run):
  state, cfg = fp8_run["state"], fp8_run["setup"].model_cfg
  matmuls = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
  assert set(state.fp8["weights"]) == set(state.fp8["gradients"]) == matmuls
  assert set(state.fp8["activations"]) == {"attn_in", "attn_out", "mlp_in", "mlp_hidden"}  # each quantized once
  assert jax.tree.structure(state.params) == jax.tree.structure(nnx.to_pure_dict(train.abstract_model(cfg)[1]))
  for meta in jax.tree.leaves(state.fp8, is_leaf=lambda m: "scale" in m):
    history = np.asarray(meta["amax_history"])
    assert history.shape == (cfg.n_layers, fp8.AMAX_HISTORY) and meta["scale"].shape == (cfg.n_layers, 1)
    assert np.all(np.count_nonzero(history, axis=1) == 12) and np.all(history[:, 0] > 0)  # 12 steps, newest first
  mlp_in = state.fp8["activations"]["mlp_in"]  # the last step's scale: the maxima of the 11 steps before it
  np.testing.assert_allclose(mlp_in["scale"][:, 0], np.max(mlp_in["amax_history"][:, 1:], axis=1) / E4M3[2], rtol=1e-6)


def test_a_nonfinite_step_leaves_the_scaling_state_as_it_was(fp8_run):
  state = jax.tree.map(jnp.copy, fp8_run["state"])  # the step donates its input
  state.params["final_norm"] = state.params["final_norm"].at[0].set(jnp.nan)  # NaN loss; the layers' maxima are finite
  before = jax.tree.map(np.asarray, state.fp8)
  state, metrics = fp8_run["step"](state, fp8_run["batch"])
  assert not bool(metrics["finite"]) and int(state.nonfinite_count) == 1
  for got, want in zip(jax.tree.leaves(state.fp8), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_fp8_scaling_state_round_trips_through_a_checkpoint(fp8_run, tmp_path):
  run = fp8_run
  abstract = ckpt_lib.restore_target(run["setup"].model_cfg, run["tx"], run["shardings"])
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(12, run["state"], {"epoch": 0, "position": 12}, {})
  ckpt.wait()
  restored, _ = ckpt.restore(12, abstract)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(run["state"])
  for got, want in zip(jax.tree.leaves(restored.fp8), jax.tree.leaves(run["state"].fp8), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.asarray(restored.fp8["gradients"]["wq"]["amax_history"]).any()


def test_restoring_across_matmul_dtypes_fails_in_one_line_naming_the_scaling_state(fp8_run, tmp_path):
  run = fp8_run
  fp8_target = ckpt_lib.restore_target(run["setup"].model_cfg, run["tx"], run["shardings"])
  bf16_cfg = dataclasses.replace(run["setup"].model_cfg, matmul_dtype="bfloat16")
  bf16_shardings = train.state_shardings(bf16_cfg, run["tx"], run["setup"].mesh)
  bf16_target = ckpt_lib.restore_target(bf16_cfg, run["tx"], bf16_shardings)
  assert bf16_target.fp8 is None
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, dataclasses.replace(run["state"], fp8=None), {}, {})  # what a bfloat16 run of this model saves
  ckpt.save(2, run["state"], {}, {})
  ckpt.wait()
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"/1 .*has no FP8 scaling state .*bfloat16 run") as e:
    ckpt.restore(1, fp8_target)
  assert "\n" not in str(e.value) and "missing" not in str(e.value)
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="holds an FP8 scaling state"):
    ckpt.restore(2, bf16_target)
  saved_config = run["setup"].config.to_dict()
  ckpt.close()
  bf16_config = config_lib.from_dict(saved_config)
  bf16_config.model.matmul_dtype = "bfloat16"
  differences = config_lib.resume_differences(saved_config, bf16_config.to_dict())
  assert differences == ["model.matmul_dtype ('fp8' -> 'bfloat16')"]


def test_bfloat16_runs_keep_the_train_state_and_step_they_had(fp8_run):
  """No fp8 field is saved, no f8 value is computed: the state and the step program are those of before."""
  setup, tx = fp8_run["setup"], fp8_run["tx"]
  cfg = dataclasses.replace(setup.model_cfg, matmul_dtype="bfloat16")
  shardings = train.state_shardings(cfg, tx, setup.mesh)
  state = jax.eval_shape(lambda: train.init_state(cfg, tx, 0, shardings))
  assert state.fp8 is None and shardings.fp8 is None
  assert set(ckpt_lib._state_dict(state)) == {"params", "opt_state", "step", "rng", "nonfinite_count",
                                              "last_nonfinite_step"}
  graphdef = train.abstract_model(cfg)[0]
  step_cfg = dataclasses.replace(setup.step_cfg, model=cfg)
  bf16_step, _ = train.compile_steps(graphdef, tx, step_cfg, shardings, setup.mesh)
  assert "f8E" not in bf16_step.lower(state, fp8_run["batch"]).as_text()


def test_matmul_dtype_is_validated_in_one_line():
  c = tiny_config("llada")
  c.model.matmul_dtype = "fp16"
  with pytest.raises(ValueError, match=r"model.matmul_dtype: 'fp16' is not one of bfloat16, fp8"):
    config_lib.validate(c)
  c.model.matmul_dtype = "fp8"
  config_lib.validate(c)
  c.model.compute_dtype = "float16"
  with pytest.raises(ValueError, match=r"model.matmul_dtype: fp8 needs model.compute_dtype bfloat16 or float32"):
    config_lib.validate(c)
  c.model.compute_dtype = "bfloat16"
  c.model.pretrained = c.model.tokenizer = os.path.join(REPO, "tests", "fixtures", "llada_tiny")  # a fine-tune
  config_lib.validate(c)
  c.model.family, c.model.pretrained, c.model.tokenizer = "modernbert", "answerdotai/ModernBERT-large", "x"
  with pytest.raises(ValueError, match=r"model.matmul_dtype: fp8 is implemented for the llama family only .*"
                                       r"family='modernbert' has no FP8 path") as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)
