#!/usr/bin/env bash
# Pre-trains Ankh3 on a Cloud TPU VM pod slice: create the slice, install this repository
# on every worker, run `ankh3-train --multihost` on all workers at once.
#
#   launch/tpu_pod.sh --name ankh3-large --zone us-central2-b --accelerator v4-256 \
#       --model ankh3_large --model_dir gs://my-bucket/ankh3_large \
#       --data 'gs://my-bucket/uniref50/train*.fasta.gz' \
#       --validation_data gs://my-bucket/uniref50/valid.fasta.gz [--dry_run]
#
# Data: --data takes FASTA files (a path or glob ending in .fasta/.fa/.faa, optionally
# .gz; gs:// works; then --validation_data is required) or a TFDS data dir holding the
# prepared ankh3_uniref50. Without --data the shipped 8,000-sequence demo corpus is used,
# which ankh_base, ankh3_large and ankh3_xl refuse unless --allow_demo_corpus is given.
# Steps (default: all): create (skipped if the slice exists), setup (copy + pip install
# on all workers), train (all workers; with --detach it keeps running after ssh ends).
# Other steps: status, logs, delete.
#
# Resume: run the same command again. Training restarts from the latest checkpoint in
# MODEL_DIR (use gs:// so it outlives the VMs: setup installs gcsfuse and train mounts
# gs://BUCKET at /mnt/gcs/BUCKET on every worker, where ankh3-train writes, since it
# refuses URLs); a pre-empted slice (SIGTERM) saves one before exiting. For spot slices that were reclaimed, `all` re-creates the slice first.
# --dry_run prints the gcloud commands instead of running them.
# Anything after `--` is passed on to ankh3-train (e.g. --gin.BATCH_SIZE=2048).
set -euo pipefail

NAME="" ZONE="" PROJECT="" ACCELERATOR="v4-256" VERSION="tpu-ubuntu2204-base"
MODEL="ankh3_large" OBJECTIVE="ankh3" RUN="pretrain" MODEL_DIR=""
JAX_VERSION="0.10.2" SPOT=0 DRY_RUN=0 DETACH=0 STEP="all" EXTRA=()
DATA="" VALIDATION_DATA="" ALLOW_DEMO=0
LARGE_MODELS=" ankh_base ankh3_large ankh3_xl "
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --objective) OBJECTIVE="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --model_dir) MODEL_DIR="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --validation_data) VALIDATION_DATA="$2"; shift 2 ;;
    --allow_demo_corpus) ALLOW_DEMO=1; shift ;;
    --jax_version) JAX_VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    --step) STEP="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

[[ -n "$NAME" && -n "$ZONE" ]] || { echo "tpu_pod.sh: --name and --zone are required" >&2; exit 2; }
case "$STEP" in all|create|setup|train|status|logs|delete) ;; *)
  echo "tpu_pod.sh: unknown --step $STEP" >&2; exit 2 ;; esac
if [[ "$STEP" == all || "$STEP" == train ]]; then
  [[ -n "$MODEL_DIR" ]] || { echo "tpu_pod.sh: --model_dir is required to train" >&2; exit 2; }
  if [[ -z "$DATA" && "$ALLOW_DEMO" == 0 && "$LARGE_MODELS" == *" $MODEL "* ]]; then
    echo "tpu_pod.sh: refusing to pre-train $MODEL on the shipped demo corpus (8,000" \
         "sequences). Pass your data: --data 'gs://bucket/train*.fasta.gz'" \
         "--validation_data gs://bucket/valid.fasta (FASTA) or --data gs://bucket/tfds" \
         "(TFDS data dir), or --allow_demo_corpus to use the demo corpus anyway" >&2
    exit 2
  fi
fi
is_fasta() { [[ "$1" =~ \.(fasta|fa|faa)(\.gz)?$ ]]; }
if [[ -n "$DATA" ]] && is_fasta "$DATA" && [[ -z "$VALIDATION_DATA" ]]; then
  echo "tpu_pod.sh: --data $DATA is FASTA: --validation_data (FASTA) is required too" >&2
  exit 2
fi
if [[ -n "$VALIDATION_DATA" ]] && ! { [[ -n "$DATA" ]] && is_fasta "$DATA"; }; then
  echo "tpu_pod.sh: --validation_data goes with FASTA --data only" >&2; exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")
REMOTE_DIR="ankh3_jax"
TARBALL="/tmp/ankh3_jax_src.tgz"

sq() {  # single-quotes one word for a shell, if it needs quoting
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # prints the command in dry-run mode, else runs it
  if [[ "$DRY_RUN" == 1 ]]; then
    local a line=""
    for a in "$@"; do line+="$(sq "$a") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

quote_all() { local out="" a; for a in "$@"; do out+=" $(sq "$a")"; done; echo "$out"; }

step_create() {
  if [[ "$DRY_RUN" == 0 ]] && "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: slice $NAME exists; not creating it"
    return
  fi
  local flags=(--accelerator-type "$ACCELERATOR" --version "$VERSION")
  [[ "$SPOT" == 1 ]] && flags+=(--spot)
  run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" "${flags[@]}"
}

step_setup() {
  run tar -C "$REPO_DIR" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude='*.egg-info' \
      -czf "$TARBALL" .
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:ankh3_jax_src.tgz" "${COMMON[@]}" --worker=all
  local install="mkdir -p $REMOTE_DIR && tar -xzf ~/ankh3_jax_src.tgz -C $REMOTE_DIR"
  install+=" && python3 -m pip install -q 'jax[tpu]==$JAX_VERSION'"
  install+=" && python3 -m pip install -q -e ./$REMOTE_DIR"
  [[ -n "$(gcs_bucket)" ]] && install+=" && $GCSFUSE_INSTALL"
  run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$install"
}

gcs_bucket() {  # the bucket of a gs:// MODEL_DIR, else nothing
  if [[ "$MODEL_DIR" =~ ^gs://([^/]+) ]]; then echo "${BASH_REMATCH[1]}"; fi
}

worker_model_dir() {  # MODEL_DIR as the workers see it: gs://B/P -> /mnt/gcs/B/P
  local bucket; bucket="$(gcs_bucket)"
  if [[ -n "$bucket" ]]; then echo "/mnt/gcs/${MODEL_DIR#gs://}"; else echo "$MODEL_DIR"; fi
}

# gcsfuse from Google's apt repository; directory renames (orbax finalises a checkpoint
# by renaming its temporary directory) need --rename-dir-limit.
GCSFUSE_INSTALL="{ command -v gcsfuse >/dev/null || { echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg && sudo sed -i 's|^deb |deb [signed-by=/usr/share/keyrings/cloud.google.gpg] |' /etc/apt/sources.list.d/gcsfuse.list && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; }"

mount_command() {  # mounts the bucket on a worker unless it is mounted
  local bucket; bucket="$(gcs_bucket)"
  echo "{ mountpoint -q /mnt/gcs/$bucket || { sudo mkdir -p /mnt/gcs/$bucket" \
       "&& sudo chown \$(id -u):\$(id -g) /mnt/gcs/$bucket" \
       "&& gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket /mnt/gcs/$bucket; }; }"
}

train_command() {
  local cmd="cd $REMOTE_DIR && ~/.local/bin/ankh3-train --multihost"
  [[ -n "$(gcs_bucket)" ]] && cmd="$(mount_command) && $cmd"
  cmd+=" --gin_file=models/$MODEL.gin --gin_file=objectives/$OBJECTIVE.gin"
  cmd+=" --gin_file=runs/$RUN.gin --gin.MODEL_DIR=$(sq "$(worker_model_dir)")"
  if [[ -n "$DATA" ]] && is_fasta "$DATA"; then
    cmd+=" $(sq "--gin.TRAIN_FASTA=\"$DATA\"") $(sq "--gin.VALIDATION_FASTA=\"$VALIDATION_DATA\"")"
  elif [[ -n "$DATA" ]]; then
    cmd+=" $(sq "--gin.TFDS_DATA_DIR=\"$DATA\"")"
  fi
  [[ "$ALLOW_DEMO" == 1 ]] && cmd+=" --gin.ALLOW_DEMO_CORPUS=True"
  [[ ${#EXTRA[@]} -gt 0 ]] && cmd+="$(quote_all "${EXTRA[@]}")"
  if [[ "$DETACH" == 1 ]]; then
    cmd="nohup bash -c $(sq "$cmd") > ~/ankh3_train.log 2>&1 &"
  fi
  echo "$cmd"
}

step_train() {
  run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$(train_command)"
}

case "$STEP" in
  all) step_create; step_setup; step_train ;;
  create) step_create ;;
  setup) step_setup ;;
  train) step_train ;;
  status) run "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" ;;
  logs) run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 --command "tail -n 50 ~/ankh3_train.log" ;;
  delete) run "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet ;;
esac
