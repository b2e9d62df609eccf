"""ankh3-train: pre-train or fine-tune an Ankh3 model from gin files (t5x-style CLI).

  ankh3-train                                   # the demo: tiny model, shipped corpus, CPU
  ankh3-train --gin_file=runs/pretrain.gin --gin_file=models/ankh3_large.gin \\
      --gin.MODEL_DIR=/mnt/gcs/bucket/ankh3_large --gin.BATCH_SIZE=1024
  ankh3-train --memory_report                   # per-device bytes of large/xl on a pod

Gin files are searched relative to the working directory and the shipped gin_configs
directory; `--gin.NAME=VALUE` bindings are applied after the files. With no gin file
the embedded default `runs/demo.gin` runs, writing to a fresh `runs/demo-<time>`.
Exit codes (docs/training.md):
  0  done (also after a pre-emption checkpoint)
  2  configuration error: a gin file, binding or value; resuming MODEL_DIR with other
     settings than its run_settings.json (see --allow_changed); MODEL_DIR/model
     holds something the final export would replace
  3  stopped on a non-finite loss (nan_policy='stop')
  4  bad or missing training data (file, record and reason named)
  5  no intact checkpoint in MODEL_DIR
  6  disk or OS error (full disk, permissions, read-only file system), path named
  7  MODEL_DIR is in use by another ankh3-train (its pid and host named)
Anything else is a bug: a traceback follows an `internal error` line.
"""
import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

import gin

from ankh3_jax import quiet

DEFAULT_GIN_FILE = "runs/demo.gin"
EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_DATA_ERROR = 4
EXIT_CHECKPOINT_ERROR = 5
EXIT_OS_ERROR = 6
EXIT_LOCKED = 7


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ankh3-train", description=__doc__.split("\n\n")[0],
      epilog="Bindings: --gin.NAME=VALUE (repeatable), e.g. --gin.TRAIN_STEPS=1000",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable); default: runs/demo.gin")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="extra directory to search for gin files (repeatable)")
  quiet.add_flag(parser)
  parser.add_argument("--memory_report", action="store_true",
                      help="print per-device parameter+optimizer bytes of ankh3_large and "
                           "ankh3_xl on a TPU pod mesh (abstract, nothing allocated), exit")
  parser.add_argument("--pod", default="v4-256",
                      help="pod for --memory_report (see train_memory.POD_CHIPS)")
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() (cluster auto-detection, "
                           "e.g. on every worker of a TPU pod)")
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0 (multi-process CPU/GPU runs)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--retain_freed_memory", action="store_true",
                      help="have glibc keep freed host memory for reuse instead of "
                           "unmapping it: on CPU, 10-40%% faster steps (no page faults), "
                           "but the heap never shrinks and can fragment (see "
                           "ankh3_jax/cpu_tuning.py; the command only, not run() "
                           "called in-process)")
  parser.add_argument("--huge_pages", action=argparse.BooleanOptionalAction, default=True,
                      help="restart the command once with glibc's malloc asking for "
                           "transparent huge pages (Linux, glibc >= 2.35, THP in "
                           "'madvise' mode; elsewhere nothing happens): 13-40%% faster "
                           "CPU train steps, same peak memory (ankh3_jax/cpu_tuning.py)")
  parser.add_argument("--cpu_dots", choices=["auto", "eigen", "xla_default"], default="auto",
                      help="XLA:CPU matrix multiplications: 'auto' picks per CPU kind "
                           "(AVX2, AVX-512, AMX; cpu_tuning.TRAIN_DOTS_BY_KIND); 'eigen' sets the process-wide "
                           "XLA flag that runs individual matmuls with Eigen instead of "
                           "YNNPACK (11-30%% faster steps at the `small` size on a 2-core "
                           "AVX2 CPU; applied only under the jaxlib releases it was checked "
                           "with, see ankh3_jax/cpu_tuning.py); 'xla_default' leaves XLA's "
                           "choice. Other backends ignore it")
  parser.add_argument("--allow_changed", default="",
                      help="comma-separated settings that may differ from MODEL_DIR's "
                           "run_settings.json when resuming, e.g. "
                           "train_steps,peak_learning_rate (a key, its last part, or a "
                           "group: model, data, training, gin)")
  parser.add_argument("--log_level", default="WARNING",
                      help="Python logging level (INFO shows checkpoint/data details)")
  return parser


def parse_args(argv: Sequence[str]):
  """(args, gin bindings): `--gin.X=V` / `--gin.X V` become 'X=V' bindings."""
  from ankh3_jax import gin_files  # pylint: disable=g-import-not-at-top
  rest, bindings = gin_files.split_gin_flags(argv)
  return _parser().parse_args(rest), bindings


def _register_configurables() -> None:
  """Imports the modules whose gin configurables the run files bind."""
  # pylint: disable=g-import-not-at-top,unused-import
  from ankh3_jax import config, partitioning
  from ankh3_jax.training import (checkpoints, losses, optimizers, seqio_data,
                                  synthetic_data, trainer)


def _fail(message: str, code: int) -> int:
  from ankh3_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.error("ankh3-train", message, code)


def apply_process_settings(args) -> list:
  """--retain_freed_memory and --cpu_dots; only before JAX or TensorFlow starts a thread.

  Threads' malloc arenas made earlier would keep unmapping freed memory, and XLA reads
  its flags once, when JAX creates a backend. Returns the settings in effect (with the
  huge pages that `main` restarted the process for), for the log.
  """
  from ankh3_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  applied = []
  if cpu_tuning.HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
    applied.append(f"huge pages ({cpu_tuning.HUGE_PAGES_TUNABLE})")
  if args.retain_freed_memory and cpu_tuning.retain_freed_memory():
    applied.append("freed memory retained")
  if args.cpu_dots == "auto":
    eigen = cpu_tuning.apply_train_dots_for_this_cpu() == "eigen"
  else:
    eigen = args.cpu_dots == "eigen" and cpu_tuning.prefer_eigen_dots_if_known()
  if eigen:
    applied.append(f"Eigen matmuls on CPU ({cpu_tuning.EIGEN_DOTS_XLA_FLAG})")
  if cpu_tuning.blas_products_chosen():  # the library's choice, here for the log
    applied.append(f"float32 products of one-device steps through numpy's OpenBLAS where "
                   f"its kernels build ({cpu_tuning.BLAS_ENV_SWITCH})")
  return applied


def run(argv: Optional[Sequence[str]] = None, *, owns_process: bool = False) -> int:
  """Parses arguments, configures gin, trains; returns the process exit code.

  `owns_process`: the command itself (not a notebook or test calling this function), so
  the process-wide settings (--retain_freed_memory, --cpu_dots) may be applied.
  """
  args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
  settings = apply_process_settings(args) if owns_process else []
  logging.basicConfig(level=args.log_level.upper(),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if args.memory_report:
    from ankh3_jax import train_memory  # pylint: disable=g-import-not-at-top
    print(train_memory.pod_report(args.pod))
    return 0

  from ankh3_jax import gin_files  # pylint: disable=g-import-not-at-top
  _register_configurables()
  files = args.gin_file
  if not files:
    files = [DEFAULT_GIN_FILE]
    if not any(b.split("=")[0].strip() == "MODEL_DIR" for b in bindings):
      # A fresh directory per demo run; processes of one multi-process run must agree.
      multi = args.multihost or args.coordinator_address
      name = "demo-multiprocess" if multi else time.strftime("demo-%Y%m%d-%H%M%S")
      bindings = [*bindings, f"MODEL_DIR={os.path.join('runs', name)}"]
  if args.allow_changed:
    names = [n.strip() for n in args.allow_changed.split(",") if n.strip()]
    bindings = [*bindings, f"ankh3_jax.training.trainer.train.allow_changed={names!r}"]
  gin.clear_config()  # run() may be called again in one process (tests, notebooks)
  try:
    paths = gin_files.parse(files, bindings, args.gin_search_path)
  except gin_files.GinConfigError as e:
    return _fail(f"gin configuration: {e}", EXIT_CONFIG_ERROR)

  from ankh3_jax import partitioning  # pylint: disable=g-import-not-at-top
  if args.multihost or args.coordinator_address:
    partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
  from ankh3_jax.training import metrics, trainer  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"ankh3-train: gin files {', '.join(paths)}", file=sys.stderr)
    if settings:
      print(f"ankh3-train: process settings: {'; '.join(settings)}", file=sys.stderr)
    try:
      print(f"ankh3-train: MODEL_DIR={gin.query_parameter('%MODEL_DIR')}", file=sys.stderr)
    except ValueError:
      pass
  try:
    result = trainer.train()
  except Exception as e:  # pylint: disable=broad-except
    failure = classify_error(e)
    if failure is None:
      print("ankh3-train: internal error (a bug: please report it with this traceback)",
            file=sys.stderr)
      raise
    return _fail(*failure)
  if jax.process_index() == 0:
    _report(result, gin.operative_config_str(), metrics)
  return 0


def _message(error: BaseException) -> str:
  """The error's text without gin's 'In call to configurable' lines."""
  lines = str(error).splitlines()
  return "\n".join(l for l in lines if not l.startswith("  In call to configurable"))


def classify_error(error: BaseException) -> Optional[tuple]:
  """(message, exit code) of an error raised by train(); None for a bug."""
  # pylint: disable=g-import-not-at-top
  from ankh3_jax import gin_files
  from ankh3_jax.data import fasta
  from ankh3_jax.training import run_lock, run_settings, seqio_data, trainer
  text = _message(error)
  if isinstance(error, trainer.NonFiniteLossError):
    return text, EXIT_NONFINITE
  if isinstance(error, run_lock.RunLockHeld):
    return text, EXIT_LOCKED
  if isinstance(error, trainer.checkpoints_lib.CheckpointError):
    return text, EXIT_CHECKPOINT_ERROR
  bad_data = fasta.fasta_error_message(error)
  if bad_data is not None:
    return (f"bad training data: {bad_data}. Checkpoints already written are intact; "
            "fix or remove the record and rerun to resume.", EXIT_DATA_ERROR)
  if isinstance(error, seqio_data.DataInputError) or _raised_by_data_code(error):
    return f"training data: {text}", EXIT_DATA_ERROR
  if isinstance(error, run_settings.RunSettingsError):
    return text, EXIT_CONFIG_ERROR
  if isinstance(error, trainer.ConfigurationError):
    return f"gin configuration: {text}", EXIT_CONFIG_ERROR
  gin_message = gin_files.describe_call_error(error)
  if gin_message is not None:
    return f"gin configuration: {_message(error)}", EXIT_CONFIG_ERROR
  if isinstance(error, OSError):
    return (f"disk or OS error: {text}. Finished checkpoints are kept; free space or "
            "fix permissions and rerun to resume.", EXIT_OS_ERROR)
  return None


def _raised_by_data_code(error: BaseException) -> bool:
  """A file error raised in ankh3_jax/data (e.g. a FASTA glob that matches nothing)."""
  if not isinstance(error, OSError):
    return False
  data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data") + os.sep
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(
      data_dir)


def _report(result, operative_config: str, metrics) -> None:
  model_dir = result.model_dir
  path = os.path.join(model_dir, "operative_config.gin")
  with open(f"{path}.tmp-{os.getpid()}", "w", encoding="utf-8") as f:
    f.write(operative_config)
  os.replace(f.name, path)
  if result.summary:
    print(metrics.format_summary(result.summary))
    print(f"summary saved to {os.path.join(model_dir, 'eval_summary.json')}")
  if result.status == "preempted":
    print(f"pre-empted at step {result.step}; resume with the same gin files and "
          f"--gin.MODEL_DIR={model_dir}")
  else:
    print(f"trained to step {result.step}; model directory {model_dir}")
  if result.nonfinite_steps:
    print(f"non-finite steps (updates skipped): {result.nonfinite_steps}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`ankh3-train` (see cli.py); the exit codes are listed at the top of this module.

  As the command (`argv` None), it first restarts itself once with huge pages (see
  --huge_pages) and applies the process-wide settings.
  """
  if argv is not None:
    return run(argv)
  args, _ = parse_args(sys.argv[1:])  # --help and bad arguments exit here, not restarted
  if args.huge_pages:
    from ankh3_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
    cpu_tuning.reexec_with_huge_pages()  # first of all: tunables are read at start-up
  quiet.setup(tensorflow=True)
  return run(owns_process=True)


if __name__ == "__main__":
  sys.exit(main())
