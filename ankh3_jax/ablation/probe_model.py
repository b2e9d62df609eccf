"""`ankh3-ablation probe`: linear probes of one model's frozen encoder beside the
ablation's references, with the same heads, probe settings and seeds.

  ankh3-ablation probe --model runs/demo-XXXX/model --out runs/demo-XXXX/probes.json
  ankh3-ablation probe --model MODEL --out probes.json --seeds 0,1,2 --tasks ss3,ss8,contacts

Feature sets, each probed (`probes`) on the shipped structure split (train -> test) for
every task and seed: the model's encoder (`[NLU]` prefix), the same architecture at a
random initialisation (`model.init_params` of the model's config, --init_seed), one-hot
residues, and a one-hot window of +/-7 residues (the fair context-free baseline). Prints
a markdown table (mean ± sample std over seeds, and each task's trivial baseline),
writes it to FILE.md and everything to FILE (JSON), atomically; an existing file is
replaced only with --overwrite, and both are checked before any work starts.
Exit codes: 0 done, 2 bad arguments, an unreadable model or outputs that exist.
"""
import argparse
import dataclasses
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from ankh3_jax import cli
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax.ablation import METRIC_NAMES
from ankh3_jax.ablation import TASKS
from ankh3_jax.ablation import files
from ankh3_jax.ablation import run

PROG = "ankh3-ablation probe"
FORMAT = "ankh3-ablation-probe/1"
MODEL = "model"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="an exported model directory (MODEL_DIR/model)")
  p.add_argument("--out", required=True, help="results JSON to write; the table goes next "
                 "to it with the extension .md")
  p.add_argument("--seeds", default="0,1,2", help="probe seeds, comma-separated")
  p.add_argument("--tasks", default=",".join(TASKS), help="probe tasks, comma-separated "
                 f"subset of {', '.join(TASKS)}")
  p.add_argument("--init_seed", type=int, default=0, help="seed of the random initialisation")
  p.add_argument("--probe_steps", type=int, default=300)
  p.add_argument("--probe_train_limit", type=int, default=None,
                 help="use only the first N train chains")
  p.add_argument("--probe_test_limit", type=int, default=None,
                 help="score on only the first N test chains")
  p.add_argument("--overwrite", action="store_true", help="replace existing output files")
  quiet.add_flag(p)
  return p


def table_path(out: str) -> str:
  return os.path.splitext(out)[0] + ".md"


def parse_args(argv: Sequence[str]):
  args = build_parser().parse_args(argv)
  args.tasks = run._csv(args.tasks)  # pylint: disable=protected-access
  unknown = [t for t in args.tasks if t not in TASKS]
  if unknown or not args.tasks:
    raise run.UsageError(f"unknown or no tasks: {unknown}; tasks are {TASKS}")
  try:
    args.seeds = [int(s) for s in run._csv(args.seeds)]  # pylint: disable=protected-access
  except ValueError:
    raise run.UsageError(f"--seeds must be integers, got {args.seeds!r}") from None
  if not args.seeds:
    raise run.UsageError("--seeds is empty")
  for flag in ("probe_steps", "probe_train_limit", "probe_test_limit"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise run.UsageError(f"--{flag} must be positive, got {value}")
  if table_path(args.out) == args.out:
    raise run.UsageError(f"--out {args.out}: name the JSON file (the table goes to "
                         "FILE.md next to it)")
  return args


def check_paths(args):
  """The model's config (a clear error for anything but a model directory) after
  refusing outputs that exist (without --overwrite) or are the model."""
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  try:
    for path in (args.out, table_path(args.out)):
      output_paths.check_output_file(path, [args.model], overwrite=args.overwrite,
                                     what="--out")
  except output_paths.OutputError as e:
    raise run.UsageError(str(e)) from e
  try:
    return model_io.load_config(args.model)
  except (OSError, ValueError) as e:
    hint = ""
    if os.path.isdir(os.path.join(args.model, "model")):
      hint = f"; ankh3-train exports its model to {os.path.join(args.model, 'model')}"
    raise run.UsageError(f"--model {args.model}: {e}{hint}") from e


def _random_init(config, model_dir: str, seed: int) -> tuple:
  """(config, params, vocabulary): the model's architecture at a random initialisation."""
  from ankh3_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  return config, model_lib.init_params(config, seed), os.path.join(model_dir,
                                                                   model_io.SPIECE_FILE)


def collect(args, config, command: str) -> dict:
  """Probes every feature set; the results dictionary (`report.results_table` reads it)."""
  from ankh3_jax.ablation import stats  # pylint: disable=g-import-not-at-top
  from ankh3_jax.param_count import count_params  # pylint: disable=g-import-not-at-top
  start = time.time()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  model_dir = os.path.abspath(args.model)
  stage = run.ProbeStage(args, None)
  results_probes = {MODEL: stage.run(MODEL, lambda: model_dir)}
  references, reference_sets = stage.run_references(
      lambda: _random_init(config, model_dir, args.init_seed))
  results_probes.update(references)
  for entry in reference_sets:
    if entry["name"] == run.RANDOM_INIT:
      entry["label"] = f"random init (same config, `model.init_params` seed {args.init_seed})"
  counts = count_params(config)
  return {
      "format": FORMAT,
      "command": command,
      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
      "machine": f"{os.cpu_count()} CPU cores",
      "load_average": load,
      "wall_seconds": time.time() - start,
      "model": {"path": model_dir, "d_model": config.d_model,
                "encoder_layers": config.num_encoder_layers,
                "decoder_layers": config.num_decoder_layers,
                "parameters": counts["total"], "encoder_parameters": counts["encoder"]},
      "init_seed": args.init_seed,
      "probe_settings": {**dataclasses.asdict(stage.settings), "seeds": args.seeds,
                         "tasks": args.tasks},
      "probe_data": stage.data_summary(),
      "feature_sets": [{"name": MODEL, "label": "model (frozen encoder)", "short": "model"},
                       *reference_sets],
      "probes": results_probes,
      "summary": stats.summarize(results_probes),
      "baselines": stage.baselines(results_probes),
  }


def render(results: dict) -> str:
  """The markdown: what was probed, the table, the command and its wall time."""
  from ankh3_jax.ablation import report  # pylint: disable=g-import-not-at-top
  m, p, d = results["model"], results["probe_settings"], results["probe_data"]
  metrics = ", ".join(f"{METRIC_NAMES[t]} ({t})" for t in TASKS if t in p["tasks"])
  return "\n".join([
      f"# Linear probes of `{m['path']}`",
      "",
      f"Model: d_model {m['d_model']}, {m['encoder_layers']}+{m['decoder_layers']} layers, "
      f"{m['encoder_parameters']:,} encoder parameters (with the embedding). Frozen "
      f"per-residue features, linear heads, {p['steps']} AdamW steps of batch "
      f"{p['batch_size']}, learning rate {p['learning_rate']:g}; trained on "
      f"{d['train_chains']:,} chains of the shipped structure split, scored on "
      f"{d['test_chains']:,} test chains ({d['test_residues']:,} residues): {metrics}. "
      f"Mean ± sample std over probe seeds {', '.join(str(s) for s in p['seeds'])}.",
      "",
      report.results_table(results),
      "",
      f"`{results['command']}`: {results['wall_seconds'] / 60:.1f} min on "
      f"{results['machine']} (load average at the start {results['load_average']:.1f}).",
      "",
  ])


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  quiet.setup(argv)
  try:
    args = parse_args(argv)
    config = check_paths(args)
    command = " ".join([PROG, *(shlex.quote(a) for a in argv)])
    results = collect(args, config, command)
  except run.UsageError as e:
    return cli.error(PROG, e, 2)
  text = render(results)
  try:  # again: a file that appeared during the work is not replaced either
    for path in (args.out, table_path(args.out)):
      output_paths.check_output_file(path, [args.model], overwrite=args.overwrite,
                                     what="--out")
  except output_paths.OutputError as e:
    print(text, end="")
    return cli.error(PROG, e, 2)
  files.write_json(args.out, results)
  files.write_text(table_path(args.out), text)
  print(text, end="")
  print(f"{PROG}: wrote {args.out} and {table_path(args.out)}", file=sys.stderr)
  return 0
