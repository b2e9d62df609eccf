"""gin files, bindings and the ankh3-train command line (no training)."""
import glob
import os

import gin
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import gin_files
from ankh3_jax import main as main_lib

TRAIN = "ankh3_jax.training.trainer.train"


@pytest.fixture(autouse=True)
def clean_gin():
  main_lib._register_configurables()
  gin.clear_config()
  yield
  gin.clear_config()


def test_gin_configs_dir_is_found():
  dirs = gin_files.gin_config_dirs()
  assert dirs and os.path.isfile(os.path.join(dirs[0], "runs", "demo.gin"))
  found = gin_files.find_gin_file(main_lib.DEFAULT_GIN_FILE, dirs)
  assert found.endswith(os.path.join("gin_configs", "runs", "demo.gin"))
  with pytest.raises(gin_files.GinConfigError, match="not found"):
    gin_files.find_gin_file("runs/no_such.gin", dirs)


def test_includes_with_a_same_named_directory_on_sys_path(tmp_path, monkeypatch):
  """A runs/ or models/ directory in the working directory (on sys.path under
  `python -m`) looks like a namespace package to gin's include lookup."""
  for name in ("runs", "models", "objectives"):
    (tmp_path / name).mkdir()
  monkeypatch.syspath_prepend(str(tmp_path))
  __import__("runs")  # also when gin already imported it as a namespace package
  paths = gin_files.parse(["runs/demo.gin"], ["MODEL_DIR=/tmp/unused"])
  assert paths[0].endswith(os.path.join("gin_configs", "runs", "demo.gin"))
  assert __import__("sys").modules["runs"] is not None  # restored after parsing


@pytest.mark.parametrize("model", ["tiny", "small", "ankh_base", "ankh3_large", "ankh3_xl"])
def test_pretrain_with_each_model(model):
  gin_files.parse([f"models/{model}.gin", "objectives/ankh3.gin", "runs/pretrain.gin"],
                  ["MODEL_DIR=/tmp/unused"])
  assert gin.query_parameter("%BATCH_SIZE") == 1024
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 512, "targets": 512}
  cfg = config_lib.preset()
  assert cfg == config_lib.preset(model, **{k: getattr(cfg, k) for k in
                                            ("dtype", "scan_layers", "remat_policy")})
  if model.startswith("ankh3"):
    assert cfg.dtype == "bfloat16" and cfg.scan_layers


def test_demo_and_finetune_files():
  gin_files.parse(["runs/demo.gin"], [])
  assert gin.query_parameter("%TRAIN_STEPS") == 300
  assert config_lib.preset().d_model == 64
  gin.clear_config()
  gin_files.parse(["models/tiny.gin", "objectives/ankh3.gin", "runs/finetune.gin"],
                  ["MODEL_DIR=/tmp/ft", "INIT_FROM=/tmp/pretrained/model"])
  assert gin.query_parameter("%INIT_FROM") == "/tmp/pretrained/model"


def test_bindings_are_quoted_when_bare():
  assert gin_files._binding("MODEL_DIR=/tmp/run") == "MODEL_DIR = '/tmp/run'"
  assert gin_files._binding("TRAIN_STEPS=12") == "TRAIN_STEPS = 12"
  assert gin_files._binding("X='a'") == "X = 'a'"
  assert gin_files._binding("a.b=@c()") == "a.b = @c()"
  with pytest.raises(gin_files.GinConfigError, match="no '='"):
    gin_files._binding("TRAIN_STEPS")


def test_parse_args():
  args, bindings = main_lib.parse_args(
      ["--gin_file=a.gin", "--gin_file", "b.gin", "--gin.X=1", "--gin.Y", "2"])
  assert args.gin_file == ["a.gin", "b.gin"]
  assert bindings == ["X=1", "Y=2"]


def _run(capsys, *argv):
  code = main_lib.run(list(argv))
  return code, capsys.readouterr().err


def test_wrong_binding_is_a_clear_error(capsys):
  code, err = _run(capsys, "--gin_file=runs/demo.gin", f"--gin.{TRAIN}.bach_size=3")
  assert code == main_lib.EXIT_CONFIG_ERROR
  assert "gin configuration" in err and "bach_size" in err
  code, err = _run(capsys, "--gin_file=runs/demo.gin", "--gin.no_such_fn.x=3")
  assert code == main_lib.EXIT_CONFIG_ERROR and "no_such_fn" in err
  code, err = _run(capsys, "--gin_file=runs/missing.gin")
  assert code == main_lib.EXIT_CONFIG_ERROR and "not found" in err


def test_bad_value_is_a_clear_error(capsys, tmp_path):
  code, err = _run(capsys, "--gin_file=runs/demo.gin", "--gin.TRAIN_STEPS=many",
                   f"--gin.MODEL_DIR={tmp_path}")
  assert code == main_lib.EXIT_CONFIG_ERROR
  assert "train_steps must be a positive integer" in err


def test_every_shipped_run_file_is_documented():
  runs = {os.path.basename(p) for p in glob.glob(
      os.path.join(gin_files.gin_config_dirs()[0], "runs", "*.gin"))}
  assert {"pretrain.gin", "finetune.gin", "demo.gin"} <= runs


def _shipped_runs():
  root = gin_files.gin_config_dirs()[0]
  runs = [["runs/demo.gin"]]
  runs += [["models/tiny.gin", os.path.relpath(path, root), "runs/pretrain.gin"]
           for path in sorted(glob.glob(os.path.join(root, "objectives", "*.gin")))]
  # experiments/: each experiment alone, and with the reference budget added (a fragment
  # parsed after an experiment's file, `ankh3-ablation --gin_file`); base.gin is shared
  fragments = ("base.gin", "reference_scale.gin")
  experiments = [os.path.relpath(path, root)
                 for path in sorted(glob.glob(os.path.join(root, "experiments", "*.gin")))
                 if os.path.basename(path) not in fragments]
  runs += [[e] for e in experiments]
  runs += [[e, "experiments/reference_scale.gin"] for e in experiments]
  return runs


@pytest.mark.parametrize("files", _shipped_runs(), ids="+".join)
def test_no_shipped_config_caps_the_masking_rate(files):
  """Every shipped run's targets hold the masked residues of its highest probability."""
  from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
  from ankh3_jax.data import preprocessors as prep  # pylint: disable=g-import-not-at-top
  gin_files.parse(files, ["MODEL_DIR=/tmp/unused"])
  lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
  for p in gin.query_parameter("%MASKING_PROBABILITIES"):
    prep.check_masking_fits(p, lengths, vocab.NUM_SENTINELS)
  with pytest.raises(prep.MaskingCapError):  # the check itself can fail
    prep.check_masking_fits(0.3, {"inputs": lengths["inputs"], "targets": 64},
                            vocab.NUM_SENTINELS)
