"""The optional encoder-side MLM loss: labels from packed batches, the train step, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib
from ankh3_jax import partitioning
from ankh3_jax.training import losses
from ankh3_jax.training import optimizers
from ankh3_jax.training import state as state_lib
from ankh3_jax.training import steps

NLU, S2S, EOS = 3, 4, 1
S0, S1 = 255, 254  # <extra_id_0>, <extra_id_1>


def _packed_batch():
  """Row 0: two MLM examples (same sentinel ids in both); row 1: one completion example."""
  enc = np.zeros((2, 12), np.int32)
  dec = np.zeros((2, 10), np.int32)
  enc_seg = np.zeros_like(enc)
  dec_seg = np.zeros_like(dec)
  enc[0, :9] = [NLU, 5, S0, 7, S1, EOS, NLU, S0, EOS]
  enc_seg[0, :9] = [1, 1, 1, 1, 1, 1, 2, 2, 2]
  dec[0, :8] = [S0, 9, S1, 11, EOS, S0, 13, EOS]
  dec_seg[0, :8] = [1, 1, 1, 1, 1, 2, 2, 2]
  enc[1, :4] = [S2S, 5, 6, EOS]
  enc_seg[1, :4] = 1
  dec[1, :3] = [7, 8, EOS]
  dec_seg[1, :3] = 1
  decoder_inputs = np.pad(dec[:, :-1], ((0, 0), (1, 0))) * (dec_seg > 0)
  return {"encoder_input_tokens": enc, "decoder_target_tokens": dec,
          "decoder_input_tokens": decoder_inputs, "encoder_segment_ids": enc_seg,
          "decoder_segment_ids": dec_seg,
          "decoder_loss_weights": (dec > 0).astype(np.float32)}


def test_labels_are_the_residues_each_sentinel_replaced():
  batch = {k: jnp.asarray(v) for k, v in _packed_batch().items()}
  labels, weights = losses.encoder_mlm_labels(batch, 256, 226)
  expected = np.zeros((2, 12), np.int32)
  expected[0, 2], expected[0, 4], expected[0, 7] = 9, 11, 13  # per example, not per row
  np.testing.assert_array_equal(labels, expected)
  np.testing.assert_array_equal(weights, expected > 0)


def _state_and_step(weight):
  cfg = config_lib.preset("tiny", num_encoder_layers=1, num_decoder_layers=1)
  model = model_lib.Transformer(cfg)
  schedule = optimizers.make_schedule("constant", 3e-3, 0)
  tx = optax.adam(3e-3)
  mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
  rules = partitioning.standard_logical_axis_rules(mesh.axis_names)
  state = state_lib.StateFactory(model, tx, {"inputs": 12, "targets": 10}).create(
      jax.random.key(0), mesh, rules)
  config = losses.LossConfig(z_loss=0.0, encoder_mlm_weight=weight)
  step = jax.jit(steps.make_train_step(model, tx, config, schedule))
  return state, step


def test_train_step_adds_the_encoder_term_and_learns_it():
  batch = {k: jnp.asarray(v) for k, v in _packed_batch().items()}
  rng = jax.random.key(1)
  plain_state, plain = _state_and_step(0.0)
  state, step = _state_and_step(2.0)
  _, plain_metrics = plain(plain_state, batch, rng)
  assert "encoder_mlm_cross_entropy" not in plain_metrics
  new_state, metrics = step(state, batch, rng)
  # Same decoder term; the loss adds 2 x the encoder cross-entropy per masked residue.
  np.testing.assert_allclose(metrics["cross_entropy"], plain_metrics["cross_entropy"],
                             rtol=1e-6)
  np.testing.assert_allclose(
      metrics["loss"], plain_metrics["loss"] + 2.0 * metrics["encoder_mlm_cross_entropy"],
      rtol=1e-5)
  assert 3.0 < metrics["encoder_mlm_cross_entropy"] < 9.0  # about ln(256) at init
  first = float(metrics["encoder_mlm_cross_entropy"])
  for _ in range(60):
    new_state, metrics = step(new_state, batch, rng)
  assert metrics["encoder_mlm_cross_entropy"] < 0.3 * first
  assert metrics["encoder_mlm_accuracy"] == 1.0
