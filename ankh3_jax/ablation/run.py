"""`ankh3-ablation`: pre-train each ablation experiment, probe its frozen encoder on the
shipped structure data and write the results page (tables and SVG plots).

  ankh3-ablation                       # the four experiments, probe seeds 0,1,2
  ankh3-ablation --doc docs/ablation.md   # and rewrite the repository's page
  ankh3-ablation --experiments ankh3,mlm15_only --seeds 0,1 --train_steps 100 \\
      --out_dir runs/ablation-short --doc runs/ablation-short/ablation.md
  ankh3-ablation probe --model runs/demo/model --out probes.json   # one model only
                                       # (see ankh3_jax/ablation/probe_model.py)
  ankh3-ablation --gin_file=experiments/reference_scale.gin \
      --experiments ankh3,ankh3@1,mlm15_only,mlm15_only@1,mlm_multi,completion_only
                                       # the reference budget, two pre-training seeds
                                       # for two objectives (see ankh3_jax/ablation/runs.py)

Stages, each resumable (finished work in --out_dir is reused, files are written
atomically):
  1. pre-train every run (`ankh3-train --gin_file=experiments/<name>.gin`, then any
     --gin_file, then `--gin.SEED=<seed>` for a run `<name>@<seed>`) into OUT_DIR/<name>
     or OUT_DIR/<name>-seed<seed>; an unfinished run resumes from its checkpoint;
  2. per-residue features of the structure set's train and test chains: each run's
     exported encoder, the same encoder at its initialisation (step 0), one-hot
     residues and a one-hot window of +/-7 residues;
  3. a linear probe per feature set, task and seed: OUT_DIR/probes/<set>/<task>-seed<s>.json;
  4. OUT_DIR/results.json, the page (--doc, default OUT_DIR/ablation.md), its two SVGs and
     a copy of the results next to it (<doc>.json).
An existing page is rewritten only if this command wrote it, and an OUT_DIR holding
other files is used only with --overwrite; both are checked before any work starts.
Exit codes: 0 done, 1 a pre-training failed (its log is named), 2 bad arguments, an
OUT_DIR made with other settings, or outputs that are not ours.
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
from ankh3_jax.ablation import EXPERIMENTS
from ankh3_jax.ablation import TASKS
from ankh3_jax.ablation import WINDOW_RADIUS
from ankh3_jax.ablation import files
from ankh3_jax.ablation import pretrain
from ankh3_jax.ablation import runs

PROG = "ankh3-ablation"
DEFAULT_OUT_DIR = os.path.join("runs", "ablation")
DOC_NAME = "ablation.md"  # default page: OUT_DIR/ablation.md
SETTINGS_FILE = "settings.json"
INVOCATIONS_FILE = "invocations.json"  # wall time and reuse of every finished invocation
RANDOM_INIT, ONEHOT, ONEHOT_WINDOW = "random_init", "onehot", "onehot_window"
REFERENCE_LABELS = {RANDOM_INIT: ("random init (step 0, no pre-training)", "random init"),
                    ONEHOT: ("one-hot residues (no encoder)", "one-hot"),
                    ONEHOT_WINDOW: (f"one-hot window ±{WINDOW_RADIUS} residues (no encoder)",
                                    f"one-hot ±{WINDOW_RADIUS}")}


class UsageError(ValueError):
  """Bad arguments, or an output directory that holds another configuration."""


def _csv(text: str) -> list:
  return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Bindings: --gin.NAME=VALUE (repeatable) go to every "
                              "pre-training, e.g. --gin.BATCH_SIZE=32. One model against the "
                              "same references: ankh3-ablation probe --help")
  p.add_argument("--out_dir", default=DEFAULT_OUT_DIR,
                 help="runs, probes, results (default %(default)s)")
  p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                 help="comma-separated runs, each one of " + ", ".join(EXPERIMENTS) +
                 f", optionally with {runs.SEPARATOR}SEED for another pre-training seed "
                 f"(e.g. ankh3,ankh3{runs.SEPARATOR}1)")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin file for every pre-training, parsed after the experiment's own "
                 "(repeatable), e.g. experiments/reference_scale.gin")
  p.add_argument("--seeds", default="0,1,2", help="probe seeds, comma-separated")
  p.add_argument("--train_steps", type=int, default=None,
                 help="override TRAIN_STEPS of experiments/base.gin")
  p.add_argument("--probe_steps", type=int, default=300)
  p.add_argument("--probe_train_limit", type=int, default=None,
                 help="use only the first N train chains for the probes")
  p.add_argument("--probe_test_limit", type=int, default=None,
                 help="score on only the first N test chains")
  p.add_argument("--tasks", default=",".join(TASKS), help="probe tasks, comma-separated")
  p.add_argument("--no_references", action="store_true",
                 help="skip the reference probes (random init, one-hot, one-hot window)")
  p.add_argument("--doc", default=None,
                 help="markdown page to write, with its two SVG plots and a JSON copy of "
                 f"the results beside it (default OUT_DIR/{DOC_NAME}, i.e. "
                 f"{os.path.join(DEFAULT_OUT_DIR, DOC_NAME)}; pass docs/{DOC_NAME} to "
                 "rewrite the repository's page)")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an OUT_DIR holding other files, and replace a page (and "
                 "its SVGs and JSON) this command did not write")
  quiet.add_flag(p)
  return p


def parse_args(argv: Sequence[str]):
  """(args, gin bindings 'NAME=VALUE'), the bindings split as `ankh3-train` does."""
  from ankh3_jax import gin_files  # pylint: disable=g-import-not-at-top
  rest, bindings = gin_files.split_gin_flags(argv)
  if any("=" not in b for b in bindings):
    raise UsageError("gin bindings take the form --gin.NAME=VALUE")
  args = build_parser().parse_args(rest)
  args.experiments = _csv(args.experiments)
  args.tasks = _csv(args.tasks)
  for label in args.experiments:
    try:
      runs.parse(label)
    except ValueError as e:
      raise UsageError(f"--experiments: {e}") from None
  duplicates = sorted({runs.directory(e) for e in args.experiments
                       if [runs.directory(x) for x in args.experiments].count(
                           runs.directory(e)) > 1})
  unknown = [t for t in args.tasks if t not in TASKS]
  if duplicates or unknown or not args.experiments or not args.tasks:
    raise UsageError(f"--experiments / --tasks: repeated runs {duplicates}, unknown tasks "
                     f"{unknown}, or none given; tasks are {TASKS}")
  try:
    args.seeds = [int(s) for s in _csv(args.seeds)]
  except ValueError:
    raise UsageError(f"--seeds must be integers, got {args.seeds!r}") from None
  if not args.seeds:
    raise UsageError("--seeds is empty")
  if args.doc is None:
    args.doc = os.path.join(args.out_dir, DOC_NAME)
  return args, bindings


def check_outputs(args) -> None:
  """Refuses (UsageError) an OUT_DIR or page this command did not write, unless
  --overwrite; run before any work."""
  from ankh3_jax.ablation import report  # pylint: disable=g-import-not-at-top
  try:
    output_paths.check_output_dir(
        args.out_dir, overwrite=args.overwrite, what="--out_dir",
        is_ours=lambda d: os.path.isfile(os.path.join(d, SETTINGS_FILE)))
    report.check_page_paths(args.doc, overwrite=args.overwrite)
  except output_paths.OutputError as e:
    raise UsageError(str(e)) from e


def _check_settings(out_dir: str, current: dict) -> None:
  """Records the settings of OUT_DIR on first use; later runs must match them."""
  path = os.path.join(out_dir, SETTINGS_FILE)
  saved = files.read_json(path)
  if saved is None:
    files.write_json(path, current)
    return
  diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
  if diff:
    raise UsageError(f"{out_dir} holds results made with other settings (saved, now): "
                     f"{diff}; use another --out_dir or delete it")


def _log(message: str) -> None:
  print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _random_init(model_dir: str, seed: int):
  """(config, params): the encoder the runs start from (the trainer's init key)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  from ankh3_jax.model import Transformer  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training.state import StateFactory  # pylint: disable=g-import-not-at-top
  config = model_io.load_config(os.path.join(model_dir, "model"))
  factory = StateFactory(Transformer(config), optax.identity(), {"inputs": 8, "targets": 8})
  return config, factory.init(jax.random.fold_in(jax.random.key(seed), 0)).params


class ProbeStage:
  """Features (computed once per feature set, only when a probe needs them) and probes;
  each probe's score is kept in OUT_DIR/probes/ and reused (no files when out_dir is
  None). `args` names probe_steps, tasks, seeds, probe_train_limit, probe_test_limit."""

  def __init__(self, args, out_dir: Optional[str]):
    from ankh3_jax.ablation import probes  # pylint: disable=g-import-not-at-top
    from ankh3_jax.downstream import data  # pylint: disable=g-import-not-at-top
    self.probes = probes
    self.settings = probes.ProbeSettings(steps=args.probe_steps)
    self.tasks, self.seeds = args.tasks, args.seeds
    self.out_dir = out_dir
    self.train_chains = data.load_chains("train", limit=args.probe_train_limit)
    self.test_chains = data.load_chains("test", limit=args.probe_test_limit)
    self.examples = {t: (probes.task_examples(t, self.train_chains),
                         probes.task_examples(t, self.test_chains)) for t in self.tasks}
    self.reused = 0

  def _path(self, feature_set: str, task: str, seed: int) -> Optional[str]:
    if self.out_dir is None:
      return None
    return os.path.join(self.out_dir, "probes", feature_set, f"{task}-seed{seed}.json")

  def run(self, feature_set: str, model_fn) -> dict:
    """{task: {seed: score}} for one feature set; `model_fn()` gives what
    `probes.features` takes (a model, or `probes.OneHot`)."""
    out, features = {}, None
    for task in self.tasks:
      for seed in self.seeds:
        path = self._path(feature_set, task, seed)
        record = files.read_json(path) if path else None
        if record is None:
          if features is None:
            start = time.time()
            features = self.probes.features(
                model_fn(), [c.sequence for c in self.train_chains],
                [c.sequence for c in self.test_chains])
            _log(f"{feature_set}: features in {time.time() - start:.0f} s")
          start = time.time()
          train, test = self.examples[task]
          record = self.probes.run_probe(task, train, features[0], test, features[1],
                                         self.settings, seed)
          record["seconds"] = time.time() - start
          record["feature_dim"] = int(features[0][0].shape[-1])
          if path:
            files.write_json(path, record)
          _log(f"{feature_set} {task} seed {seed}: {record['metric_name']} "
               f"{record['metric']:.4f} ({record['seconds']:.0f} s)")
        else:
          self.reused += 1
        out.setdefault(task, {})[str(seed)] = record
    return out

  def data_summary(self) -> dict:
    return {"train_chains": len(self.train_chains), "test_chains": len(self.test_chains),
            "test_residues": sum(len(c.sequence) for c in self.test_chains)}

  def run_references(self, random_init_fn) -> tuple:
    """({name: {task: {seed: score}}}, [feature set entries]) of the references:
    `random_init_fn()` (the encoder untrained), one-hot residues and the one-hot window."""
    sources = ((RANDOM_INIT, random_init_fn), (ONEHOT, self.probes.OneHot),
               (ONEHOT_WINDOW, lambda: self.probes.OneHot(radius=WINDOW_RADIUS)))
    results, feature_sets = {}, []
    for name, source_fn in sources:
      results[name] = self.run(name, source_fn)
      label, short = REFERENCE_LABELS[name]
      feature_sets.append({"name": name, "label": label, "short": short})
    return results, feature_sets

  def baselines(self, results_probes: dict) -> dict:
    """{task: {'name', 'value'}}: each task's trivial baseline (the same in every probe)."""
    out = {}
    for task in self.tasks:
      record = next(iter(next(iter(results_probes.values()))[task].values()))
      out[task] = {"name": record["baseline_name"], "value": record["baseline"]}
    return out


def _shared_settings(experiments: dict, model_dir: str) -> dict:
  """The settings every experiment shares, with the model's size."""
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  from ankh3_jax.param_count import count_params  # pylint: disable=g-import-not-at-top
  keys = ("model_preset", "feature_lengths", "train_steps", "batch_size", "pack")
  first = next(iter(experiments.values()))["settings"]
  for name, exp in experiments.items():
    differing = [k for k in keys if exp["settings"][k] != first[k]]
    if differing:
      raise UsageError(f"experiment {name} differs from the others in {differing}")
  config = model_io.load_config(os.path.join(model_dir, "model"))
  counts = count_params(config)
  lengths = first["feature_lengths"]
  return {**{k: first[k] for k in keys},
          "seeds": {name: exp["settings"]["seed"] for name, exp in experiments.items()},
          "d_model": config.d_model, "encoder_layers": config.num_encoder_layers,
          "decoder_layers": config.num_decoder_layers, "parameters": counts["total"],
          "encoder_parameters": counts["encoder"],
          "padded_positions": first["train_steps"] * first["batch_size"]
                              * (lengths["inputs"] + lengths["targets"])}


def collect(args, bindings: Sequence[str], command: str) -> dict:
  """Runs the stages and returns the results dictionary (see report.render)."""
  from ankh3_jax.ablation import stats  # pylint: disable=g-import-not-at-top
  start = time.time()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  out_dir = os.path.abspath(args.out_dir)
  probe_stage_settings = dict(steps=args.probe_steps, train_limit=args.probe_train_limit,
                              test_limit=args.probe_test_limit)
  saved = {"train_steps": args.train_steps, "bindings": list(bindings),
           "probes": probe_stage_settings}
  if args.gin_file:  # absent from older OUT_DIRs, which had no --gin_file
    saved["gin_files"] = list(args.gin_file)
  _check_settings(out_dir, saved)
  experiments, reused_runs = {}, 0
  for label in args.experiments:
    name, model_dir = runs.experiment(label), os.path.join(out_dir, runs.directory(label))
    run_bindings = [*bindings, *runs.bindings(label)]
    settings = pretrain.settings(name, [*run_bindings, *(
        [f"TRAIN_STEPS={args.train_steps}"] if args.train_steps else [])], args.gin_file)
    if pretrain.is_finished(model_dir):
      reused_runs += 1
      _log(f"{label}: already trained in {model_dir}")
    else:
      train_command = pretrain.train_command(name, model_dir, args.train_steps,
                                             run_bindings, args.gin_file)
      _log(f"{label}: training ({' '.join(train_command)})")
      pretrain.run(name, model_dir, args.train_steps, run_bindings,
                   compile_cache=os.path.join(out_dir, "jax_cache"),
                   extra_gin_files=args.gin_file)
    experiments[label] = {"settings": settings, "run": pretrain.read_run(model_dir)}
    run = experiments[label]["run"]
    _log(f"{label}: trained in {run['train_seconds'] / 60:.1f} min, tokens {run['tokens']}")

  stage = ProbeStage(args, out_dir)
  first_dir = os.path.join(out_dir, runs.directory(args.experiments[0]))
  seed = experiments[args.experiments[0]]["settings"]["seed"]
  feature_sets, results_probes = [], {}
  for label in args.experiments:
    model_path = os.path.join(out_dir, runs.directory(label), "model")
    results_probes[label] = stage.run(runs.directory(label), lambda path=model_path: path)
    feature_sets.append({"name": label, "label": f"`{label}`", "short": label})
  if not args.no_references:
    references, reference_sets = stage.run_references(lambda: _random_init(first_dir, seed))
    results_probes.update(references)
    feature_sets += reference_sets
  return {
      "format": "ankh3-ablation/1",
      "command": command,
      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
      "machine": f"{os.cpu_count()} CPU cores",
      "load_average": load,
      "wall_seconds": time.time() - start,
      "reused": {"pre-trainings": reused_runs, "probes": stage.reused},
      "work": {"pre-trainings": len(experiments) - reused_runs,
               "probes": sum(len(seeds) for tasks in results_probes.values()
                             for seeds in tasks.values()) - stage.reused},
      "shared": _shared_settings(experiments, first_dir),
      "experiments": experiments,
      "probe_settings": {**dataclasses.asdict(stage.settings), "seeds": args.seeds,
                         "tasks": args.tasks},
      "probe_data": stage.data_summary(),
      "feature_sets": feature_sets,
      "probes": results_probes,
      "summary": stats.summarize(results_probes),
      "pooled": stats.pool(results_probes),
      "baselines": stage.baselines(results_probes),
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`ankh3-ablation` (see cli.py); exit codes at the top of this module."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["probe"]:
    from ankh3_jax.ablation import probe_model  # pylint: disable=g-import-not-at-top
    return probe_model.main(argv[1:])
  quiet.setup(argv, tensorflow="--help" not in argv and "-h" not in argv)
  try:
    args, bindings = parse_args(argv)
    check_outputs(args)
    command = " ".join(["ankh3-ablation", *(shlex.quote(a) for a in argv)])
    results = collect(args, bindings, command)
  except UsageError as e:
    return cli.error(PROG, e, 2)
  except RuntimeError as e:
    return cli.error(PROG, e, 1)
  from ankh3_jax.ablation import report  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(args.out_dir)
  log_path = os.path.join(out_dir, INVOCATIONS_FILE)
  invocations = files.read_json(log_path, [])
  invocations.append({"command": command, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "seconds": results["wall_seconds"], "load_average": results["load_average"],
                      "reused": results["reused"], "work": results["work"]})
  files.write_json(log_path, invocations)
  results["invocations"] = invocations
  files.write_json(os.path.join(out_dir, "results.json"), results)
  files.write_json(os.path.splitext(args.doc)[0] + ".json", results)
  for path in report.write_page(results, args.doc):
    _log(f"wrote {path}")
  _log(f"done in {results['wall_seconds'] / 60:.1f} min")
  return 0


if __name__ == "__main__":
  sys.exit(main())
