#!/usr/bin/env bash
# Create a Cloud TPU VM through a queued resource and wait until it is ACTIVE.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

POLL_INTERVAL="${POLL_INTERVAL:-30}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-0}"
WAIT=1

usage() {
  cat << EOF
Usage: launch/create.sh [--dry-run] [--no-wait] [--help] [-- EXTRA_GCLOUD_FLAGS...]

Request a TPU slice with
  gcloud compute tpus queued-resources create \$QUEUED_RESOURCE_ID --node-id=\$TPU_NAME
      --accelerator-type=\$ACCELERATOR_TYPE --runtime-version=\$RUNTIME_VERSION [--spot]
then poll 'gcloud compute tpus queued-resources describe' until the state is ACTIVE
(fails on FAILED/SUSPENDED). Polling is skipped with --dry-run or --no-wait.
Arguments after '--' are appended to the create command (e.g. -- --reserved,
-- --network=my-net, -- --valid-until-duration=6h).

Options:
  -n, --dry-run   print the gcloud commands instead of running them
  --no-wait       return right after the create request
  -h, --help      show this help

${COMMON_ENV_HELP}

create.sh also reads:
  POLL_INTERVAL       seconds between state polls [30]
  WAIT_TIMEOUT        give up waiting after this many seconds, 0 = never [0]

Example:
  PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 SPOT=1 launch/create.sh
EOF
}

EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-wait) WAIT=0 ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *) handle_common_opt "$1" ;;
  esac
  shift
done

check_common
require_var ACCELERATOR_TYPE "Set it with: export ACCELERATOR_TYPE=<type>   (e.g. v4-32, v5litepod-16)"
require_var QUEUED_RESOURCE_ID "Set it with: export QUEUED_RESOURCE_ID=<id>   (default: \${TPU_NAME}-qr)"
resolve_runtime_version
[[ "${POLL_INTERVAL}" =~ ^[0-9]+$ ]] || die "POLL_INTERVAL must be a whole number of seconds (got '${POLL_INTERVAL}')."
[[ "${WAIT_TIMEOUT}" =~ ^[0-9]+$ ]] || die "WAIT_TIMEOUT must be a whole number of seconds (got '${WAIT_TIMEOUT}')."

cmd=(gcloud compute tpus queued-resources create "${QUEUED_RESOURCE_ID}"
  "--project=${PROJECT}" "--zone=${ZONE}"
  "--node-id=${TPU_NAME}"
  "--accelerator-type=${ACCELERATOR_TYPE}"
  "--runtime-version=${RUNTIME_VERSION}")
if [[ "${SPOT}" == 1 ]]; then
  cmd+=(--spot)
fi
# (The ${a[@]+...} form keeps empty arrays safe under `set -u` on bash 3.2 / macOS.)
cmd+=(${EXTRA[@]+"${EXTRA[@]}"})

info "requesting ${ACCELERATOR_TYPE} (${RUNTIME_VERSION}) as node '${TPU_NAME}' via queued resource '${QUEUED_RESOURCE_ID}' in ${ZONE} (spot=${SPOT})"
run "${cmd[@]}"

describe_full=(gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE_ID}"
  "--project=${PROJECT}" "--zone=${ZONE}")
describe=("${describe_full[@]}" "--format=value(state.state)")

if [[ "${WAIT}" == 0 ]]; then
  info "not waiting; check the state with: $(quote_cmd "${describe[@]}")"
  exit 0
fi
if is_dry_run; then
  info "dry-run: would poll every ${POLL_INTERVAL}s until the state is ACTIVE with:"
  run "${describe[@]}"
  exit 0
fi

start="${SECONDS}"
while true; do
  state="$("${describe[@]}" || true)"
  elapsed=$((SECONDS - start))
  case "${state}" in
    ACTIVE)
      info "queued resource '${QUEUED_RESOURCE_ID}' is ACTIVE after ${elapsed}s; TPU VM '${TPU_NAME}' is ready."
      info "next: launch/setup.sh"
      exit 0
      ;;
    FAILED | SUSPENDED | SUSPENDING)
      info "queued resource '${QUEUED_RESOURCE_ID}' is ${state}:"
      "${describe_full[@]}" >&2 || true
      die "queued resource '${QUEUED_RESOURCE_ID}' ended in state ${state}; delete it with launch/teardown.sh and retry."
      ;;
  esac
  if [[ "${WAIT_TIMEOUT}" -gt 0 && "${elapsed}" -ge "${WAIT_TIMEOUT}" ]]; then
    die "still ${state:-UNKNOWN} after ${elapsed}s (WAIT_TIMEOUT=${WAIT_TIMEOUT}); the request stays queued — re-run with --no-wait to leave it, or launch/teardown.sh to cancel."
  fi
  info "state: ${state:-UNKNOWN} (${elapsed}s elapsed); next poll in ${POLL_INTERVAL}s"
  sleep "${POLL_INTERVAL}"
done
