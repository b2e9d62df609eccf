#!/usr/bin/env bash
# The pre-training runs of docs/pretraining.md, all at once on one GPU (about 8 minutes).
#   bash scripts/reference_runs_gpu.sh OUT_DIR [SWISSPROT_DIR]
# Runs, in parallel processes on the one device (each a scripts/pretrain_accelerator.py run):
#   ref_*    the CPU reference configuration (1.48M parameters, lengths 128/80, batch 32,
#            float32) on the shipped corpus, for the steps a 2-hour run on 2 CPU cores takes:
#            the four objectives of the ablation, 2 seeds for ankh3 and mlm15_only, and
#            mlm15_only with the encoder-side MLM loss;
#   small_*  the `small` preset in bfloat16 (lengths 256/160, batch 256) on the Swiss-Prot
#            corpus of scripts/make_swissprot_corpus.py, when SWISSPROT_DIR is given;
#   cpu2     the reference configuration on 2 CPU cores of the same machine (throughput).
set -uo pipefail
out=${1:?OUT_DIR}; swissprot=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
corpus=$here/ankh3_jax/assets/corpus
budget=${BUDGET_S:-400}
ref_steps=${REF_STEPS:-15000}
small_steps=${SMALL_STEPS:-1000000}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.08} PYTHONUNBUFFERED=1
REF_CONFIG='{"d_model": 128, "d_ff": 384, "num_heads": 4, "d_kv": 32, "num_encoder_layers": 4, "num_decoder_layers": 2}'
run() {  # name, then pretrain_accelerator flags
  local name=$1; shift
  python3 "$here/scripts/pretrain_accelerator.py" --out_dir "$out/$name" "$@" \
      >"$out/$name.log" 2>&1 &
}
ref() {  # name objective seed [flags]
  local name=$1 objective=$2 seed=$3; shift 3
  run "$name" --train_fasta "$corpus/train.fasta.gz" --validation_fasta \
      "$corpus/validation.fasta.gz" --objective "$objective" --seed "$seed" --preset tiny \
      --config_overrides "$REF_CONFIG" --dtype float32 --inputs_length 128 \
      --targets_length 80 --batch_size 32 --peak_learning_rate 3e-3 --warmup_steps 300 \
      --max_steps "$ref_steps" --eval_every 1000 --eval_sequences 500 \
      --time_budget_s "$budget" --save_dtype float16 "$@"
}
ref ref_ankh3_s0 ankh3 0
ref ref_ankh3_s1 ankh3 1
ref ref_mlm15_s0 mlm15_only 0
ref ref_mlm15_s1 mlm15_only 1
ref ref_mlm_multi_s0 mlm_multi 0
ref ref_completion_s0 completion_only 0
ref ref_mlm15_encoder_s0 mlm15_only 0 --encoder_mlm_weight 1.0
if [ -n "$swissprot" ]; then
  for objective in ankh3 mlm15_only; do
    run "small_$objective" --train_fasta "$swissprot/train.fasta.gz" \
        --validation_fasta "$swissprot/validation.fasta.gz" --objective "$objective" \
        --preset small --dtype bfloat16 --inputs_length 256 --targets_length 160 \
        --batch_size 256 --peak_learning_rate 2e-3 --warmup_steps 1000 \
        --max_steps "$small_steps" --eval_every 1000 --eval_sequences 2000 \
        --time_budget_s "$budget" --save_dtype float16
  done
fi
if command -v taskset >/dev/null; then
  JAX_PLATFORMS=cpu taskset -c 0,1 python3 "$here/scripts/pretrain_accelerator.py" \
      --out_dir "$out/cpu2" --train_fasta "$corpus/train.fasta.gz" --validation_fasta \
      "$corpus/validation.fasta.gz" --objective ankh3 --preset tiny --config_overrides \
      "$REF_CONFIG" --dtype float32 --inputs_length 128 --targets_length 80 \
      --batch_size 32 --max_steps "${CPU_STEPS:-300}" --eval_every 100 --eval_sequences 32 \
      >"$out/cpu2.log" 2>&1 &
fi
wait
tail -n 2 "$out"/*.log
