"""Sharding: the logical-axis rules, and training on meshes of 8 simulated CPU devices.

The unit tests use abstract meshes (no devices). The integration tests run tests/mesh_worker.py once in
a subprocess with 8 CPU devices: the single-device run and the meshes (data, fsdp, tensor) = (8,1,1),
(2,4,1), (2,2,2), (1,1,8) see the same global batches and the same corruption noise (drawn from the state
rng, independent of sharding), so losses and parameters must agree to float32 rounding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from flowlm_jax import config as config_lib
from flowlm_jax import sharding, train
from flowlm_jax.models.llama import ModelConfig
from mesh_worker import run_worker

# Each parameter's logical axes (model.py) and the rules (sharding.LOGICAL_RULES), written out here on
# purpose: a change to either must show up as a failing test.
PARAM_AXES = {
    "embed": ("vocab", "embed"), "unembed": ("embed", "vocab"), "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads", "head_dim"), "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"), "wo": ("layers", "heads", "head_dim", "embed"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"), "w_down": ("layers", "mlp", "embed"),
}
RULES = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


def expected_specs(mesh_shape) -> dict[str, list]:
  """Specs when every dimension divides (mesh axes of size 1 shard nothing)."""
  size = dict(zip(sharding.MESH_AXES, mesh_shape))
  return {name: [RULES[a] if a in RULES and size[RULES[a]] > 1 else None for a in axes]
          for name, axes in PARAM_AXES.items()}


def test_expected_specs_spelled_out_for_2x2x2():
  specs = expected_specs((2, 2, 2))
  assert specs["wq"] == [None, "fsdp", "tensor", None]
  assert specs["wo"] == [None, "tensor", None, "fsdp"]
  assert specs["embed"] == ["tensor", "fsdp"] and specs["unembed"] == ["fsdp", "tensor"]
  assert specs["w_down"] == [None, "tensor", "fsdp"]
  assert specs["attn_norm"] == [None, None] and specs["final_norm"] == [None]


# --- unit: rules on abstract meshes ------------------------------------------------------------


def _model(**overrides) -> ModelConfig:
  kw = dict(vocab_size=8192, num_real_tokens=8192, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=128)
  return ModelConfig(**{**kw, **overrides})


def _shardings(model_cfg, mesh_shape):
  _, abstract = train.abstract_model(model_cfg)
  tx, _ = train.make_optimizer(config_lib.base_config().training, 10, abstract)
  return train.state_shardings(model_cfg, tx, AbstractMesh(mesh_shape, sharding.MESH_AXES))


def _as_list(spec, ndim):
  spec = list(spec) + [None] * (ndim - len(spec))
  return [list(s) if isinstance(s, tuple) else s for s in spec]


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8), (1, 8, 1)])
def test_state_shardings_follow_the_logical_rules(mesh_shape):
  sh = _shardings(_model(), mesh_shape)
  ndim = {k: len(v) for k, v in PARAM_AXES.items()}
  assert {k: _as_list(s.spec, ndim[k]) for k, s in sh.params.items()} == expected_specs(mesh_shape)
  # Adam's mu and nu take their parameter's sharding; everything else in the optimiser state is replicated.
  moments = 0
  for path, s in jax.tree_util.tree_leaves_with_path(sh.opt_state):
    keys = [sharding._key(k) for k in path]
    if {"mu", "nu"} & set(keys):
      moments += 1
      assert s == sh.params[keys[-1]], keys
    else:
      assert s.spec == P(), keys
  assert moments == 2 * len(PARAM_AXES)
  for s in (sh.step, sh.rng, sh.nonfinite_count, sh.last_nonfinite_step):
    assert s.spec == P()


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
  # 2 KV heads on a tensor axis of 8: replicated; the 8 query heads still split. d_model 72 on fsdp=16:
  # replicated everywhere it appears.
  sh = _shardings(_model(n_kv_heads=2), (1, 1, 8))
  assert sh.params["wk"].spec == P(None, None, None, None)
  assert sh.params["wq"].spec == P(None, None, "tensor", None)
  sh = _shardings(_model(d_model=72, n_heads=4, n_kv_heads=4), (1, 16, 1))
  assert all(s.spec == P(*([None] * len(PARAM_AXES[k]))) for k, s in sh.params.items())


def test_global_batch_on_one_process_holds_every_row():
  mesh = sharding.single_device_mesh()
  local = {"tokens": np.arange(12, dtype=np.int32).reshape(4, 3), "corruptible": np.ones((4, 3), bool)}
  batch = sharding.global_batch(local, mesh)
  assert batch["tokens"].shape == (4, 3) and batch["tokens"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
  assert sharding.process_rows(mesh, 4).tolist() == [0, 1, 2, 3]


# --- integration: 8 simulated devices ----------------------------------------------------------


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
  return run_worker("meshes", str(tmp_path_factory.mktemp("mesh_ckpt")), devices=8)


MESH_NAMES = ["8x1x1", "2x4x1", "2x2x2", "1x1x8"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_every_mesh_trains_like_one_device(meshes, mesh):
  assert meshes["device_count"] == 8
  ref = meshes["reference"]["losses"]
  got = meshes["meshes"][mesh]
  np.testing.assert_allclose(got["losses"], ref[:len(got["losses"])], rtol=1e-5)
  # After 3 AdamW steps of lr 3e-3 (updates ~3e-3 per entry and step): float32 reduction-order rounding,
  # which Adam's 1/sqrt(nu) amplifies only for entries with near-zero gradients (a few rare-token embedding
  # rows). A sharding bug (wrong rows, a missing reduction) moves most entries by ~lr.
  assert got["max_param_diff"] < 1e-4, got["max_param_diff"]
  assert got["params_over_1e-5"] <= 1e-4 * got["param_count"], got["params_over_1e-5"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_arrays_are_sharded_as_the_rules_say(meshes, mesh):
  got = meshes["meshes"][mesh]
  assert got["specs"] == expected_specs(tuple(int(n) for n in mesh.split("x")))
  assert got["opt_moments_checked"] == 2 * len(PARAM_AXES) and got["opt_moment_mismatches"] == []
  assert got["batch_spec"] == [["data", "fsdp"], None]


@pytest.mark.integration
@pytest.mark.slow
def test_parameters_initialised_in_shards_equal_the_unsharded_ones(meshes):
  assert meshes["init_identical"] == {"2x2x2": True}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x2x2", "1x1x1"])
def test_checkpoint_from_8x1x1_restores_on_other_meshes_and_continues(meshes, mesh):
  r = meshes["restores"][mesh]
  assert r["step"] == 3 and r["state_step"] == 3
  assert r["identical"] and r["max_param_diff"] == 0.0  # params, Adam state, rng, counters: bit-identical
  assert r["wrong_shardings"] == []  # restored straight into the target mesh's shardings
  assert r["next_batch_matches"]  # the data iterator resumes at the next batch
  np.testing.assert_allclose(r["next_loss"], meshes["saved_next_loss"], rtol=1e-5)
  np.testing.assert_allclose(r["next_loss"], meshes["reference"]["losses"][3], rtol=1e-5)


# --- what reaches the attention kernel (tests/attention_probe.py stands in for cuDNN's partitioner) ---


@pytest.fixture(scope="module")
def attention_calls():
  return run_worker("attention", devices=8)


def expected_attention_spec(mesh_shape, heads: int) -> list:
  """Rows over the batch axes that are > 1, heads over tensor when it divides them, nothing else split."""
  size = dict(zip(sharding.MESH_AXES, mesh_shape))
  rows = [a for a in sharding.BATCH_AXES if size[a] > 1]
  split_heads = size["tensor"] > 1 and heads % size["tensor"] == 0
  return [rows[0] if len(rows) == 1 else (rows or None), None, "tensor" if split_heads else None, None]


@pytest.mark.integration
@pytest.mark.parametrize("family, heads", [("llama", 8), ("modernbert", 4)])
def test_attention_inputs_share_one_layout_with_only_rows_and_heads_split(attention_calls, family, heads):
  # What failed on 2 H200s before: under fsdp cuDNN's partitioner got q, k, v in differing layouts; on the
  # CPU stand-in the batch arrived unsplit (every fsdp device attending over the whole batch).
  for mesh, result in attention_calls[family].items():
    assert "error" not in result, (mesh, result["error"])
    assert {call["kind"] for call in result["calls"]} == {"forward", "backward"}, mesh
    want = expected_attention_spec(tuple(int(n) for n in mesh.split("x")), heads)
    for call in result["calls"]:
      assert call["q"] == call["k"] == call["v"] == want, (mesh, call)
