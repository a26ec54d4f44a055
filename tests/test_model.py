import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowlm_jax.models.llama import ModelConfig, Transformer
from flowlm_jax.models.registry import count_params

CFG = ModelConfig(vocab_size=128, num_real_tokens=120, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  compute_dtype="float32")


def make(cfg=CFG, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def tokens(B=2, T=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 5, CFG.num_real_tokens)


def test_logits_shape_and_padded_vocab_never_predicted():
  logits = make()(tokens())
  assert logits.shape == (2, 12, 128) and logits.dtype == jnp.float32
  assert np.all(np.asarray(logits[..., 120:]) < -1e30)
  assert np.all(np.isfinite(np.asarray(logits[..., :120])))


def test_right_padding_does_not_change_real_positions():
  model, x = make(), tokens()
  alone = model(x[1:, :7])
  padded = x.at[1, 7:].set(0)
  by_lengths = model(padded, kv_lengths_B=jnp.array([12, 7], jnp.int32))
  by_mask = model(padded, valid_BxT=jnp.arange(12)[None] < jnp.array([[12], [7]]))
  np.testing.assert_allclose(by_lengths[1, :7], alone[0], atol=1e-5)
  np.testing.assert_allclose(by_mask[1, :7], alone[0], atol=1e-5)
  np.testing.assert_allclose(by_lengths[0], model(x[:1])[0], atol=1e-5)


def test_left_padding_with_shifted_positions_matches_unpadded():
  model, x = make(), tokens(B=1, T=8)
  pad = 4
  padded = jnp.concatenate([jnp.zeros((1, pad), x.dtype), x], axis=1)
  valid = padded != 0
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  out = model(padded, valid_BxT=valid, positions_BxT=positions)
  np.testing.assert_allclose(out[0, pad:], model(x)[0], atol=1e-5)


def test_attention_is_bidirectional():
  model, x = make(), tokens(B=1)
  changed = x.at[0, -1].set((x[0, -1] + 1) % 100 + 5)
  assert not np.allclose(model(x)[0, 0], model(changed)[0, 0])  # the first position sees the last


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
  x = tokens()
  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(x)[..., :120])[..., 7])
  base = make()
  other = Transformer(CFG.__class__(**{**CFG.__dict__, "remat": policy}), rngs=nnx.Rngs(params=0))
  l0, g0 = nnx.value_and_grad(loss)(base)
  l1, g1 = nnx.value_and_grad(loss)(other)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  bf = Transformer(CFG.__class__(**{**CFG.__dict__, "compute_dtype": "bfloat16"}), rngs=nnx.Rngs(params=0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf, nnx.Param)))
  x = tokens()
  a, b = np.asarray(make()(x)[..., :120]), np.asarray(bf(x)[..., :120])
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2


def test_every_parameter_names_its_logical_axes():
  state = nnx.state(make(), nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_parameter_count_matches_the_shapes():
  c = CFG
  per_layer = 2 * c.d_model + c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.d_model * c.d_ff
  expected = c.n_layers * per_layer + 2 * c.vocab_size * c.d_model + c.d_model
  assert count_params(make()) == expected


def test_tied_embeddings_share_the_table():
  tied = Transformer(CFG.__class__(**{**CFG.__dict__, "tie_embeddings": True}), rngs=nnx.Rngs(params=0))
  assert not hasattr(tied, "unembed")
  np.testing.assert_array_equal(tied.output_matrix(), tied.embed[...].T)


# --- architecture options of imported checkpoints (Dream: q/k/v biases, shifted predictions) ---------------


def with_params_of(cfg, model):
  """A model of `cfg` carrying `model`'s parameters (the architectures differ only in how they are used)."""
  graphdef, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=1)))
  return nnx.merge(graphdef, nnx.state(model, nnx.Param))


def test_qkv_biases_are_used_not_decayed_and_replicated():
  from flowlm_jax import train

  cfg = dataclasses.replace(CFG, qkv_bias=True)
  model, x = make(cfg), tokens()
  state = nnx.state(model, nnx.Param)
  assert (model.bq.shape, model.bk.shape, model.bv.shape) == ((2, 4, 8), (2, 2, 8), (2, 2, 8))
  np.testing.assert_allclose(model(x), make()(x), atol=1e-6)  # zero-initialised: the same network
  decays = train.decay_mask(state)
  assert not any(decays[name] for name in ("bq", "bk", "bv")) and decays["wq"]
  for name in ("bq", "bk", "bv"):
    before = model(x)
    getattr(model, name)[...] = getattr(model, name)[...] + 0.5
    assert not np.allclose(model(x), before), name  # each bias reaches the output


def test_shifted_logits_read_the_previous_position():
  plain, x = make(), tokens()
  shifted = with_params_of(dataclasses.replace(CFG, shift_logits=True), plain)
  a, b = np.asarray(plain(x)), np.asarray(shifted(x))
  np.testing.assert_array_equal(b[:, 1:], a[:, :-1])
  np.testing.assert_array_equal(b[:, 0], a[:, 0])  # position 0 has no predecessor: its own (as in Dream)


def test_shift_follows_positions_not_columns_in_the_samplers_row_order():
  """[answer | prompt | pads] with the positions of [prompt | answer] (decoding_passes.py): the first answer
  column reads the last real prompt token, never a padding column whose position number it shares."""
  cfg = dataclasses.replace(CFG, shift_logits=True)
  model, x = make(cfg), tokens(B=1, T=10)
  n_prompt, n_pad = 6, 3
  prompt, answer = x[:, :n_prompt], x[:, n_prompt:]
  row = jnp.concatenate([answer, prompt, jnp.zeros((1, n_pad), x.dtype)], axis=1)
  positions = jnp.concatenate([n_prompt + jnp.arange(4), jnp.arange(n_prompt + n_pad)])[None]
  reordered = model(row, positions_BxT=positions, kv_lengths_B=jnp.array([4 + n_prompt], jnp.int32))
  in_order = model(x)
  np.testing.assert_allclose(reordered[:, :4], in_order[:, n_prompt:], atol=1e-5)
  np.testing.assert_allclose(reordered[:, 4:4 + n_prompt], in_order[:, :n_prompt], atol=1e-5)
