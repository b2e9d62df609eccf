"""Hugging Face interop: import and export `transformers` T5 checkpoints (see docs/conversion.md).

  ankh3-convert import HF_DIR OUT_MODEL_DIR [--scan_layers] [--overwrite]
  ankh3-convert export MODEL_DIR HF_OUT_DIR [--encoder_only] [--overwrite]

An existing output directory is replaced only if this command wrote it (it holds our
files and nothing else) or with --overwrite; never the input or the working directory.

Import reads local `T5ForConditionalGeneration` / `T5EncoderModel` directories (safetensors,
sharded or not, without torch; `pytorch_model.bin` needs torch). Export writes safetensors
with numpy only. Neither imports TensorFlow, seqio, torch or transformers at module level.
"""
import argparse
import json
import logging
import os
import sys
from typing import Any, Optional

from ankh3_jax import cli
from ankh3_jax import model_io
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax import vocab as vocab_lib
from ankh3_jax.config import T5Config
from ankh3_jax.hf import config as hf_config
from ankh3_jax.hf import tokenizer as hf_tokenizer
from ankh3_jax.hf import weights as hf_weights

PROG = "ankh3-convert"
# What `export_hf` writes: a directory with these files only may be replaced by an export.
EXPORT_FILES = ("config.json", "generation_config.json", hf_weights.SAFETENSORS_FILE,
                hf_tokenizer.SPIECE_FILE, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def import_hf(hf_dir: str) -> tuple[T5Config, hf_weights.Params, hf_tokenizer.VocabInfo]:
  """Reads a local HF T5 directory: (our config, unscanned float32 params, vocab info).

  A `T5EncoderModel` checkpoint gives params without `decoder`.
  """
  hf_cfg = hf_config.read_hf_config(hf_dir)
  encoder_only = "T5EncoderModel" in (hf_cfg.get("architectures") or [])
  try:
    state = hf_weights.load_hf_weights(hf_dir)
    config, params = hf_weights.state_to_params(state, hf_cfg, encoder_only)
  except ValueError as e:
    raise ValueError(f"{hf_dir}: {e}") from e
  return config, params, hf_tokenizer.hf_vocab_info(hf_dir, config.vocab_size)


def is_hf_export(directory: str) -> bool:
  """Whether `directory` holds what `export_hf` writes and nothing else.

  A directory from the Hub holds the same files, but its config.json names the
  transformers version that wrote it; ours does not.
  """
  entries = set(os.listdir(directory))
  if "config.json" not in entries or not entries <= set(EXPORT_FILES):
    return False
  try:
    hf_cfg = hf_config.read_json(os.path.join(directory, "config.json"))
  except ValueError:
    return False
  return (isinstance(hf_cfg, dict) and hf_cfg.get("model_type") == "t5"
          and "transformers_version" not in hf_cfg)


def export_hf(config: T5Config, params: Any, out_dir: str,
              vocab_path: str = vocab_lib.VOCAB_PATH,
              extra_ids: int = vocab_lib.NUM_SENTINELS, encoder_only: bool = False,
              overwrite: bool = False) -> None:
  """Writes an HF directory (atomically): T5ForConditionalGeneration, or with `encoder_only`
  T5EncoderModel (required for params without a decoder). Scanned params are unstacked.

  An existing `out_dir` is replaced only if an export wrote it (`is_hf_export`) or with
  `overwrite`, never when it holds `vocab_path` or the working directory.
  """
  output_paths.check_output_dir(out_dir, [vocab_path], overwrite=overwrite,
                                is_ours=is_hf_export, what="output directory")
  config = config.replace(scan_layers=False)
  params = model_io.unstack_layers(model_io.as_plain_params(params), config)
  model_io.check_params(config, params, where="params to export")
  if not encoder_only and "decoder" not in params:
    raise ValueError("params have no decoder (an encoder-only model): export with "
                     "encoder_only=True (--encoder_only)")
  hf_cfg = hf_config.config_to_hf(config, encoder_only)
  with output_paths.atomic_directory(out_dir) as tmp:
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_cfg, f, indent=2)
    if not encoder_only:
      with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"decoder_start_token_id": vocab_lib.PAD_ID, "eos_token_id": vocab_lib.EOS_ID,
                   "pad_token_id": vocab_lib.PAD_ID}, f, indent=2)
    hf_weights.write_safetensors(os.path.join(tmp, hf_weights.SAFETENSORS_FILE), config,
                                 params, encoder_only)
    hf_tokenizer.write_hf_tokenizer(tmp, vocab_path, extra_ids)


def main(argv: Optional[list[str]] = None) -> int:
  """`ankh3-convert` (see cli.py); 0 done, 1 a bad input or output directory."""
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face T5 directory -> our model directory")
  imp.add_argument("hf_dir")
  imp.add_argument("out_model_dir")
  imp.add_argument("--scan_layers", action="store_true",
                   help="store the layers stacked, for scan_layers=True models")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT_MODEL_DIR this command did not write")
  exp = sub.add_parser("export", help="our model directory -> Hugging Face T5 directory")
  exp.add_argument("model_dir")
  exp.add_argument("hf_out_dir")
  exp.add_argument("--encoder_only", action="store_true", help="write a T5EncoderModel")
  exp.add_argument("--overwrite", action="store_true",
                   help="replace an existing HF_OUT_DIR this command did not write")
  quiet.add_flag(imp)
  quiet.add_flag(exp)
  quiet.setup(argv)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.command == "import":
      # Checked before the (possibly long) import; save_model checks again.
      output_paths.check_output_dir(args.out_model_dir, [args.hf_dir],
                                    overwrite=args.overwrite,
                                    is_ours=model_io.is_model_directory,
                                    what="output directory")
      config, params, vocab = import_hf(args.hf_dir)
      config = config.replace(scan_layers=args.scan_layers)
      model_io.save_model(args.out_model_dir, config, params, vocab_path=vocab.spiece_path,
                          extra_ids=vocab.extra_ids, overwrite=args.overwrite)
      logging.info("wrote %s (%s; extra_ids=%d from %s)", args.out_model_dir,
                   "encoder only" if "decoder" not in params else "encoder-decoder",
                   vocab.extra_ids, vocab.rule)
    else:
      output_paths.check_output_dir(args.hf_out_dir, [args.model_dir],
                                    overwrite=args.overwrite, is_ours=is_hf_export,
                                    what="output directory")
      config, params, vocab_path = model_io.load_model(args.model_dir)
      export_hf(config, params, args.hf_out_dir, vocab_path=vocab_path,
                extra_ids=model_io.load_extra_ids(args.model_dir),
                encoder_only=args.encoder_only or "decoder" not in params,
                overwrite=args.overwrite)
      logging.info("wrote %s", args.hf_out_dir)
  except (OSError, ValueError, ImportError) as e:
    return cli.error(PROG, e, 1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
