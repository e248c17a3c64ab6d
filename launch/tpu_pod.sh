#!/usr/bin/env bash
# Run one entrypoint on every worker of a Cloud TPU VM slice (single- or multi-host) with gcloud.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--remote_dir DIR] [--venv PATH]
#                     [--env KEY=VALUE]... [--copy] [--setup] [--dry_run] -- ENTRYPOINT [FLAGS...]
#
#   --tpu, --zone, --project  the TPU VM (gcloud compute tpus tpu-vm ssh NAME --zone ZONE --project PROJECT)
#   --remote_dir              checkout of this repository on every worker (default: nanbeige-jax, under $HOME)
#   --venv                    virtualenv on the workers, created by --setup (default: .venv in remote_dir)
#   --env KEY=VALUE           exported on every worker before the entrypoint runs (repeatable)
#   --copy                    first copy this checkout's HEAD (git archive) to every worker (tpu-vm scp)
#   --setup                   first create the venv and pip-install the package with the tpu extra on every worker
#   --dry_run                 print the gcloud commands instead of running them
#
# The entrypoint runs once per worker (host), with the same flags; jax.distributed is initialised inside it by
# nanbeige_jax.distributed.initialize(), which auto-detects the slice's workers from the TPU metadata server, so
# no coordinator flags are needed. Example:
#   launch/tpu_pod.sh --tpu my-v5e-32 --zone us-west4-a --project my-proj --copy --setup -- \
#       launch/pretrain.py --gin_file=configs/pretrain/<your_config>.gin
set -euo pipefail

TPU=""; ZONE=""; PROJECT=""; REMOTE_DIR="nanbeige-jax"; VENV=""; COPY=0; SETUP=0; DRY_RUN=0
ENVS=()

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) [[ $# -ge 2 ]] || die "--tpu needs a value"; TPU="$2"; shift 2 ;;
    --zone) [[ $# -ge 2 ]] || die "--zone needs a value"; ZONE="$2"; shift 2 ;;
    --project) [[ $# -ge 2 ]] || die "--project needs a value"; PROJECT="$2"; shift 2 ;;
    --remote_dir) [[ $# -ge 2 ]] || die "--remote_dir needs a value"; REMOTE_DIR="$2"; shift 2 ;;
    --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; VENV="$2"; shift 2 ;;
    --env) [[ $# -ge 2 ]] || die "--env needs KEY=VALUE"
           [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env expects KEY=VALUE, found '$2'"
           ENVS+=("$2"); shift 2 ;;
    --copy) COPY=1; shift ;;
    --setup) SETUP=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (put the entrypoint and its flags after --)" ;;
  esac
done

[[ -n "$TPU" ]] || die "--tpu NAME is required"
[[ -n "$ZONE" ]] || die "--zone ZONE is required"
[[ $# -ge 1 ]] || die "no entrypoint given (after --)"
VENV="${VENV:-.venv}"  # relative to remote_dir (every remote command cds there first)

GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && TARGET+=(--project="$PROJECT")

quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

if [[ "$COPY" == 1 ]]; then
  # Ship the committed tree (git archive: no venv, no build outputs), unpack it on every worker.
  REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/nanbeige-jax-src.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:nanbeige-jax-src.tar.gz" "${TARGET[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --worker=all \
    --command="mkdir -p $(quote "$REMOTE_DIR") && tar -xzf nanbeige-jax-src.tar.gz -C $(quote "$REMOTE_DIR")"
fi

if [[ "$SETUP" == 1 ]]; then
  SETUP_CMD="cd $(quote "$REMOTE_DIR") && python3 -m venv $(quote "$VENV") && . $(quote "$VENV/bin/activate")"
  SETUP_CMD+=" && pip install -U pip && pip install -e '.[tpu]'"
  run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --worker=all --command="$SETUP_CMD"
fi

REMOTE="cd $(quote "$REMOTE_DIR") && . $(quote "$VENV/bin/activate")"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  REMOTE+=" && export $(quote "$kv")"
done
REMOTE+=" && python $(quote "$@")"
run "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --worker=all --command="$REMOTE"
