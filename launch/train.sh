#!/usr/bin/env bash
# Start (or stop) training on every TPU worker, in the background, logging to a file.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BUCKET="${BUCKET:-}"
CONFIG="${CONFIG:-}"
RUN_NAME="${RUN_NAME:-}"
TRAIN_ENV="${TRAIN_ENV:-}"
STOP=0

usage() {
  cat << EOF
Usage: launch/train.sh [--dry-run] [--help] [-- --config.key=value ...]
       launch/train.sh --stop [--dry-run]

On all workers of \$TPU_NAME (gcloud compute tpus tpu-vm ssh --worker=all), run
  cd \$REMOTE_DIR && nohup \$REMOTE_VENV/bin/python -m dydit_jax.main \\
      --config=\$CONFIG --workdir=\$BUCKET/\$RUN_NAME --config.distributed=True [overrides] \\
      > \$REMOTE_LOG_DIR/\$RUN_NAME.log 2>&1 &
and point \$REMOTE_LOG_DIR/latest.log at that log (see launch/logs.sh). Arguments after
'--' are passed through to dydit_jax.main as config overrides. A worker that is already
running dydit_jax.main refuses to start a second one (the TPU can only be held by one
process); stop it first with --stop.

Options:
  -n, --dry-run   print the gcloud commands instead of running them
  --stop          kill dydit_jax.main on all workers instead of starting it
  -h, --help      show this help

${COMMON_ENV_HELP}

train.sh also reads:
  BUCKET              gs:// root for run directories, e.g. gs://my-bucket/dydit [required]
  CONFIG              config file, relative to the repo root, e.g. configs/<name>.py [required]
  RUN_NAME            run directory name under BUCKET, also the log name
                      [<config name>-<UTC date>-<time>]
  TRAIN_ENV           extra environment for the trainer, whitespace-separated KEY=VALUE
                      pairs, e.g. "TF_CPP_MIN_LOG_LEVEL=2 JAX_TRACEBACK_FILTERING=off" []

Example:
  PROJECT=my-proj BUCKET=gs://my-bucket/dydit CONFIG=configs/<name>.py RUN_NAME=try1 \\
    launch/train.sh -- --config.batch_size=256
EOF
}

OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stop) STOP=1 ;;
    --)
      shift
      OVERRIDES=("$@")
      break
      ;;
    *) handle_common_opt "$1" ;;
  esac
  shift
done

check_common

# Matches the trainer's python process (its argv starts with .../python -m dydit_jax.main)
# but not the remote shell that runs this very command line.
pattern='"^[^ ]*python[^ ]* -m dydit_jax[.]main"'

if [[ "${STOP}" == 1 ]]; then
  info "stopping dydit_jax.main on all workers of ${TPU_NAME}"
  tpu_ssh all "if pkill -f ${pattern}; then echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not running\"; fi"
  exit 0
fi

require_var BUCKET "Set it with: export BUCKET=gs://<bucket>/<dir>   (run directories go under it)"
[[ "${BUCKET}" == gs://?* ]] || die "BUCKET must be a gs:// URL (got '${BUCKET}'). Set it with: export BUCKET=gs://<bucket>/<dir>"
while [[ "${BUCKET}" == */ && "${BUCKET}" != gs:// ]]; do BUCKET="${BUCKET%/}"; done
require_var CONFIG "Set it with: export CONFIG=configs/<name>.py   (a config file in the repo)"
if [[ ! -f "${REPO_ROOT}/${CONFIG%%:*}" ]]; then
  warn "CONFIG=${CONFIG} not found in this checkout (${REPO_ROOT}); the workers must have it."
fi
if [[ -z "${RUN_NAME}" ]]; then
  cfg_name="$(basename "${CONFIG%%:*}")"
  RUN_NAME="${cfg_name%.py}-$(date -u +%Y%m%d-%H%M%S)"
fi
[[ "${RUN_NAME}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
  die "RUN_NAME must only hold letters, digits, '.', '_' and '-' (got '${RUN_NAME}'). Set it with: export RUN_NAME=<name>"
check_remote_dir REMOTE_DIR
check_remote_dir REMOTE_LOG_DIR

env_words=()
if [[ -n "${TRAIN_ENV}" ]]; then
  read -r -a env_pairs <<< "${TRAIN_ENV}"
  for pair in ${env_pairs[@]+"${env_pairs[@]}"}; do
    [[ "${pair}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
      die "TRAIN_ENV entries must look like KEY=VALUE (got '${pair}'). Set it with: export TRAIN_ENV='KEY=VALUE ...'"
    env_words+=("$(remote_quote "${pair}")")
  done
fi

workdir="${BUCKET}/${RUN_NAME}"
dir="$(remote_path "${REMOTE_DIR}")"
python="$(remote_path "${REMOTE_VENV}/bin/python")"
logdir="$(remote_path "${REMOTE_LOG_DIR}")"
log="$(remote_path "${REMOTE_LOG_DIR}/${RUN_NAME}.log")"

main=()
if [[ ${#env_words[@]} -gt 0 ]]; then
  main+=(env "${env_words[@]}")
fi
main+=("${python}" -m dydit_jax.main
  "$(remote_quote "--config=${CONFIG}")"
  "$(remote_quote "--workdir=${workdir}")"
  --config.distributed=True)
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  main+=("$(remote_quote "${o}")")
done

remote="set -euo pipefail; cd ${dir} || { echo \"\$(hostname): no code in\" ${dir} \"- run launch/setup.sh first\" >&2; exit 1; }; mkdir -p ${logdir}"
remote+="; if pgrep -f ${pattern} > /dev/null; then echo \"\$(hostname): dydit_jax.main is already running; stop it with launch/train.sh --stop\" >&2; exit 1; fi"
remote+="; nohup ${main[*]} > ${log} 2>&1 < /dev/null &"
remote+=" ln -sfn $(remote_quote "${RUN_NAME}.log") ${logdir}/latest.log"
remote+="; echo \"\$(hostname): started pid \$!, log:\" ${log}"

info "starting run '${RUN_NAME}' (workdir ${workdir}) on all workers of ${TPU_NAME}"
tpu_ssh all "${remote}"
info "follow it with: TPU_NAME=${TPU_NAME} launch/logs.sh   (worker 0; WORKER=n for others)"
