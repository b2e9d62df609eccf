"""Downstream: metrics on hand-made cases, shipped data, benchmark loaders, heads, and short
fine-tunes on the shipped structure set that beat the trivial baselines."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ankh3_jax import model_io
from ankh3_jax.config import preset
from ankh3_jax.downstream import benchmarks
from ankh3_jax.downstream import data
from ankh3_jax.downstream import features as feats
from ankh3_jax.downstream import finetune as ft
from ankh3_jax.downstream import heads
from ankh3_jax.downstream import metrics
from ankh3_jax.downstream import tasks
from ankh3_jax.downstream import training
from ankh3_jax.model import Transformer

IGNORE = data.IGNORE


# ------------------------------------------------------------------------------ metrics


def test_residue_accuracy_skips_ignored_labels():
  labels = [np.array([0, 1, 2, IGNORE]), np.array([2, 2])]
  preds = [np.array([0, 1, 0, 1]), np.array([2, 0])]
  assert metrics.residue_accuracy(preds, labels) == pytest.approx(3 / 5)
  assert metrics.majority_class(labels, 3) == 2
  with pytest.raises(ValueError, match="shape"):
    metrics.residue_accuracy([np.array([0])], [np.array([0, 1])])


def test_spearman():
  assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert metrics.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/60
  # Ties take average ranks: x ranks (1, 2.5, 2.5, 4).
  np.testing.assert_allclose(metrics.rankdata(np.array([5, 7, 7, 9])), [1, 2.5, 2.5, 4])
  assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
  assert np.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


def test_long_range_contact_precision():
  length = 30  # top L/5 = 6 pairs among |i-j| >= 24: (0,24..29), (1,25..29), ...
  contacts = np.zeros((length, length), bool)
  scores = np.zeros((length, length))
  pairs = [(0, 24), (0, 25), (1, 26), (2, 27), (3, 28), (5, 29)]
  for rank, (i, j) in enumerate(pairs):
    scores[i, j] = 10 - rank
  for i, j in pairs[:3]:
    contacts[i, j] = contacts[j, i] = True
  contacts[0, 5] = True  # short range: never counted
  scores[0, 5] = 100.0
  assert metrics.contact_precision(scores, contacts) == pytest.approx(3 / 6)
  long_pairs = sum(1 for i in range(length) for j in range(i + 24, length))
  assert metrics.random_contact_precision([contacts]) == pytest.approx(3 / long_pairs)
  assert np.isnan(metrics.contact_precision(np.zeros((10, 10)), np.zeros((10, 10), bool)))


# ------------------------------------------------------------------------------- data


def test_shipped_structure_set():
  splits = {s: data.load_chains(s) for s in data.SPLITS}
  assert [len(splits[s]) for s in data.SPLITS] == [1000, 150, 150]
  ids = [c.id for s in data.SPLITS for c in splits[s]]
  assert len(ids) == len(set(ids))
  sequences = {s: {c.sequence for c in splits[s]} for s in data.SPLITS}
  assert not sequences["train"] & (sequences["validation"] | sequences["test"])
  for chain in splits["test"][:20]:
    assert len(chain.sequence) == len(chain.dssp8) == len(chain.cb) >= 50
    assert set(chain.dssp8) <= set(data.SS8_CLASSES) and set(chain.ss3) <= set("HEC")
    steps = np.linalg.norm(np.diff(chain.cb, axis=0), axis=1)  # consecutive CBs
    assert 3.0 < np.median(steps) < 7.0
    cmap = data.contact_map(chain.cb)
    assert (cmap == cmap.T).all() and cmap.diagonal().all()
  assert data.ss8_to_ss3("HGIEBTSC") == "HHHEECCC"


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_secondary_structure_csv(tmp_path):
  path = _write(tmp_path, "cb513.csv", "input,dssp3,dssp8,disorder\n"
                "MKTAY,CHHEC,CHGEL,1 1 1 0 1\nGGS,CCC,TSC,1 1 1\n")
  records = benchmarks.load_secondary_structure(path, mask_column="disorder")
  assert records[0].sequence == "MKTAY" and records[0].ss3 == "CHH-C"
  assert records[0].ss8 == "CHG-C" and records[1].id == "line3"
  examples = ft.ss_benchmark_examples("ss3", records)
  assert examples[0].label.tolist() == [2, 0, 0, IGNORE, 2]
  only8 = benchmarks.load_secondary_structure(
      _write(tmp_path, "ts115.csv", "sequence,ss8\nMKT,HGB\n"))
  assert only8[0].ss3 == "HHE"


@pytest.mark.parametrize("text, message", [
    ("sequence,label\nMKT,HHH\n", "no 3-state label|no secondary-structure"),
    ("input,dssp3\nMKT,HH\n", "line 2, record 'line2': dssp3 has 2 labels for 3"),
    ("input,dssp3\nMKT,HXH\n", "unknown state"),
    ("input,dssp3\nMK1,HHH\n", "illegal residue"),
    ("input,dssp3\n", "no data rows"),
    ("id,input,dssp3\na,MK,HH\na,GG,CC\n", "duplicate id"),
])
def test_secondary_structure_csv_errors(tmp_path, text, message):
  path = _write(tmp_path, "bad.csv", text)
  with pytest.raises(benchmarks.BenchmarkError, match=message) as info:
    benchmarks.load_secondary_structure(path)
  assert path in str(info.value)


def test_fitness_csv(tmp_path):
  flip = _write(tmp_path, "gb1.csv", "sequence,target,set,validation\nMKTA,1.5,train,False\n"
                "MKTG,0.2,train,True\nMKTW,-0.3,test,False\n")
  records = benchmarks.load_fitness(flip)
  assert [(r.split, r.target) for r in records] == [("train", 1.5), ("validation", 0.2),
                                                     ("test", -0.3)]
  tape = benchmarks.load_fitness(_write(tmp_path, "gfp.csv",
                                        "primary,log_fluorescence\nMKT,3.2\n"))
  assert tape[0].target == pytest.approx(3.2) and tape[0].split == ""
  with pytest.raises(benchmarks.BenchmarkError, match="line 2.*not a number"):
    benchmarks.load_fitness(_write(tmp_path, "b.csv", "sequence,target\nMKT,high\n"))
  with pytest.raises(benchmarks.BenchmarkError, match="no target column"):
    benchmarks.load_fitness(_write(tmp_path, "c.csv", "sequence,y\nMKT,1\n"))
  with pytest.raises(benchmarks.BenchmarkError, match="file not found"):
    benchmarks.load_fitness(str(tmp_path / "missing.csv"))


# ------------------------------------------------------------------------------ heads


@pytest.mark.parametrize("head", [heads.ResidueClassifier(8), heads.SequenceRegressor(),
                                  heads.ContactPredictor(pair_dim=8)],
                         ids=["residue", "sequence", "contacts"])
def test_heads_ignore_padding(head):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 12, 16)).astype(np.float32)
  mask = np.ones((1, 12), np.float32)
  padded_x = np.concatenate([x, rng.normal(size=(1, 4, 16)).astype(np.float32)], axis=1)
  padded_mask = np.concatenate([mask, np.zeros((1, 4), np.float32)], axis=1)
  params = jax.jit(head.init)(jax.random.PRNGKey(0), padded_x, padded_mask)
  apply = jax.jit(head.apply)
  short = np.asarray(apply(params, x, mask))
  long = np.asarray(apply(params, padded_x, padded_mask))
  if isinstance(head, heads.ContactPredictor):
    assert long.shape == (1, 16, 16) and np.allclose(long, np.swapaxes(long, 1, 2))
    long = long[:, :12, :12]
  elif isinstance(head, heads.ResidueClassifier):
    long = long[:, :12]
  np.testing.assert_allclose(short, long, atol=1e-5)


# ------------------------------------------------------------------------- task table


def _record_examples(record, n=3, length=60):
  """A few short examples of a task: shipped chains cut to `length`, or (no shipped
  labels) made-up values."""
  chains = [dataclasses.replace(c, sequence=c.sequence[:length], dssp8=c.dssp8[:length],
                                cb=c.cb[:length]) for c in data.load_chains("test", limit=n)]
  if record.chain_label is not None:
    return record.chain_examples(chains)
  return [tasks.Example(c.id, c.sequence, np.float32(i)) for i, c in enumerate(chains)]


@pytest.mark.parametrize("name", tasks.NAMES)
def test_every_task_record_trains_predicts_and_scores(name):
  """What each record must provide: labels in its batch layout, a loss that training
  lowers, one prediction per example shaped like its label, a metric and a baseline."""
  record = tasks.get(name)
  examples = _record_examples(record)
  inputs = feats.onehot([e.sequence for e in examples])
  trainer = training.HeadTrainer(record, record.make_head("linear", 0.0),
                                 training.make_optimizer(30, 1e-2))
  batch = training.make_batch(record, examples, inputs, 4, False, 64)
  level = record.layout.level
  assert batch["label"].shape == {"residue": (4, 64), "pair": (4, 64, 64),
                                  "sequence": (4,)}[level]
  assert (batch["label"][3] == record.layout.fill).all()  # the empty row
  stats = record.label_stats(examples)
  params = trainer.init(jax.random.PRNGKey(0), batch, inputs[0].shape[-1])
  loss = jax.jit(lambda p: record.loss(trainer.forward(p, batch, True), batch, stats))
  before = float(loss(params))
  params = trainer.train(params, examples, inputs, steps=30, batch_size=3,
                         order=np.random.default_rng(0), rng=jax.random.PRNGKey(1),
                         label_stats=stats, quantum=64)
  assert np.isfinite(before) and float(loss(params)) < before
  predictions = trainer.predict(params, examples, inputs, batch_size=4, label_stats=stats,
                                quantum=64)
  for example, prediction in zip(examples, predictions):
    assert np.shape(prediction) == np.shape(example.label)
  scored = record.score(predictions, examples, examples)
  assert np.isfinite(scored["metric"]) and np.isfinite(scored["baseline"])
  assert scored["metric_name"] and scored["baseline_name"]
  if record.classes:
    assert all(0 <= p.min() and p.max() < len(record.classes) for p in predictions)
  if record.to_text is not None:
    assert record.to_text(examples[0].label) and record.to_text(predictions[0])
  if record.chain_states is not None:  # letters for the seqio text-to-text task
    chain = data.load_chains("test", limit=1)[0]
    assert set(record.chain_states(chain)) <= set(record.classes)
    np.testing.assert_array_equal(data.encode_labels(record.chain_states(chain),
                                                     record.classes),
                                  record.chain_label(chain))


def test_onehot_window_holds_each_neighbour_in_its_block_and_zeros_beyond_the_ends():
  sequences = ["ACDKW", "M"]
  radius = 2
  windows = feats.onehot_window(sequences, radius=radius)
  for seq, window, single in zip(sequences, windows, feats.onehot(sequences)):
    assert window.shape == (len(seq), (2 * radius + 1) * 25) and window.dtype == np.float32
    blocks = window.reshape(len(seq), 2 * radius + 1, 25)  # [position, offset, residue]
    for i in range(len(seq)):
      for k, offset in enumerate(range(-radius, radius + 1)):
        j = i + offset
        expected = single[j] if 0 <= j < len(seq) else np.zeros(25, np.float32)
        np.testing.assert_array_equal(blocks[i, k], expected, err_msg=f"{seq} {i} {offset}")
  assert windows[0][0, 2 * 25 + feats.ONEHOT_ALPHABET.index("A")] == 1.0  # itself, centre
  assert windows[0][0, 4 * 25 + feats.ONEHOT_ALPHABET.index("D")] == 1.0  # two on
  assert windows[0][0, :2 * 25].sum() == 0  # before the start
  np.testing.assert_array_equal(feats.onehot_window(sequences, 0)[0], feats.onehot(sequences)[0])
  assert feats.onehot_window([""], 7)[0].shape == (0, 375)
  with pytest.raises(ValueError, match="radius"):
    feats.onehot_window(sequences, -1)


def test_task_table_errors():
  with pytest.raises(ValueError, match="unknown task 'rsa'"):
    tasks.get("rsa")
  with pytest.raises(ValueError, match="no shipped data"):
    tasks.get("fitness").chain_examples(data.load_chains("test", limit=1))
  stats = tasks.get("fitness").label_stats(
      [tasks.Example("a", "MK", np.float32(v)) for v in (1.0, 3.0)])
  np.testing.assert_allclose(stats, [2.0, 1.0])
  assert tasks.get("fitness").decode(np.float32(0.5), stats) == pytest.approx(2.5)
  np.testing.assert_array_equal(tasks.get("ss3").label_stats([]), [0.0, 1.0])


# ------------------------------------------------------------------------ fine-tuning


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A randomly initialised tiny Ankh3 (no trained weights ship with the repository)."""
  config = preset("tiny")
  model = Transformer(config)
  ones = jnp.ones((1, 8), jnp.int32)
  variables = jax.jit(lambda k: model.init(k, ones, ones, ones, enable_dropout=False))(
      jax.random.PRNGKey(0))
  path = str(tmp_path_factory.mktemp("downstream") / "tiny")
  model_io.save_model(path, config, variables["params"])
  return path


def _data(task, train=200, evaluate=40):
  return ft.load_task_data(task, train_limit=train, eval_limit=evaluate)


def test_onehot_probes_beat_baselines():
  train, test = _data("ss3")
  ss3 = ft.train_and_evaluate("ss3", train, test, features="onehot", head="linear",
                              steps=100, batch_size=8, learning_rate=1e-2,
                              length_quantum=320)
  print(f"one-hot linear SS3: Q3 {ss3.metric:.3f} vs majority {ss3.baseline:.3f}")
  assert ss3.metric > ss3.baseline + 0.08
  train, test = _data("contacts")
  contacts = ft.train_and_evaluate("contacts", train, test, features="onehot",
                                   head="linear", steps=100, batch_size=8,
                                   learning_rate=1e-2, length_quantum=320)
  print(f"one-hot linear contacts: P@L/5 {contacts.metric:.3f} vs random "
        f"{contacts.baseline:.3f}")
  assert contacts.metric > 1.5 * contacts.baseline


def test_convbert_on_frozen_tiny_embeddings_beats_majority(tiny_model_dir):
  # Chains of <= 126 residues: two embedding buckets and one padded length to compile.
  train, test = (
      [e for e in split if len(e.sequence) <= 126][:n]
      for split, n in zip(_data("ss3", train=600, evaluate=150), (160, 40)))
  result = ft.train_and_evaluate("ss3", train, test, model=tiny_model_dir,
                                 features="embed", head="convbert", steps=60, batch_size=8,
                                 learning_rate=2e-3, length_quantum=128)
  print(f"tiny random encoder + ConvBERT SS3: Q3 {result.metric:.3f} vs majority "
        f"{result.baseline:.3f}")
  assert result.metric > result.baseline + 0.05


def test_full_finetuning_and_cli(tiny_model_dir, tmp_path, capsys):
  out = tmp_path / "result.json"
  assert ft.main(["--task", "ss8", "--model_dir", tiny_model_dir, "--finetune_encoder",
                  "--head", "linear", "--steps", "3", "--batch_size", "4",
                  "--train_limit", "8", "--eval_limit", "4", "--length_quantum", "320",
                  "--output_json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert report[0]["metric_name"] == "Q8" and report[0]["extra"]["features"] == "finetune"
  assert "Q8" in capsys.readouterr().out
  assert ft.main(["--task", "fitness", "--features", "onehot"]) == 2
  assert "no shipped data" in capsys.readouterr().err


def test_fitness_regression_from_csv(tmp_path):
  """A FLIP-style CSV whose target (lysine + arginine fraction) a mean-pooled probe can learn."""
  rows = ["sequence,target,set,validation"]
  for i, chain in enumerate(data.load_chains("train", limit=120)):
    seq = chain.sequence[:60]
    split = "test" if i >= 90 else "train"
    rows.append(f"{seq},{(seq.count('K') + seq.count('R')) / len(seq):.4f},{split},False")
  path = _write(tmp_path, "flip.csv", "\n".join(rows) + "\n")
  out = tmp_path / "fitness.json"
  assert ft.main(["--task", "fitness", "--features", "onehot", "--head", "linear",
                  "--fitness_csv", path, "--steps", "150", "--learning_rate", "3e-2",
                  "--length_quantum", "64", "--output_json", str(out)]) == 0
  report = json.loads(out.read_text())[0]
  print(f"fitness Spearman {report['metric']:.3f}")
  assert report["metric_name"] == "Spearman" and report["metric"] > 0.5


def test_seqio_secondary_structure_tasks():
  seqio = pytest.importorskip("seqio")
  from ankh3_jax.tasks import downstream as tasks  # pylint: disable=g-import-not-at-top

  chain = data.load_chains("validation")[0]
  for name, states in ((tasks.SS3_TASK, chain.ss3), (tasks.SS8_TASK, chain.dssp8)):
    task = seqio.get_mixture_or_task(name)
    assert set(task.splits) == set(data.SPLITS)
    example = next(iter(task.get_dataset({"inputs": 512, "targets": 512}, split="validation",
                                         shuffle=False).as_numpy_iterator()))
    assert example["inputs"][0] == 3 and example["inputs"][-1] == 1  # [NLU] ... eos
    assert len(example["inputs"]) == len(chain.sequence) + 2
    assert example["targets_pretokenized"].decode() == states
    assert len(example["targets"]) == len(states) + 1
  assert tasks.residue_accuracy(["HHEC", "CC"], ["HHEE", "C"]) == {
      "residue_accuracy": pytest.approx(100 * 4 / 6)}
