"""seqio tasks and mixture, sources (FASTA and TFDS), packing and the objective gin files."""
import collections
import math
import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import packing
from ankh3_jax.data import preprocessors as prep
from ankh3_jax.data import sources
from ankh3_jax.data import tfds_uniref50
from ankh3_jax.tasks import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 512, "targets": 512}
NLU, S2S, EOS = 3, 4, 1
TASKS = ("ankh3_mlm_p15", "ankh3_mlm_p20", "ankh3_mlm_p30", "ankh3_mlm_sampled",
         "ankh3_completion")
PACKED_KEYS = {"encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
               "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
               "decoder_segment_ids", "decoder_positions"}


@pytest.fixture
def restore_defaults():
  yield
  gin.clear_config()


def _rates(name):
  return dict(seqio.get_mixture_or_task(name).rate_per_task_name)


def _infer_task(inputs, targets):
  """Task of an unpacked example: completion by prefix, MLM probability by count."""
  if inputs[0] == S2S:
    return "ankh3_completion"
  assert inputs[0] == NLU
  n, m = len(inputs) - 2, (len(targets) - 1) // 2
  matches = [p for p in prep.DEFAULT_MASKING_PROBABILITIES
             if max(math.floor(p * n + 0.5), 1) == m]
  return pretrain.mlm_task_name(matches[0]) if len(matches) == 1 else None


def test_default_registration():
  for name in TASKS:
    task = seqio.TaskRegistry.get(name)
    assert set(task.output_features) == {"inputs", "targets"}
    assert all(f.add_eos and f.required for f in task.output_features.values())
    assert set(task.splits) == set(corpus.SPLITS)
  assert _rates("ankh3_pretrain") == pytest.approx({
      "ankh3_mlm_p15": 1 / 6, "ankh3_mlm_p20": 1 / 6, "ankh3_mlm_p30": 1 / 6,
      "ankh3_completion": 0.5})
  assert pretrain.mlm_task_name(0.125) == "ankh3_mlm_p12_5"


def test_unpacked_examples_end_with_eos_and_reconstruct():
  ds = seqio.get_mixture_or_task("ankh3_mlm_p15").get_dataset(
      LENGTHS, split="validation", shuffle=False, seed=0)
  for ex in ds.take(50).as_numpy_iterator():
    assert ex["inputs"][0] == NLU and ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
    assert len(ex["inputs"]) <= 512 and len(ex["targets"]) <= 512
    assert len(prep.reconstruct_mlm(ex["inputs"], ex["targets"])) == len(ex["inputs"]) - 2


def test_short_targets_fail_mlm_and_fit_completion():
  """512/64: MLM at 30% would need 307 target tokens, so building the dataset fails
  (no silent cap); completion crops a 63-residue window from the N-terminus."""
  lengths = {"inputs": 512, "targets": 64}
  with pytest.raises(prep.MaskingCapError, match="targets=64.*30.0%"):
    seqio.get_mixture_or_task("ankh3_mlm_p30").get_dataset(lengths, split="validation",
                                                           shuffle=False, seed=0)
  ds = seqio.get_mixture_or_task("ankh3_completion").get_dataset(
      lengths, split="validation", shuffle=False, seed=0)
  examples = list(ds.take(40).as_numpy_iterator())
  assert all(ex["inputs"][-1] == EOS and len(ex["targets"]) <= 33 for ex in examples)
  assert max(len(ex["inputs"]) for ex in examples) == 33  # [S2S] + 31 residues + eos
  cropped = [ex for ex in examples if ex["targets"][-1] != EOS]  # longer proteins
  assert cropped and all(len(ex["targets"]) == 32 for ex in cropped)


def test_mixture_proportions():
  ds = seqio.get_mixture_or_task("ankh3_pretrain").get_dataset(
      LENGTHS, split="train", shuffle=False, seed=5)
  prefixes, tasks = collections.Counter(), collections.Counter()
  total = 2000
  for ex in ds.take(total).as_numpy_iterator():
    prefixes[int(ex["inputs"][0])] += 1
    tasks[_infer_task(ex["inputs"], ex["targets"])] += 1
  bound = lambda q: 4 * math.sqrt(q * (1 - q) / total)
  assert set(prefixes) == {NLU, S2S}
  assert abs(prefixes[S2S] / total - 0.5) < bound(0.5)
  assert tasks[None] < 0.05 * total  # too short to tell the probabilities apart
  for name, rate in _rates("ankh3_pretrain").items():
    assert abs(tasks[name] / total - rate) < bound(rate) + tasks[None] / total, name


def test_packed_encdec_feature_converter():
  for converter, shuffle in (
      (seqio.EncDecFeatureConverter(pack=True), True),
      (packing.FirstFitEncDecFeatureConverter(pack=True, window=64), False)):
    ds = seqio.get_dataset("ankh3_pretrain", task_feature_lengths=LENGTHS,
                           dataset_split="validation", shuffle=shuffle, seed=1,
                           feature_converter=converter, batch_size=4)
    batch = next(ds.as_numpy_iterator())
    assert set(batch) == PACKED_KEYS
    for value in batch.values():
      assert value.shape == (4, 512) and value.dtype == np.int32
    assert batch["encoder_segment_ids"].max() >= 2  # rows hold several examples
    starts = batch["decoder_positions"] == 0
    real = batch["decoder_segment_ids"] > 0
    assert np.all(batch["decoder_input_tokens"][starts & real] == 0)  # decoder start
    assert np.all(batch["encoder_input_tokens"][batch["encoder_positions"] == 0][
        batch["encoder_segment_ids"][batch["encoder_positions"] == 0] > 0] <= S2S)


def _examples(n):
  ds = seqio.get_mixture_or_task("ankh3_pretrain").get_dataset(
      LENGTHS, split="validation", shuffle=False, seed=2)
  return [(tuple(e["inputs"]), tuple(e["targets"]))
          for e in ds.take(n).as_numpy_iterator()]


def _as_dataset(examples):
  def gen():
    for inputs, targets in examples:
      yield {"inputs": inputs, "targets": targets}
  spec = tf.TensorSpec([None], tf.int32)
  return tf.data.Dataset.from_generator(gen, output_signature={"inputs": spec,
                                                               "targets": spec})


def _unpack(rows):
  out = []
  for row in rows:
    for segment in range(1, int(row["inputs_segment_ids"].max()) + 1):
      parts = []
      for key in ("inputs", "targets"):
        at = row[f"{key}_segment_ids"] == segment
        np.testing.assert_array_equal(row[f"{key}_positions"][at], np.arange(at.sum()))
        parts.append(tuple(row[key][at]))
      out.append(tuple(parts))
  return out


def test_first_fit_packing_is_lossless_and_denser():
  examples = _examples(192)
  rows = list(packing.pack_first_fit(_as_dataset(examples), LENGTHS, window=192)
              .as_numpy_iterator())
  assert sorted(_unpack(rows)) == sorted(examples)
  seqio_rows = list(seqio.utils.trim_and_pack_dataset(_as_dataset(examples), LENGTHS)
                    .as_numpy_iterator())
  assert sorted(_unpack(seqio_rows)) == sorted(examples)
  fill = lambda rs: np.mean([np.count_nonzero(r["inputs"]) / 512 for r in rs])
  assert len(rows) < len(seqio_rows) and fill(rows) > 0.9


def _write_fake(path, ids):
  rng = np.random.default_rng(0)
  records = [(i, "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(5, 60))))
             for i in ids]
  fasta.write_fasta(path, records)
  return dict(records)


def test_fasta_source_user_paths_sharding_and_errors(tmp_path):
  a = _write_fake(str(tmp_path / "a.fasta.gz"), [f"a{i}" for i in range(10)])
  b = _write_fake(str(tmp_path / "b.fasta"), [f"b{i}" for i in range(5)])
  (tmp_path / "bad.fasta").write_bytes(b">ok\nMKV\n>broken\nMK*\n")
  source = sources.FastaDataSource({"train": [str(tmp_path / "a.fasta.gz"),
                                              str(tmp_path / "b.fasta")],
                                    "validation": str(tmp_path / "b.fa*"),
                                    "test": str(tmp_path / "bad.fasta")})
  read = lambda **kw: [(e["id"].decode(), e["sequence"].decode())
                       for e in source.get_dataset(**kw).as_numpy_iterator()]
  everything = list(a.items()) + list(b.items())
  assert read(split="train", shuffle=False) == everything
  assert read(split="validation", shuffle=False) == list(b.items())
  shard = read(split="train", shuffle=False, shard_info=seqio.ShardInfo(1, 2))
  assert shard == everything[1::2]
  shuffled = read(split="train", shuffle=True, seed=3)
  assert shuffled == read(split="train", shuffle=True, seed=3)
  assert sorted(shuffled) == sorted(everything) and shuffled != everything
  with pytest.raises(tf.errors.OpError, match=r"bad\.fasta.*'broken'.*illegal"):
    read(split="test", shuffle=False)
  with pytest.raises(FileNotFoundError):
    sources.FastaDataSource({"train": str(tmp_path / "missing*.fa")})


def test_user_family_reads_its_own_source(tmp_path):
  """A user family's mixture holds tasks over the user's files (a bad record fails the
  pipeline naming the file), not the shipped corpus."""
  (tmp_path / "mine.fasta").write_bytes(b">ok\nMKV\n>broken\nMK*\n")
  prefix = pretrain.register_fasta_pretraining("tasktest_mine", str(tmp_path / "mine.fasta"))
  mixture = seqio.get_mixture_or_task(f"{prefix}_pretrain")
  assert {t.source.split_paths["train"] for t in mixture.tasks} == {
      (str(tmp_path / "mine.fasta"),)}
  ds = mixture.get_dataset({"inputs": 64, "targets": 64}, split="train", seed=0)
  with pytest.raises(tf.errors.OpError, match=r"mine\.fasta.*'broken'.*illegal"):
    list(ds.take(10).as_numpy_iterator())


def _ids_in(split, count):
  """`count` ids that hash into `split` under the builder's default fractions."""
  config = tfds_uniref50.Uniref50Config(name="default")
  out, i = [], 0
  while len(out) < count:
    name = f"UniRef50_T{i}"
    if corpus.split_for_id(name, config.validation_fraction, config.test_fraction) == split:
      out.append(name)
    i += 1
  return out


def test_tfds_uniref50_builder_and_source(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  ids = {s: _ids_in(s, n) for s, n in [("train", 20), ("validation", 3), ("test", 2)]}
  records = _write_fake(str(manual / "uniref50.fasta.gz"), sum(ids.values(), []))
  builder = tfds_uniref50.Ankh3Uniref50(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  for split, expected in ids.items():
    got = {e["id"].decode(): e["sequence"].decode()
           for e in builder.as_dataset(split=split).as_numpy_iterator()}
    assert got == {i: records[i] for i in expected}
  source = sources.uniref50_tfds_source(data_dir=str(tmp_path / "tfds"))
  got = [e["id"].decode() for e in
         source.get_dataset("validation", shuffle=False).as_numpy_iterator()]
  assert sorted(got) == sorted(ids["validation"])
  # TFDS_DATA_DIR (gin) registers the user family over this data set.
  prefix = pretrain.training_data(tfds_data_dir=str(tmp_path / "tfds"), prefix="tasktest_tfds")
  task = seqio.TaskRegistry.get(f"{prefix}_mlm_p15")
  assert isinstance(task.source, seqio.TfdsDataSource)
  ex = next(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert ex["inputs"][0] == NLU and ex["targets"][-1] == EOS


@gin.configurable
def consume_objective(name=gin.REQUIRED):
  return name


@pytest.mark.parametrize("config,name,rates", [
    ("ankh3.gin", "ankh3_pretrain", {"ankh3_mlm_p15": 1 / 6, "ankh3_mlm_p20": 1 / 6,
                                     "ankh3_mlm_p30": 1 / 6, "ankh3_completion": 0.5}),
    ("mlm15_only.gin", "ankh3_mlm_p15", None),
    ("mlm_multi.gin", "ankh3_mlm_multi", {"ankh3_mlm_p15": 1 / 3, "ankh3_mlm_p20": 1 / 3,
                                          "ankh3_mlm_p30": 1 / 3}),
    ("completion_only.gin", "ankh3_completion", None),
])
def test_objective_gin_files(restore_defaults, config, name, rates):
  gin.clear_config()
  gin_dir = os.path.join(REPO, "gin_configs")  # includes are relative to gin_configs/
  if gin_dir not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.add_config_file_search_path(gin_dir)
  gin.parse_config_files_and_bindings(
      [f"objectives/{config}"],
      ["consume_objective.name = %MIXTURE_OR_TASK_NAME"], finalize_config=False)
  assert consume_objective() == name
  if rates is None:
    assert name in seqio.TaskRegistry.names()
  else:
    assert _rates(name) == pytest.approx(rates)
  assert pretrain.task_rates(name) == pytest.approx(rates or {name: 1.0})


def test_gin_completion_split_range_applies_to_registered_task(restore_defaults):
  gin.parse_config("ankh3_jax.data.preprocessors.complete_sequence.split_range = (0.1, 0.9)")
  ds = seqio.get_mixture_or_task("ankh3_completion").get_dataset(
      LENGTHS, split="validation", shuffle=False, seed=0)
  fractions = [(len(e["inputs"]) - 2) / (len(e["inputs"]) + len(e["targets"]) - 3)
               for e in ds.take(60).as_numpy_iterator()]
  assert np.std(fractions) > 0.1 and min(fractions) < 0.3 and max(fractions) > 0.7
