"""`ankh3-finetune`: train a downstream head, report held-out metrics and baselines.

Trains on the shipped structure set or on your own labelled CSV and scores the held-out
examples against the task's trivial baseline.

  ankh3-finetune --model_dir MODEL --task ss3                       # shipped chains
  ankh3-finetune --features onehot --task contacts
  ankh3-finetune --model_dir MODEL --task ss3 --data_csv my_ss3.csv --predictions pred.csv
  ankh3-finetune --model_dir MODEL --task fitness --data_csv DMS.csv  # ProteinGym, FLIP, TAPE

Labels: SS3 letters H/E/C; SS8 DSSP letters HGIEBTSC (coil C, also read from L or -);
SS3 from 8-state labels by H/G/I -> H, E/B -> E, T/S/C -> C; fitness, one number.
Tasks and their metrics: `downstream/tasks.py` (docs/downstream.md). A CSV without a
split column is split at random (`--eval_fraction`, `--split_seed`, printed) unless
`--eval_csv` gives the evaluation rows.
"""
import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax.downstream import finetune
from ankh3_jax.downstream import heads
from ankh3_jax.downstream import tasks
from ankh3_jax.downstream import training
from ankh3_jax.downstream import user_data

PROG = "ankh3-finetune"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n\n".join(__doc__.split("\n\n")[2:]))
  p.add_argument("--task", choices=tasks.NAMES, required=True)
  p.add_argument("--model_dir", help="model directory (our format)")
  p.add_argument("--features", choices=["embed", "onehot"], default="embed",
                 help="frozen embeddings of --model_dir (default) or one-hot residues")
  p.add_argument("--finetune_encoder", action="store_true",
                 help="train the encoder together with the head (full fine-tuning)")
  p.add_argument("--head", choices=heads.KINDS, default="convbert")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--learning_rate", type=float, default=1e-3)
  p.add_argument("--encoder_learning_rate", type=float, default=1e-4)
  p.add_argument("--dropout", type=float, default=0.2)
  p.add_argument("--seed", type=int, default=0, help="head initialisation, batch order")
  data = p.add_argument_group("your data (default: the shipped structure set)")
  data.add_argument("--data_csv", "--fitness_csv", dest="data_csv",
                    help="labelled CSV to train and evaluate on (ss3, ss8, fitness)")
  data.add_argument("--sequence_column", help="default: the first of input, sequence, seq, "
                    "primary, aa_seq, mutated_sequence")
  data.add_argument("--label_column", help="ss3: dssp3/ss3/sst3/q3 (or derived from 8 "
                    "states); ss8: dssp8/ss8/sst8/q8; fitness: target, label, "
                    "log_fluorescence, fitness, score, stability_score, DMS_score")
  data.add_argument("--split_column", help="default: set or split (FLIP's validation "
                    "column marks held-out train rows)")
  data.add_argument("--id_column", help="default: id, name, pdb_id or mutant; else line<N>")
  data.add_argument("--mask_column", help="per-residue 0/1 values; 0 = not scored (SS)")
  data.add_argument("--eval_split", default="test", help="split whose rows are evaluated "
                    "(shipped: validation or test; default test)")
  data.add_argument("--eval_fraction", type=float, default=0.2,
                    help="without a split column: the random fraction evaluated")
  data.add_argument("--split_seed", type=int, default=None,
                    help="seed of the random split (default: --seed)")
  data.add_argument("--eval_csv", help="also evaluate on this CSV (shipped data: an SS "
                    "benchmark such as CB513); with a --data_csv that has no split column, "
                    "the evaluation set")
  data.add_argument("--train_limit", type=int, default=None,
                    help="use only the first N training examples")
  data.add_argument("--eval_limit", type=int, default=None)
  out = p.add_argument_group("outputs (checked before training)")
  out.add_argument("--predictions", help="per-example predictions CSV of the evaluation "
                   "sets (ss3, ss8, fitness)")
  out.add_argument("--output_json", help="the results as JSON")
  out.add_argument("--overwrite", action="store_true",
                   help="replace an existing --predictions / --output_json file")
  p.add_argument("--length_quantum", type=int, default=training.LENGTH_QUANTUM,
                 help="pad batches to multiples of this many residues (each multiple "
                 "compiles once)")
  p.add_argument("--log_every", type=int, default=0)
  quiet.add_flag(p)
  return p


def _columns(args) -> tasks.CsvColumns:
  return tasks.CsvColumns(sequence=args.sequence_column, label=args.label_column,
                          split=args.split_column, id=args.id_column, mask=args.mask_column)


def _check_outputs(args) -> None:
  inputs = [args.model_dir, args.data_csv, args.eval_csv]
  if args.predictions and tasks.get(args.task).to_text is None:
    raise ValueError(f"--predictions is for tasks with per-example CSV output "
                     f"({[t.name for t in tasks.TABLE.values() if t.to_text]})")
  for path, flag in ((args.predictions, "--predictions"), (args.output_json, "--output_json")):
    if path:
      output_paths.check_output_file(path, inputs, overwrite=args.overwrite, what=flag)
  if args.predictions and args.output_json and args.predictions == args.output_json:
    raise ValueError("--predictions and --output_json name the same file")


def load_data(args) -> user_data.TaskData:
  """Train and evaluation sets the flags ask for."""
  if args.data_csv:
    seed = args.seed if args.split_seed is None else args.split_seed
    return user_data.from_csv(args.task, args.data_csv, columns=_columns(args),
                              eval_split=args.eval_split, eval_csv=args.eval_csv,
                              eval_fraction=args.eval_fraction, split_seed=seed,
                              train_limit=args.train_limit, eval_limit=args.eval_limit)
  if not args.eval_csv and any(v is not None for v in dataclasses.astuple(_columns(args))):
    raise ValueError("column flags are for --data_csv or --eval_csv")
  sets = user_data.shipped(args.task, args.eval_split, args.train_limit, args.eval_limit)
  if args.eval_csv:
    sets.add_csv(args.task, args.eval_csv, _columns(args))
  return sets


def _run(args) -> tuple:
  """(results [(name, Result)], predictions CSV text or None)."""
  features = "finetune" if args.finetune_encoder else args.features
  _check_outputs(args)
  sets = load_data(args)
  print(f"{PROG}: {sets.split}", file=sys.stderr, flush=True)
  trained = finetune.fit(args.task, sets.train, model=args.model_dir, features=features,
                         head=args.head, steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate,
                         encoder_learning_rate=args.encoder_learning_rate,
                         dropout=args.dropout, seed=args.seed,
                         length_quantum=args.length_quantum, progress=True,
                         log_every=args.log_every)
  results, predicted = [], []
  for name, examples, noun in sets.evaluations:
    predictions = trained.predict(examples)
    results.append((name, trained.evaluate(examples, predictions=predictions), noun))
    predicted.append((name, examples, predictions))
  text = user_data.predictions_csv(args.task, predicted) if args.predictions else None
  return results, text


def main(argv: Optional[Sequence[str]] = None) -> int:
  quiet.setup(argv)
  args = build_parser().parse_args(argv)
  try:
    results, predictions = _run(args)
  except (ValueError, OSError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  report = []
  for name, r, noun in results:
    print(f"{r.task} on {name} ({r.eval_examples} {noun}, {r.train_examples} to train, "
          f"{r.steps} steps, {r.extra['features']}/{r.extra['head']}): {r.metric_name} "
          f"{r.metric:.4f} vs {r.baseline_name} {r.baseline:.4f} (margin {r.margin:+.4f}), "
          f"{r.seconds:.0f} s")
    report.append({"eval": name, **dataclasses.asdict(r), "margin": r.margin})
  try:
    if predictions is not None:
      user_data.write_predictions(args.predictions, predictions)
      print(f"{PROG}: predictions in {args.predictions}", file=sys.stderr)
    if args.output_json:
      with output_paths.atomic_file(args.output_json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
  except OSError as e:
    print(f"{PROG}: error: cannot write ({e.strerror or e}: {e.filename})", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
