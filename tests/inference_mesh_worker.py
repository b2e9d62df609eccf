"""Embeds and completes with a tiny random model on each layout of 8 forced CPU devices
(run in a subprocess by test_inference_mesh.py): writes the results to an .npz."""
import json
import sys

import flax.linen as nn
import jax
import numpy as np

from ankh3_jax import complete
from ankh3_jax import config as config_lib
from ankh3_jax import embed
from ankh3_jax import inference_memory
from ankh3_jax import inference_mesh
from ankh3_jax import model
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta

NUM_SEQUENCES = 5  # not a multiple of 8: batches need padding rows
NUM_PROMPTS = 5


def main(out_path: str) -> None:
  assert jax.local_device_count() == 8, jax.devices()
  config = config_lib.preset("tiny")
  params = model.init_params(config, seed=3)
  records = []
  for record in fasta.read_fasta(corpus.corpus_path("validation")):
    if len(record.sequence) <= 120:
      records.append(record)
    if len(records) == NUM_SEQUENCES:
      break
  seqs = [r.sequence for r in records]
  encoder_bytes = inference_memory.params_bytes(
      {k: nn.unbox(params)[k] for k in ("token_embedder", "encoder")})
  layouts = {
      "single": inference_mesh.single_device_layout(),
      "data8": inference_mesh.choose_layout(encoder_bytes),
      "model2x4": inference_mesh.choose_layout(encoder_bytes, mesh="data=2,model=4"),
      "data8_2d": inference_mesh.choose_layout(encoder_bytes, param_dims=2),
  }
  # A device too small for the whole encoder: split over `model` (the same mesh and rules
  # as model2x4, so the same embeddings).
  auto = inference_mesh.choose_layout(encoder_bytes, device_bytes=encoder_bytes // 3)
  results, info = {}, {"auto_fit": {"mesh": dict(auto.mesh.shape), "reason": auto.reason,
                                    "same_rules": auto.rules == layouts["model2x4"].rules}}
  for name, layout in layouts.items():
    # One bucket: a full batch of 2 rows and a last of 1 (padded to 8 on data=8).
    embedder = embed.Embedder((config, params), token_budget=256, buckets=[128],
                              layout=layout)
    embs = embed.embed_sequences(embedder, seqs)
    for i, emb in enumerate(embs):
      results[f"{name}/residue/{i}"] = emb.per_residue
      results[f"{name}/protein/{i}"] = emb.per_protein
    leaf = embedder._params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # pylint: disable=protected-access
    info[name] = {"mesh": dict(layout.mesh.shape), "reason": layout.reason,
                  "kernel_shard": list(leaf.sharding.shard_shape(leaf.shape)),
                  "traced": [list(s) for s in embedder.traced_shapes]}
  prompts = [s[:12 + 3 * i] for i, s in enumerate(seqs[:NUM_PROMPTS])]
  for name in ("single", "data8", "model2x4"):
    outs = complete.complete((config, params), prompts, max_new_tokens=12, batch_size=4,
                             layout=layouts[name])
    info[name]["greedy"] = [list(o.token_ids) for o in outs]
  np.savez(out_path, info=np.array(json.dumps(info)), **results)


if __name__ == "__main__":
  main(sys.argv[1])
