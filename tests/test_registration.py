"""Task registration: built-ins once under fixed names, the user's FASTA under its own
prefix (gin macros TRAIN_FASTA / VALIDATION_FASTA), the large-preset guard, the launcher."""
import importlib
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio

from ankh3_jax import gin_files
from ankh3_jax import main as main_lib
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import preprocessors as prep
from ankh3_jax.data import sources
from ankh3_jax.tasks import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTINS = ("ankh3_mlm_p15", "ankh3_mlm_p20", "ankh3_mlm_p30", "ankh3_mlm_sampled",
            "ankh3_completion")
LENGTHS = {"inputs": 128, "targets": 128}


@pytest.fixture(autouse=True)
def clean_gin():
  main_lib._register_configurables()  # pylint: disable=protected-access
  gin.clear_config()
  yield
  gin.clear_config()


def _write(path, prefix, count, seed):
  rng = np.random.default_rng(seed)
  records = [(f"{prefix}{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"),
                                                 rng.integers(20, 60))))
             for i in range(count)]
  fasta.write_fasta(str(path), records)
  return dict(records)


@pytest.fixture
def user_files(tmp_path):
  train = {**_write(tmp_path / "train-0.fasta.gz", "tr", 12, 0),
           **_write(tmp_path / "train-1.fasta.gz", "tq", 8, 1)}
  valid = _write(tmp_path / "valid.fasta", "va", 6, 2)
  return tmp_path, train, valid


def _sequences(name, split, limit=-1):
  """Protein sequences behind a task's examples (MLM: reconstructed; completion: joined)."""
  task = seqio.get_mixture_or_task(name)
  vocab = task.output_features["inputs"].vocabulary
  out = []
  ds = task.get_dataset(LENGTHS, split=split, shuffle=False, seed=0).take(limit)
  for ex in ds.as_numpy_iterator():
    if name.endswith("completion"):
      ids = list(ex["inputs"][1:-1]) + [t for t in ex["targets"] if t != 1]
    else:
      ids = prep.reconstruct_mlm(ex["inputs"], ex["targets"])
    out.append(vocab.decode([int(i) for i in ids]).replace(" ", ""))
  return out


@pytest.mark.slow
def test_importing_the_tasks_reads_no_data_file():
  """An audit hook sees every Python-level open, a wrapper every tf.io.gfile.GFile: none
  of the corpus or the structure file at import, both once a dataset is read."""
  code = """
import sys
import tensorflow as tf
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open'
                 and 'assets' in str(args[0]) else None)
class Recorded(tf.io.gfile.GFile):
  def __init__(self, name, mode='r'):
    opened.append(str(name))
    super().__init__(name, mode)
tf.io.gfile.GFile = Recorded
import ankh3_jax.tasks, seqio
data = lambda: sorted({p.split('assets')[1] for p in opened if 'fasta' in p or '.npz' in p})
print('IMPORT', data())
for name in ('ankh3_mlm_p15', 'ankh3_ss3'):
  next(seqio.get_mixture_or_task(name).get_dataset(
      {'inputs': 64, 'targets': 64}, split='validation', shuffle=False).as_numpy_iterator())
print('READ', data())
"""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=True, timeout=300).stdout
  lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
  assert lines["IMPORT"] == "[]"
  assert "validation.fasta.gz" in lines["READ"] and ".npz" in lines["READ"]


def test_builtins_are_registered_once_under_fixed_names():
  before = {n: seqio.TaskRegistry.get(n) for n in BUILTINS}
  mixtures = {n: seqio.MixtureRegistry.get(n) for n in ("ankh3_pretrain", "ankh3_mlm_multi")}
  with gin.config.interactive_mode():
    importlib.reload(pretrain)  # a second import registers nothing
  assert {n: seqio.TaskRegistry.get(n) for n in BUILTINS} == before
  assert {n: seqio.MixtureRegistry.get(n) for n in mixtures} == mixtures
  assert all(t.source.split_paths["train"] == (corpus.corpus_path("train"),)
             for t in before.values())
  assert dict(pretrain.task_rates("ankh3_pretrain")) == pytest.approx(
      {"ankh3_mlm_p15": 1 / 6, "ankh3_mlm_p20": 1 / 6, "ankh3_mlm_p30": 1 / 6,
       "ankh3_completion": 0.5})
  assert dict(pretrain.task_rates("ankh3_mlm_multi")) == pytest.approx(
      {f"ankh3_mlm_p{p}": 1 / 3 for p in (15, 20, 30)})
  with pytest.raises(pretrain.RegistrationError, match="'ankh3'"):
    pretrain.register_task_family("ankh3", sources.FastaDataSource(), data_spec="other")
  with pytest.raises(pretrain.RegistrationError, match="built-in"):
    pretrain.register_fasta_pretraining("ankh3", corpus.corpus_path("test"))


def test_user_fasta_family_beside_the_builtins(user_files):
  tmp_path, train, valid = user_files
  glob_pattern = str(tmp_path / "train-*.fasta.gz")
  prefix = pretrain.register_fasta_pretraining("regtest_a", glob_pattern,
                                               str(tmp_path / "valid.fasta"))
  names = [f"regtest_a_{s}" for s in ("mlm_p15", "mlm_p20", "mlm_p30", "mlm_sampled",
                                       "completion")]
  assert all(n in seqio.TaskRegistry.names() for n in names)
  assert dict(pretrain.task_rates("regtest_a_pretrain")) == pytest.approx(
      {**{n: 1 / 6 for n in names[:3]}, "regtest_a_completion": 0.5})
  # Each family reads its own data, in one process.
  assert set(_sequences("regtest_a_mlm_p15", "train")) == set(train.values())
  assert set(_sequences("regtest_a_completion", "validation")) == set(valid.values())
  builtin = _sequences("ankh3_mlm_p30", "validation", limit=60)
  shipped = {r.sequence for r in fasta.read_fasta(corpus.corpus_path("validation"))}
  assert len(builtin) == 60  # crops of the shipped validation proteins
  assert all(any(s in full for full in shipped) for s in builtin)
  assert not any(s in full for s in builtin for full in train.values())
  # Same prefix and files: no-op; other files: an error naming the prefix.
  task = seqio.TaskRegistry.get("regtest_a_mlm_p15")
  assert pretrain.register_fasta_pretraining(
      prefix, glob_pattern, str(tmp_path / "valid.fasta")) == "regtest_a"
  assert seqio.TaskRegistry.get("regtest_a_mlm_p15") is task
  with pytest.raises(pretrain.RegistrationError, match="'regtest_a'"):
    pretrain.register_fasta_pretraining(prefix, str(tmp_path / "train-0.fasta.gz"),
                                        str(tmp_path / "valid.fasta"))
  with pytest.raises(FileNotFoundError, match="nothing-*"):
    pretrain.register_fasta_pretraining("regtest_b", str(tmp_path / "nothing-*.fa"))


def test_gfile_reader_matches_the_local_reader(user_files):
  tmp_path, _, _ = user_files
  for name in ("train-0.fasta.gz", "valid.fasta"):
    path = str(tmp_path / name)
    assert (list(fasta.read_fasta(path, opener=sources.open_gfile))
            == list(fasta.read_fasta(path)))
  with pytest.raises(FileNotFoundError, match="missing.fa"):
    sources.open_gfile(str(tmp_path / "missing.fa"))


def _objective(files, bindings):
  gin_files.parse(files, ["MODEL_DIR=/tmp/unused", *bindings])
  return pretrain.objective()


def test_gin_macros_switch_to_the_users_tasks(user_files):
  tmp_path, train, _ = user_files
  data = [f"TRAIN_FASTA='{tmp_path}/train-*.fasta.gz'",
          f"VALIDATION_FASTA='{tmp_path}/valid.fasta'", "DATA_PREFIX='regtest_gin'"]
  assert _objective(["objectives/ankh3.gin"], data) == "regtest_gin_pretrain"
  mixture = seqio.get_mixture_or_task("regtest_gin_pretrain")
  assert all(t.source.split_paths["train"] == (f"{tmp_path}/train-0.fasta.gz",
                                                f"{tmp_path}/train-1.fasta.gz")
             for t in mixture.tasks)
  gin.clear_config()
  assert _objective(["objectives/mlm15_only.gin"], data) == "regtest_gin_mlm_p15"
  gin.clear_config()
  assert _objective(["objectives/ankh3.gin"], []) == "ankh3_pretrain"  # untouched
  gin.clear_config()
  with pytest.raises(ValueError, match="needs VALIDATION_FASTA"):
    _objective(["objectives/ankh3.gin"], data[:1])
  gin.clear_config()
  # Other probabilities: the corpus under DATA_PREFIX, never new ankh3_* tasks.
  assert _objective(["objectives/ankh3.gin"], [
      "MASKING_PROBABILITIES=(0.1, 0.25)", "DATA_PREFIX='regtest_probs'"]) == (
          "regtest_probs_pretrain")
  assert dict(pretrain.task_rates("regtest_probs_pretrain")) == pytest.approx(
      {"regtest_probs_mlm_p10": 0.25, "regtest_probs_mlm_p25": 0.25,
       "regtest_probs_completion": 0.5})
  assert "ankh3_mlm_p10" not in seqio.TaskRegistry.names()


def test_a_new_mixture_is_a_gin_edit():
  name = _objective(["objectives/ankh3.gin"], [
      "ankh3_jax.tasks.pretrain.objective.name = 'sampled_completion'",
      "ankh3_jax.tasks.pretrain.objective.rates = "
      "[('mlm_sampled', 1), ('mlm_p15', 1), ('completion', 2)]"])
  assert name == "ankh3_sampled_completion"
  assert dict(pretrain.task_rates(name)) == pytest.approx(
      {"ankh3_mlm_sampled": 0.25, "ankh3_mlm_p15": 0.25, "ankh3_completion": 0.5})
  gin.clear_config()
  assert pretrain.objective(name="sampled_completion", rates=[
      ("mlm_sampled", 1), ("mlm_p15", 1), ("completion", 2)]) == name  # again: no-op
  with pytest.raises(pretrain.RegistrationError, match="sampled_completion"):
    pretrain.objective(name="sampled_completion", rates=[("completion", 1)])
  with pytest.raises(ValueError, match="no task 'ankh3_mlm_p99'"):
    pretrain.objective(name="x", rates=[("mlm_p99", 1)])
  with pytest.raises(ValueError, match="no task or mixture 'ankh3_nothing'"):
    pretrain.objective(name="nothing")


@pytest.mark.parametrize("model", ["ankh_base", "ankh3_large", "ankh3_xl"])
def test_large_presets_refuse_the_demo_corpus(model, user_files):
  tmp_path, _, _ = user_files
  files = [f"models/{model}.gin", "objectives/ankh3.gin", "runs/pretrain.gin"]
  with pytest.raises(pretrain.DemoCorpusError, match=f"{model}.*TRAIN_FASTA.*ALLOW_DEMO"):
    _objective(files, [])
  gin.clear_config()
  assert _objective(files, ["ALLOW_DEMO_CORPUS=True"]) == "ankh3_pretrain"
  gin.clear_config()
  assert _objective(files, [f"TRAIN_FASTA='{tmp_path}/train-0.fasta.gz'",
                            f"VALIDATION_FASTA='{tmp_path}/valid.fasta'",
                            f"DATA_PREFIX='regtest_{model}'"]) == f"regtest_{model}_pretrain"
  gin.clear_config()
  assert _objective(["models/small.gin", *files[1:]], []) == "ankh3_pretrain"


def test_ankh3_train_refuses_a_large_preset_without_data(tmp_path, capsys):
  code = main_lib.run(["--gin_file=models/ankh3_large.gin", "--gin_file=objectives/ankh3.gin",
                       "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}"])
  assert code == main_lib.EXIT_CONFIG_ERROR
  err = capsys.readouterr().err
  assert "refusing to pre-train ankh3_large on the shipped demo corpus" in err
  assert not (tmp_path / "run" / "checkpoints").exists()


def _launch(*args):
  return subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--name", "n", "--zone", "z",
       "--model_dir", "gs://b/run", "--step", "train", "--dry_run", *args],
      capture_output=True, text=True, timeout=60)


def test_launcher_dry_run_passes_the_data_and_refuses_large_presets_without():
  fasta_run = _launch("--data", "gs://b/train-*.fasta.gz", "--validation_data",
                      "gs://b/valid.fasta")
  assert fasta_run.returncode == 0, fasta_run.stderr
  assert '--gin.TRAIN_FASTA="gs://b/train-*.fasta.gz"' in fasta_run.stdout
  assert '--gin.VALIDATION_FASTA="gs://b/valid.fasta"' in fasta_run.stdout
  tfds_run = _launch("--data", "gs://b/tfds")
  assert '--gin.TFDS_DATA_DIR="gs://b/tfds"' in tfds_run.stdout
  refused = _launch()  # ankh3_large by default
  assert refused.returncode == 2 and not refused.stdout
  assert "refusing to pre-train ankh3_large" in refused.stderr
  assert "--data" in refused.stderr
  allowed = _launch("--allow_demo_corpus")
  assert allowed.returncode == 0 and "--gin.ALLOW_DEMO_CORPUS=True" in allowed.stdout
  tiny = _launch("--model", "tiny")
  assert tiny.returncode == 0 and "TRAIN_FASTA" not in tiny.stdout
  # ankh3-train refuses URLs: a gs:// model dir is mounted with gcsfuse on each worker
  assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 b /mnt/gcs/b;" in tiny.stdout
  assert "--gin.MODEL_DIR=/mnt/gcs/b/run" in tiny.stdout
  setup = _launch("--model", "tiny", "--step", "setup")
  assert setup.returncode == 0 and "apt-get install -y -q gcsfuse" in setup.stdout
  local = _launch("--model", "tiny", "--model_dir", "/nfs/run")
  assert "--gin.MODEL_DIR=/nfs/run" in local.stdout and "gcsfuse" not in local.stdout
  no_validation = _launch("--data", "gs://b/train.fa")
  assert no_validation.returncode == 2 and "--validation_data" in no_validation.stderr
