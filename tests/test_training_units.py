"""Losses, schedules, optimizers, microbatching and the NaN guard (one device, fast)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib
from ankh3_jax import partitioning
from ankh3_jax.training import losses
from ankh3_jax.training import optimizers
from ankh3_jax.training import state as state_lib
from ankh3_jax.training import steps
from ankh3_jax.training import synthetic_data
from ankh3_jax.training import trainer as trainer_lib

FEATURES = {"inputs": 16, "targets": 16}


# ----- losses ------------------------------------------------------------------------

def _logits_targets(seed=0, vocab=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, 5, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  return logits, targets, weights


def test_token_losses_match_numpy():
  logits, targets, weights = _logits_targets()
  out = losses.token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                            z_loss=1e-2)
  log_z = np.log(np.exp(logits).sum(-1))
  ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(out["cross_entropy"], (ce * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["z_loss"], (1e-2 * log_z ** 2 * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["loss"], ((ce + 1e-2 * log_z ** 2) * weights).sum(),
                             rtol=1e-5)
  hits = (logits.argmax(-1) == targets) * weights
  assert float(out["correct"]) == hits.sum()
  assert float(out["weight"]) == weights.sum()


def test_label_smoothing_is_zero_at_the_smoothed_target():
  vocab, smoothing = 6, 0.1
  conf, low = 1 - smoothing, smoothing / (vocab - 1)
  target_probs = np.full(vocab, low)
  target_probs[2] = conf
  logits = jnp.log(jnp.asarray(target_probs, jnp.float32))[None, None]
  out = losses.token_losses(logits, jnp.array([[2]]), jnp.ones((1, 1)), label_smoothing=smoothing)
  assert abs(float(out["loss"])) < 1e-5
  assert float(out["cross_entropy"]) == pytest.approx(-np.log(conf), rel=1e-5)


def test_normalizing_factors():
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  factor = lambda f: float(losses.normalizing_factor(losses.LossConfig(f), weights))
  assert factor(losses.NUM_REAL_TARGET_TOKENS) == 3.0
  assert factor(losses.NUM_TOTAL_TARGET_TOKENS) == 6.0
  assert factor(233472.0) == 233472.0
  assert factor(None) == 1.0
  with pytest.raises(ValueError, match="unknown loss_normalizing_factor"):
    losses.LossConfig("TOKENS")
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.LossConfig(label_smoothing=1.0)


# ----- schedules and optimizers -----------------------------------------------------

def test_schedules():
  at = lambda s, count: float(s(count))
  rsqrt = optimizers.make_schedule("rsqrt", 1.0, warmup_steps=100)
  assert at(rsqrt, 0) == pytest.approx(0.01)
  assert at(rsqrt, 99) == pytest.approx(1.0)
  assert at(rsqrt, 399) == pytest.approx(0.5)
  t5 = optimizers.make_schedule("rsqrt", 0.01, 10_000, warmup="constant")
  assert at(t5, 0) == pytest.approx(0.01) and at(t5, 39_999) == pytest.approx(0.005)
  linear = optimizers.make_schedule("linear", 2.0, 10, default_decay_steps=110)
  assert at(linear, 9) == pytest.approx(2.0)
  assert at(linear, 59) == pytest.approx(1.0)
  assert at(linear, 109) == pytest.approx(0.0) and at(linear, 500) == pytest.approx(0.0)
  cosine = optimizers.make_schedule("cosine", 1.0, 0, decay_steps=101, end_learning_rate=0.1)
  assert at(cosine, 0) == pytest.approx(1.0)
  assert at(cosine, 50) == pytest.approx(0.55, abs=1e-3)
  assert at(cosine, 100) == pytest.approx(0.1)
  values = [at(cosine, c) for c in range(0, 120, 7)]
  assert values == sorted(values, reverse=True)
  assert at(optimizers.make_schedule("constant", 3.0, 0), 1234) == 3.0
  with pytest.raises(ValueError, match="unknown schedule"):
    optimizers.make_schedule("exp")
  with pytest.raises(ValueError, match="needs decay_steps"):
    optimizers.make_schedule("linear")


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_minimise_a_quadratic(name):
  tx = optimizers.make_optimizer(optimizers.make_schedule("constant", 0.05, 0), name=name,
                                 grad_clip_norm=10.0)
  params = {"w": jnp.full((4, 3), 2.0), "b": jnp.full((3,), -1.0)}
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  opt_state = tx.init(params)
  start = float(loss(params))

  @jax.jit
  def update(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(50):
    params, opt_state = update(params, opt_state)
  assert float(loss(params)) < 0.5 * start


def test_unknown_optimizer_and_hyperparameter():
  schedule = optimizers.make_schedule("constant", 1.0, 0)
  with pytest.raises(ValueError, match="unknown optimizer 'no_such'"):
    optimizers.make_optimizer(schedule, name="no_such")
  with pytest.raises(ValueError, match="optimizer 'adamw'.*b3"):
    optimizers.make_optimizer(schedule, name="adamw", b3=0.9)
  with pytest.raises(ValueError, match="optax.lion"):
    optimizers.make_optimizer(schedule, name="lion", decay_rate=0.8)
  with pytest.raises(ValueError, match="optax.clip_by_global_norm"):  # no learning rate
    optimizers.make_optimizer(schedule, name="clip_by_global_norm")


def test_any_optax_optimizer_plugs_in_by_name():
  """An optax optimizer the project does not wrap, with a clip: what optax itself does."""
  schedule = optimizers.make_schedule("constant", 0.1, 0)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  grads = {"w": jnp.full((2, 3), 10.0)}
  tx = optimizers.make_optimizer(schedule, name="sgd", momentum=0.5, grad_clip_norm=1.0)
  expected = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.5))
  got, _ = tx.update(grads, tx.init(params), params)
  want, _ = expected.update(grads, expected.init(params), params)
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
  assert float(jnp.linalg.norm(got["w"])) == pytest.approx(0.1, rel=1e-5)


def test_gin_binds_optimizers_and_the_loss_explicitly():
  """Gin builds what it is told to; Python calls of the factories never see a binding."""
  import gin  # pylint: disable=g-import-not-at-top

  @gin.configurable("probe_inputs")
  def probe(loss_config=None, optimizer=None):
    return loss_config, optimizer

  gin.clear_config()
  try:
    gin.parse_config("""
      probe_inputs.loss_config = @ankh3_jax.training.losses.LossConfig()
      probe_inputs.optimizer = @ankh3_jax.training.optimizers.adamw
      ankh3_jax.training.losses.LossConfig.z_loss = 0.5
      ankh3_jax.training.optimizers.adamw.b1 = 0.5
    """)
    loss_config, factory = probe()
    assert loss_config == losses.LossConfig(z_loss=0.5)
    assert losses.LossConfig().z_loss == 1e-4  # not injected
    schedule = optimizers.make_schedule("constant", 0.1, 0)
    params, grads = {"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))}
    first = lambda tx: tx.update(grads, tx.init(params), params)[0]["w"]
    # Adam's first update is lr * sign(g) whatever b1; the second shows b1.
    def second(tx):
      state = tx.init(params)
      _, state = tx.update(grads, state, params)
      return tx.update({"w": -grads["w"]}, state, params)[0]["w"]
    np.testing.assert_allclose(first(factory(schedule)), first(optimizers.adamw(schedule)),
                               rtol=1e-5)
    assert not np.allclose(second(factory(schedule)), second(optimizers.adamw(schedule)))
    np.testing.assert_allclose(second(factory(schedule)),
                               second(optimizers.adamw(schedule, b1=0.5)))
  finally:
    gin.clear_config()


# ----- train step: microbatches and NaN guard -----------------------------------------

@functools.lru_cache(maxsize=None)
def _initial(optimizer: str):
  """(model, tx, schedule, initial state, mesh, rules) on one device; cached, since the
  steps below do not donate their inputs."""
  cfg = config_lib.preset("tiny", num_encoder_layers=1, num_decoder_layers=1)
  model = model_lib.Transformer(cfg)
  schedule = optimizers.make_schedule("constant", 0.01, 0)
  tx = optax.sgd(0.5) if optimizer == "sgd" else optimizers.make_optimizer(schedule)
  mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
  rules = partitioning.standard_logical_axis_rules(mesh.axis_names)
  state = state_lib.StateFactory(model, tx, FEATURES).create(jax.random.key(0), mesh, rules)
  return model, tx, schedule, state, mesh, rules


def _setup(nan_policy="skip", num_microbatches=1, optimizer="adafactor"):
  model, tx, schedule, state, mesh, rules = _initial(optimizer)
  step = steps.make_train_step(model, tx, losses.LossConfig(), schedule,
                               num_microbatches=num_microbatches, nan_policy=nan_policy)
  return state, jax.jit(step), mesh, rules


def _batch(poison=False, size=8):
  source = synthetic_data.SyntheticSource(FEATURES, poison_batches=[0] if poison else [])
  layout = partitioning.DataLayout(size, 0, 1)
  return {k: jnp.asarray(v) for k, v in next(source.train_batches(layout)).items()}


def test_split_microbatches_is_strided():
  batch = {"x": jnp.arange(8)[:, None] * jnp.ones((1, 3))}
  micro = steps.split_microbatches(batch, 4)["x"]
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_gradient_accumulation_equals_full_batch():
  """4 microbatches of 2 == one batch of 8: same loss, gradient norm and (with plain SGD,
  so parameters move by exactly -lr * gradient) parameters. float32 sums in a different
  order: rtol 1e-5. (Adafactor/Adam are not used here: their first update is about
  sign(g), which rounding can flip for near-zero gradients.)"""
  batch = _batch()
  results = []
  for micro in (1, 4):
    state, step, mesh, rules = _setup(num_microbatches=micro, optimizer="sgd")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(1))
    results.append((state, metrics))
  (full, m_full), (accum, m_accum) = results
  np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_full["grad_norm"], m_accum["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               full.params, accum.params)


@pytest.mark.parametrize("policy", ["skip", "none"])
def test_nan_guard(policy):
  state, step, mesh, rules = _setup(nan_policy=policy)
  before = jax.device_get(state.params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, metrics = step(state, _batch(poison=True), jax.random.key(1))
  assert int(state.step) == 1
  assert float(metrics["nonfinite"]) == 1.0
  leaves = jax.tree.leaves(jax.device_get(state.params))
  if policy == "skip":
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))
  else:
    assert any(np.isnan(x).any() for x in leaves)


def test_unknown_nan_policy():
  with pytest.raises(ValueError, match="nan_policy"):
    steps.make_train_step(None, None, losses.LossConfig(), None, nan_policy="ignore")


def test_scanned_bf16_remat_model_trains_with_2d_partitioning():
  """The large-model settings (bf16 activations, nn.scan over layers, full remat, 2-D
  parameter rules with the extra 'layers' axis) on the tiny model: 2 steps, 2
  microbatches, then an evaluation."""
  cfg = config_lib.preset("tiny", dtype="bfloat16", scan_layers=True, remat_policy="full")
  source = synthetic_data.SyntheticSource(FEATURES)
  mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
  rules = partitioning.standard_logical_axis_rules(mesh.axis_names,
                                                   parameter_partitioning_dims=2)
  trainer = trainer_lib.Trainer(cfg, source, 8, 2, num_microbatches=2, mesh=mesh,
                                rules=rules)
  wi = trainer.state_shardings.params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert wi.spec == jax.sharding.PartitionSpec(None, "data", "model")
  with trainer.context():
    state = trainer.init_state()
    batches = source.train_batches(trainer.layout)
    for _ in range(2):
      state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
    scores = trainer.evaluate(state.params, trainer.eval_sets())
  assert set(scores) == {f"{t}/{m}" for t in synthetic_data.TASKS
                         for m in ("loss", "accuracy", "tokens")}


def test_data_sources_provide_the_protocol_and_train_rejects_others(tmp_path):
  from ankh3_jax.ablation import tokens  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training import data_source  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training import seqio_data  # pylint: disable=g-import-not-at-top
  assert not data_source.missing_members(synthetic_data.SyntheticSource(FEATURES))
  members = ("describe", "eval_task_names", "train_batches", "eval_batches",
             "check_inputs", "residue_stats")
  assert all(callable(getattr(seqio_data.SeqioSource, m)) for m in members)
  wrapped = tokens.TokenCountingSource(synthetic_data.SyntheticSource(FEATURES), "unused")
  assert not data_source.missing_members(wrapped)  # delegated members count
  assert data_source.missing_members(object()) == [
      "feature_lengths", "describe", "eval_task_names", "train_batches", "eval_batches"]
  cfg = config_lib.preset("tiny")
  with pytest.raises(trainer_lib.ConfigurationError, match="data_source lacks"):
    trainer_lib.train(model_dir=str(tmp_path / "run"), model_config=cfg,
                      data_source=object(), batch_size=8, train_steps=1)
  with pytest.raises(trainer_lib.ConfigurationError, match="optimizer must be a factory"):
    trainer_lib.train(model_dir=str(tmp_path / "run"), model_config=cfg,
                      data_source=synthetic_data.SyntheticSource(FEATURES), batch_size=8,
                      train_steps=1, optimizer="adamw")
  assert not (tmp_path / "run").exists()  # refused before any write
