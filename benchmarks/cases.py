"""One benchmark measurement per process, so peak memory is that of the case alone.

Run: python -m benchmarks.cases CASE IMPL [--device cpu|gpu] [--tuning none|retain|eigen|cpu]
  -> one JSON line on stdout.
CASE: train_tiny, train_small, embed, complete_b1, complete_b16, matmul_peak, data;
  train_small_bf16 (bfloat16 mixed precision, both sides), matmul_bf16 (2048^3, both);
  the real sizes `REAL_CASES`: embed_ankh_base, complete_ankh3_large_bf16, ...
IMPL: ours or peer (Hugging Face transformers' PyTorch T5 on the same weights), or
prepare (real sizes only: write the cached model, `benchmarks.real_models`).
--work_dir: where the real sizes' models and first outputs are kept between processes.
--tuning retain applies `ankh3_jax.cpu_tuning.retain_freed_memory` (what
`ankh3-train --retain_freed_memory` does), --tuning eigen `prefer_eigen_dots`, --tuning cpu
both, to the process whichever the implementation, so both sides run in the same
environment. Default (none): the processes as users get them; for our train cases that is
what `ankh3-train` runs, with its defaults `--huge_pages` and `--cpu_dots auto`
(`cpu_tuning.reexec_with_huge_pages`, `cpu_tuning.apply_train_dots_for_this_cpu`).
"""
import argparse
import functools
import gzip
import json
import os
import resource
import sys
import tempfile
import time
from typing import Optional

import numpy as np

TRAIN_BATCH, TRAIN_INPUT_LEN, TRAIN_TARGET_LEN = 16, 256, 256
EMBED_COUNT, EMBED_MIN, EMBED_MAX, PEER_EMBED_BATCH = 64, 50, 1000, 8
COMPLETE_PROMPT, COMPLETE_NEW = 64, 256
SEED = 0
# Timed repetitions after the warm-up; each case reports their median (one process's
# step time varies by 10-30% on a 2-core machine, so a few more calls steady it).
TRAIN_STEPS, EMBED_PASSES, COMPLETE_RUNS = 10, 3, 5
MATMUL_N = 2048  # matmul_bf16: the 2048^3 product
# Real sizes: the released shapes, randomly initialised (`benchmarks.real_models`), in
# float32 and bfloat16 weights. Fewer sequences and tokens than the `small` cases, so
# that one process takes a few minutes on 2 cores, not fewer layers.
REAL_PRESETS = ("ankh_base", "ankh3_large")
# Embedding: the first sequences of the `embed` case (96, 201, 174, 507 residues), one
# timed pass; completion: the first prompts, cut to 32 residues, 16 new tokens.
REAL_EMBED_COUNT = {"ankh_base": 4, "ankh3_large": 2}
REAL_COMPLETE_BATCH = {"ankh_base": 4, "ankh3_large": 2}
REAL_EMBED_PASSES, REAL_COMPLETE_PROMPT, REAL_COMPLETE_NEW, REAL_COMPLETE_RUNS = 1, 32, 16, 2
REAL_CASES = tuple(f"{kind}_{preset}{suffix}" for kind in ("embed", "complete")
                   for preset in REAL_PRESETS for suffix in ("", "_bf16"))
DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ankh3_jax", "benchmarks")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn` (which must block until done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _config(preset: str, device: str):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if device == "gpu" else jnp.float32
  return config_lib.preset(preset, dtype=dtype)


def _random_params(cfg):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  tokens = jnp.ones((1, 8), jnp.int32)
  variables = model_lib.Transformer(cfg).init(jax.random.key(SEED), tokens, tokens, tokens)
  return jax.tree.map(np.array, jax.device_get(nn.unbox(variables["params"])))  # writable


def _hf_model(cfg, params, encoder_only: bool, device: str):
  """The peer: our random weights exported to HF format and loaded by transformers."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ankh3_jax import convert  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  out = tempfile.mkdtemp()
  convert.export_hf(cfg.replace(dtype=np.float32), params, os.path.join(out, "hf"))
  cls = transformers.T5EncoderModel if encoder_only else transformers.T5ForConditionalGeneration
  dtype = torch.bfloat16 if device == "gpu" else torch.float32
  model = cls.from_pretrained(os.path.join(out, "hf"), dtype=dtype)
  return model.to("cuda" if device == "gpu" else "cpu")


def _train_batch(cfg):
  rng = np.random.default_rng(SEED)
  enc = rng.integers(5, 30, (TRAIN_BATCH, TRAIN_INPUT_LEN)).astype(np.int32)
  tgt = rng.integers(5, 30, (TRAIN_BATCH, TRAIN_TARGET_LEN)).astype(np.int32)
  enc[:, -1] = tgt[:, -1] = 1
  dec_in = np.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt}


def our_train_step(cfg, params, batch) -> tuple:
  """(run, flops): `run()` takes one compiled train step (forward + backward + AdamW) and
  returns its loss; `flops` is XLA's count for the step (`_xla_flops`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training import losses, state as state_lib, steps as steps_lib  # pylint: disable=g-import-not-at-top
  tx = optax.adamw(1e-4)
  state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                               params=jax.device_put(params), opt_state=tx.init(params))
  make_step = lambda: steps_lib.make_train_step(
      model_lib.Transformer(cfg), tx, losses.LossConfig(z_loss=0.0), lambda s: 1e-4,
      nan_policy="none")
  step_fn = jax.jit(make_step(), donate_argnums=(0,))
  batch = jax.device_put(batch)
  rng = jax.random.key(SEED)
  compiled = step_fn.lower(state, batch, rng).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return float(jax.block_until_ready(metrics["loss"]))
  return run, _xla_flops(make_step, state, batch, rng)


def _xla_flops(make_step, *args) -> float:
  """XLA's FLOP count of the step traced with XLA's own products: it counts nothing for a
  custom call, so the compiled step's own count leaves out every product the sgemm route
  takes (~93 % of the `small` step's work)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
  with cpu_kernels.xla_products():
    cost = jax.jit(make_step()).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def train(preset: str, impl: str, device: str, steps: int = TRAIN_STEPS,
          mixed_bf16: bool = False) -> dict:
  """Tokens (inputs + targets) per second of forward + backward + AdamW update.

  `mixed_bf16`: bfloat16 activations and matmuls, float32 parameters, norms, softmax and
  loss (ours: `dtype=bfloat16`; the peer: `torch.autocast("cpu", dtype=torch.bfloat16)`).
  """
  cfg = _config(preset, device)
  if mixed_bf16:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    cfg = cfg.replace(dtype=jnp.bfloat16)
  params = _random_params(cfg)
  batch = _train_batch(cfg)
  tokens = TRAIN_BATCH * (TRAIN_INPUT_LEN + TRAIN_TARGET_LEN)
  result = {}
  if impl == "ours":
    run, result["flops_per_step"] = our_train_step(cfg, params, batch)
    result["first_loss"] = run()
  else:
    import torch  # pylint: disable=g-import-not-at-top
    model = _hf_model(cfg, params, encoder_only=False, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    dev = next(model.parameters()).device
    enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long, device=dev)
    labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long, device=dev)

    def run():
      opt.zero_grad(set_to_none=True)
      with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mixed_bf16):
        loss = model(input_ids=enc, attention_mask=enc > 0, labels=labels).loss
      loss.backward()
      opt.step()
      if dev.type == "cuda":
        torch.cuda.synchronize()
      return float(loss)
    result["first_loss"] = run()
  seconds = _timed(run, steps)
  result.update(value=tokens / seconds, unit="tokens/s", seconds_per_step=seconds)
  if "flops_per_step" in result:
    result["flops_per_s"] = result["flops_per_step"] / seconds
  return result


def _corpus_sequences() -> list:
  from ankh3_jax.data import corpus  # pylint: disable=g-import-not-at-top
  seqs, current = [], []
  with gzip.open(corpus.corpus_path("validation"), "rt") as f:
    for line in f:
      if line.startswith(">"):
        if current:
          seqs.append("".join(current))
        current = []
      else:
        current.append(line.strip())
  if current:
    seqs.append("".join(current))
  chosen = [s for s in seqs if EMBED_MIN <= len(s) <= EMBED_MAX][:EMBED_COUNT]
  if len(chosen) < EMBED_COUNT:
    raise RuntimeError(f"only {len(chosen)} validation sequences of {EMBED_MIN}-{EMBED_MAX}")
  return chosen


def _peer_embed(model, seqs: list) -> list:
  """The peer's per-residue embeddings: batches of PEER_EMBED_BATCH in file order, each
  padded to its longest sequence, as users of `T5EncoderModel` write it."""
  import torch  # pylint: disable=g-import-not-at-top
  from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
  dev = next(model.parameters()).device
  token_lists = [vocab.encode(s) for s in seqs]
  outputs = []
  with torch.inference_mode():
    for i in range(0, len(token_lists), PEER_EMBED_BATCH):
      rows = token_lists[i:i + PEER_EMBED_BATCH]
      ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
      for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
      ids = ids.to(dev)
      out = model(input_ids=ids, attention_mask=ids > 0).last_hidden_state
      outputs += [out[r, 1:len(row) - 1].float().cpu().numpy() for r, row in enumerate(rows)]
  return outputs


def embed(impl: str, device: str) -> dict:
  """Residues per second of per-residue embedding extraction (steady state)."""
  cfg = _config("small", device)
  params = _random_params(cfg)
  seqs = _corpus_sequences()
  residues = sum(len(s) for s in seqs)
  if impl == "ours":
    from ankh3_jax import embed as embed_lib  # pylint: disable=g-import-not-at-top
    embedder = embed_lib.Embedder((cfg, params), dtype="bfloat16" if device == "gpu" else "float32")
    run = lambda: embed_lib.embed_sequences(embedder, seqs)
    start = time.perf_counter()
    run()  # first pass compiles one program per bucket
    first = time.perf_counter() - start
  else:
    model = _hf_model(cfg, params, encoder_only=True, device=device).eval()
    run = functools.partial(_peer_embed, model, seqs)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
  seconds = _timed(run, EMBED_PASSES)
  # Ours uses every local device (batches sharded over `data`); the peer uses one.
  devices = embedder.layout.mesh.size if impl == "ours" else 1
  return {"value": residues / seconds, "unit": "residues/s", "first_pass_s": first,
          "devices": devices, "per_device": residues / seconds / devices}


def complete(batch: int, impl: str, device: str) -> dict:
  """Generated tokens per second, greedy, exactly COMPLETE_NEW new tokens per row."""
  cfg = _config("small", device)
  params = _random_params(cfg)
  # A zero eos column gives eos logit 0, below the maximum of the other 255 random logits
  # (all negative with probability 2**-255): greedy decoding then never stops early, so
  # both implementations generate exactly COMPLETE_NEW tokens.
  params["decoder"]["logits_dense"]["kernel"][:, 1] = 0.0
  seqs = [s[:COMPLETE_PROMPT] for s in _corpus_sequences()[:batch]]
  new_tokens = batch * COMPLETE_NEW
  if impl == "ours":
    from ankh3_jax import complete as complete_lib  # pylint: disable=g-import-not-at-top
    kwargs = dict(max_new_tokens=COMPLETE_NEW, batch_size=batch,
                  dtype="bfloat16" if device == "gpu" else "float32")
    run = lambda: complete_lib.complete((cfg, params), seqs, **kwargs)
    out = run()
    assert all(len(c.token_ids) == COMPLETE_NEW for c in out), [len(c.token_ids) for c in out]
  else:
    import torch  # pylint: disable=g-import-not-at-top
    from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
    model = _hf_model(cfg, params, encoder_only=False, device=device).eval()
    dev = next(model.parameters()).device
    rows = [vocab.encode(s, prefix=vocab.S2S_TOKEN) for s in seqs]
    ids = torch.zeros((batch, max(map(len, rows))), dtype=torch.long)
    for r, row in enumerate(rows):
      ids[r, :len(row)] = torch.tensor(row)
    ids = ids.to(dev)

    def run():
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=ids > 0, do_sample=False,
                             num_beams=1, max_new_tokens=COMPLETE_NEW)
      assert out.shape[1] == COMPLETE_NEW + 1, out.shape  # + the decoder start token
    run()
  seconds = _timed(run, COMPLETE_RUNS)
  return {"value": new_tokens / seconds, "unit": "tokens/s"}


def parse_real_case(case: str) -> tuple:
  """'complete_ankh3_large_bf16' -> ('complete', 'ankh3_large', 'bfloat16')."""
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  kind, _, rest = case.partition("_")
  bf16 = rest.endswith("_bf16")
  preset = rest[:-len("_bf16")] if bf16 else rest
  if kind not in ("embed", "complete") or preset not in config_lib.PRESETS:
    raise ValueError(f"unknown real-size case {case!r}; choose from {REAL_CASES} "
                     f"(or any preset of {sorted(config_lib.PRESETS)})")
  return kind, preset, "bfloat16" if bf16 else "float32"


def is_real_case(case: str) -> bool:
  try:
    parse_real_case(case)
  except ValueError:
    return False
  return True


def available_memory_bytes() -> int:
  """The kernel's MemAvailable (what a new process can take without swapping or OOM)."""
  from benchmarks import real_models  # pylint: disable=g-import-not-at-top
  return real_models.available_memory()


def real_memory_need(case: str, impl: str) -> int:
  """Bytes a real-size process needs at least: its float32 weights times a factor from
  the measured peaks (ours in bfloat16 weights also holds the float32 host copy it read
  and float32 conversions inside the compiled program), plus 0.5 GiB."""
  from benchmarks import real_models  # pylint: disable=g-import-not-at-top
  kind, preset, param_dtype = parse_real_case(case)
  f32 = real_models.params_bytes(real_models.config(preset), encoder_only=kind == "embed")
  factor = {("ours", "float32"): 1.0, ("ours", "bfloat16"): 2.0,
            ("peer", "float32"): 1.0, ("peer", "bfloat16"): 1.0}[(impl, param_dtype)]
  return int(factor * f32) + 2 ** 29


def check_fits(case: str, impl: str) -> None:
  """A MemoryError saying what the case needs, instead of an OOM kill mid-run."""
  need, available = real_memory_need(case, impl), available_memory_bytes()
  if need > available:
    raise MemoryError(f"{case} {impl}: needs about {need / 2**30:.1f} GiB, only "
                      f"{available / 2**30:.1f} GiB available (MemAvailable); not run")


def _save_first_output(work_dir: str, case: str, impl: str, array) -> str:
  """Writes the first sequence's output for `benchmarks.run`'s agreement check."""
  out_dir = os.path.join(work_dir, "outputs")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{case}-{impl}.npy")
  with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".npy", delete=False) as f:
    np.save(f, np.asarray(array))
  os.replace(f.name, path)
  return path


def real_size(case: str, impl: str, work_dir: str, count: Optional[int] = None,
              batch: Optional[int] = None) -> dict:
  """Residues/s (embedding) or new tokens/s (greedy completion) of a released shape,
  from the cached random model (`real_models`); `impl` 'prepare' writes that model.
  `count` sequences to embed, `batch` prompts to complete: default per preset."""
  from benchmarks import real_models  # pylint: disable=g-import-not-at-top
  kind, preset, param_dtype = parse_real_case(case)
  count = count or REAL_EMBED_COUNT.get(preset, 1)
  batch = batch or REAL_COMPLETE_BATCH.get(preset, 1)
  if impl == "prepare":
    start = time.perf_counter()
    real_models.prepare(preset, work_dir, real_models.parts_for(kind),
                        log=lambda m: print(m, file=sys.stderr))
    return {"value": time.perf_counter() - start, "unit": "s"}
  paths = real_models.cached(preset, work_dir, real_models.parts_for(kind))
  if paths is None:
    raise RuntimeError(f"no complete {preset} model in {work_dir}: run "
                       f"`python -m benchmarks.cases {case} prepare` first")
  check_fits(case, impl)
  seqs = _corpus_sequences()
  start = time.perf_counter()
  if impl == "ours":
    import jax  # pylint: disable=g-import-not-at-top
    if kind == "embed":
      from ankh3_jax import embed as embed_lib  # pylint: disable=g-import-not-at-top
      seqs = seqs[:count]
      model = embed_lib.Embedder(paths["ours_encoder"], param_dtype=param_dtype)
      run = lambda: [e.per_residue for e in embed_lib.embed_sequences(model, seqs)]
    else:
      import dataclasses  # pylint: disable=g-import-not-at-top
      from ankh3_jax import complete as complete_lib, inference  # pylint: disable=g-import-not-at-top
      seqs = [s[:REAL_COMPLETE_PROMPT] for s in seqs[:batch]]
      # As `complete` does with a directory (what `ankh3-complete` runs): compiled first,
      # then the weights read and placed once for every timed run.
      complete_lib.precompile(paths["ours"], seqs, max_new_tokens=REAL_COMPLETE_NEW,
                              batch_size=batch, param_dtype=param_dtype)
      loaded = inference.resolve_model(paths["ours"], "float32", param_dtype)
      loaded = dataclasses.replace(loaded, params=jax.device_put(loaded.params))  # once
      run = lambda: [np.array(c.token_ids) for c in complete_lib.complete(
          loaded, seqs, max_new_tokens=REAL_COMPLETE_NEW, batch_size=batch,
          param_dtype=param_dtype)]
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    torch_dtype = torch.bfloat16 if param_dtype == "bfloat16" else torch.float32
    if kind == "embed":
      seqs = seqs[:count]
      model = transformers.T5EncoderModel.from_pretrained(paths["hf"], dtype=torch_dtype)
      run = functools.partial(_peer_embed, model.eval(), seqs)
    else:
      seqs = [s[:REAL_COMPLETE_PROMPT] for s in seqs[:batch]]
      model = transformers.T5ForConditionalGeneration.from_pretrained(
          paths["hf"], dtype=torch_dtype).eval()
      run = functools.partial(_peer_complete, model, seqs, REAL_COMPLETE_NEW)
  load = time.perf_counter() - start
  start = time.perf_counter()
  outputs = run()  # ours compiles here (but completion: at load)
  first = time.perf_counter() - start
  if kind == "complete":
    assert all(len(o) == REAL_COMPLETE_NEW for o in outputs), [len(o) for o in outputs]
  seconds = _timed(run, REAL_EMBED_PASSES if kind == "embed" else REAL_COMPLETE_RUNS)
  amount = (sum(len(s) for s in seqs) if kind == "embed" else batch * REAL_COMPLETE_NEW)
  # The workflow's peak (load, compile, runs): the agreement check below is the
  # benchmark's own work (a second program for ours), reported apart.
  checks = {"peak_rss_mb": _peak_rss_mb()}
  if kind == "complete":  # the decoder's probabilities, not only its argmax
    log_probs = (complete_lib.token_log_probs(loaded, seqs[:1], outputs[:1])[0]
                 if impl == "ours" else _peer_token_log_probs(model, seqs[0], outputs[0]))
    checks["first_log_probs"] = _save_first_output(work_dir, f"{case}-log_probs", impl,
                                                   log_probs)
    checks["peak_with_check_mb"] = _peak_rss_mb()
  return {"value": amount / seconds, "unit": "residues/s" if kind == "embed" else "tokens/s",
          "seconds": seconds, "load_s": load, "first_pass_s": first,
          "param_dtype": param_dtype, "compute_dtype": "float32" if impl == "ours" else
          param_dtype, "sequences": len(seqs), "preset": preset,
          "first_output": _save_first_output(work_dir, case, impl, outputs[0]), **checks}


def _peer_complete(model, seqs: list, new_tokens: int) -> list:
  """The peer's greedy completions (`generate`, one padded batch): new tokens per row."""
  import torch  # pylint: disable=g-import-not-at-top
  from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
  rows = [vocab.encode(s, prefix=vocab.S2S_TOKEN) for s in seqs]
  ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = torch.tensor(row)
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=ids > 0, do_sample=False,
                         num_beams=1, max_new_tokens=new_tokens)
  return [row[1:].numpy() for row in out]  # after the decoder start token


def _peer_token_log_probs(model, seq: str, tokens) -> np.ndarray:
  """The peer's teacher-forced log-probability of each of `tokens` after `seq`."""
  import torch  # pylint: disable=g-import-not-at-top
  from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
  ids = torch.tensor([vocab.encode(seq, prefix=vocab.S2S_TOKEN)])
  targets = torch.tensor([list(tokens)], dtype=torch.long)
  decoder_inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
  with torch.inference_mode():
    logits = model(input_ids=ids, decoder_input_ids=decoder_inputs).logits.float()
  picked = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[0, :, 0]
  return picked.numpy()


def matmul_peak(device: str) -> dict:
  """FLOP/s of a jitted large matmul: float32 on CPU, bfloat16 on GPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 8192 if device == "gpu" else 2048
  dtype = jnp.bfloat16 if device == "gpu" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  seconds = _timed(lambda: f(a, b).block_until_ready(), 5)
  return {"value": 2 * n ** 3 / seconds, "unit": "FLOP/s", "n": n, "dtype": jnp.dtype(dtype).name}


def data() -> dict:
  """Tokens per second of the packed ankh3_pretrain pipeline (512/512, batch 32)."""
  from benchmarks import data_pipeline  # pylint: disable=g-import-not-at-top
  stats = data_pipeline.measure("ankh3_pretrain", {"inputs": 512, "targets": 512},
                                batch_size=32, batches=40, warmup=5, packer="first_fit",
                                seed=SEED)
  return {"value": stats["tokens/s"], "unit": "tokens/s",
          "packing_efficiency": stats["total fill"], "inputs_fill": stats["inputs fill"],
          "targets_fill": stats["targets fill"]}


def train_bf16(preset: str, impl: str, device: str) -> dict:
  """`train` in bfloat16 mixed precision (case train_<preset>_bf16)."""
  return dict(train(preset, impl, device, mixed_bf16=True), precision="bfloat16 mixed")


def matmul_bf16(impl: str) -> dict:
  """GFLOP/s of a 2048^3 matmul in bfloat16 (the value) and float32, jitted JAX or torch.

  Where the CPU has no bfloat16 instructions (no AVX512-BF16 or AMX) both libraries
  convert to float32 inside the kernel; with AMX, torch's oneDNN uses the tiles.
  """
  n, flops, out = MATMUL_N, 2 * MATMUL_N ** 3, {}
  if impl == "ours":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    for dtype in (jnp.float32, jnp.bfloat16):
      a = jax.random.normal(jax.random.key(0), (n, n), dtype)
      b = jax.random.normal(jax.random.key(1), (n, n), dtype)
      f = jax.jit(jnp.matmul)
      f(a, b).block_until_ready()
      out[jnp.dtype(dtype).name] = flops / _timed(lambda: f(a, b).block_until_ready(), 5)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    for dtype in (torch.float32, torch.bfloat16):
      a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
      torch.matmul(a, b)
      out[str(dtype).split(".")[-1]] = flops / _timed(lambda: torch.matmul(a, b), 5)
  return {"value": out["bfloat16"] / 1e9, "unit": "GFLOP/s bf16", "n": n,
          "float32_gflops": out["float32"] / 1e9}


def run_case(case: str, impl: str, device: str, work_dir: str = DEFAULT_WORK_DIR) -> dict:
  if is_real_case(case):
    if device != "cpu":
      raise ValueError(f"{case}: the real-size cases run on CPU only")
    return real_size(case, impl, work_dir)
  if impl == "prepare":
    raise ValueError(f"{case}: only the real-size cases {REAL_CASES} have 'prepare'")
  if case.startswith("train_") and case.endswith("_bf16"):
    return train_bf16(case[len("train_"):-len("_bf16")], impl, device)
  if case == "matmul_bf16":
    return matmul_bf16(impl)
  if case.startswith("train_"):
    return train(case.split("_", 1)[1], impl, device)
  if case == "embed":
    return embed(impl, device)
  if case.startswith("complete_b"):
    return complete(int(case[len("complete_b"):]), impl, device)
  if case == "matmul_peak":
    return matmul_peak(device)
  if case == "data":
    return data()
  raise ValueError(f"unknown case {case!r}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("case")
  parser.add_argument("impl", choices=["ours", "peer", "prepare"])
  parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--tuning", choices=["none", "retain", "eigen", "cpu"], default="none")
  parser.add_argument("--work_dir", default=DEFAULT_WORK_DIR,
                      help="the real sizes' cached models and first outputs")
  args = parser.parse_args(argv)
  from ankh3_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  ours_train = args.impl == "ours" and args.case.startswith("train")
  if ours_train:
    cpu_tuning.reexec_with_huge_pages()  # what `ankh3-train` does (--huge_pages)
  if args.tuning in ("retain", "cpu"):
    cpu_tuning.retain_freed_memory()  # first, before any thread starts
  if args.tuning in ("eigen", "cpu"):
    cpu_tuning.prefer_eigen_dots()
  elif ours_train:
    cpu_tuning.apply_train_dots_for_this_cpu()  # what `ankh3-train` does (--cpu_dots auto)
  load_before = os.getloadavg()[0]
  result = run_case(args.case, args.impl, args.device, args.work_dir)
  result.setdefault("peak_rss_mb", _peak_rss_mb())
  result.update(case=args.case, impl=args.impl, device=args.device, tuning=args.tuning,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                load_avg=[load_before, os.getloadavg()[0]])
  if args.impl == "ours":
    from ankh3_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
    result.update(blas_products=cpu_kernels.blas_available())  # float32 products' route
    if is_real_case(args.case):
      result.update(native_cpu_kernels=cpu_kernels.available())  # bfloat16 decode steps
  sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
