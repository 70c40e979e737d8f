#!/usr/bin/env bash
# Tail the training log of one TPU worker (worker 0 by default).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="${WORKER:-0}"
RUN_NAME="${RUN_NAME:-}"
TAIL_LINES="${TAIL_LINES:-100}"
FOLLOW="${FOLLOW:-1}"

usage() {
  cat << EOF
Usage: launch/logs.sh [--dry-run] [--no-follow] [--help]

Show the training log written by launch/train.sh on one worker:
  gcloud compute tpus tpu-vm ssh \$TPU_NAME --worker=\$WORKER \\
      --command='tail -n \$TAIL_LINES -F \$REMOTE_LOG_DIR/<\$RUN_NAME or latest>.log'
Stop following with Ctrl-C (training keeps running).

Options:
  -n, --dry-run   print the gcloud command instead of running it
  --no-follow     print the last lines and exit (same as FOLLOW=0)
  -h, --help      show this help

${COMMON_ENV_HELP}

logs.sh also reads:
  WORKER              worker index to read from [0]
  RUN_NAME            run whose log to show; empty = the latest run started by train.sh []
  TAIL_LINES          number of lines to show first [100]
  FOLLOW              1 = keep following the log (tail -F), 0 = print and exit [1]

Example:
  PROJECT=my-proj WORKER=3 launch/logs.sh
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-follow) FOLLOW=0 ;;
    *) handle_common_opt "$1" ;;
  esac
  shift
done

check_common
check_remote_dir REMOTE_LOG_DIR
[[ "${WORKER}" =~ ^[0-9]+$ ]] || die "WORKER must be a worker index such as 0 or 3 (got '${WORKER}'). Set it with: export WORKER=<n>"
[[ "${TAIL_LINES}" =~ ^[0-9]+$ ]] || die "TAIL_LINES must be a whole number (got '${TAIL_LINES}')."
case "${FOLLOW}" in
  0 | 1) ;;
  *) die "FOLLOW must be 0 or 1 (got '${FOLLOW}')." ;;
esac

log="$(remote_path "${REMOTE_LOG_DIR}/${RUN_NAME:-latest}.log")"
tail_cmd="tail -n ${TAIL_LINES}"
if [[ "${FOLLOW}" == 1 ]]; then
  tail_cmd+=" -F"
fi
tpu_ssh "${WORKER}" "${tail_cmd} ${log}"
