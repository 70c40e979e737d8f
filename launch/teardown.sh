#!/usr/bin/env bash
# Delete the TPU VM and its queued resource.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

YES=0

usage() {
  cat << EOF
Usage: launch/teardown.sh [--dry-run] [--yes] [--help]

Delete the TPU VM and then the queued resource that requested it:
  gcloud compute tpus tpu-vm delete \$TPU_NAME --quiet
  gcloud compute tpus queued-resources delete \$QUEUED_RESOURCE_ID --force --quiet
Asks for confirmation first unless --yes is given (or with --dry-run, which deletes
nothing). A missing TPU VM (e.g. a request that never got capacity) only warns.
Logs and checkpoints in \$BUCKET are not touched.

Options:
  -n, --dry-run   print the gcloud commands instead of running them
  -y, --yes       do not ask for confirmation
  -h, --help      show this help

${COMMON_ENV_HELP}

Example:
  PROJECT=my-proj TPU_NAME=dydit-tpu launch/teardown.sh --yes
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -y | --yes) YES=1 ;;
    *) handle_common_opt "$1" ;;
  esac
  shift
done

check_common
require_var QUEUED_RESOURCE_ID "Set it with: export QUEUED_RESOURCE_ID=<id>   (default: \${TPU_NAME}-qr)"

if [[ "${YES}" != 1 ]] && ! is_dry_run; then
  prompt="Delete TPU VM '${TPU_NAME}' and queued resource '${QUEUED_RESOURCE_ID}' (project ${PROJECT}, zone ${ZONE})? [y/N] "
  answer=""
  read -r -p "${prompt}" answer || true
  case "${answer}" in
    y | Y | yes | YES) ;;
    *) die "aborted: nothing deleted (pass --yes to skip this question)." ;;
  esac
fi

info "deleting TPU VM '${TPU_NAME}'"
run gcloud compute tpus tpu-vm delete "${TPU_NAME}" \
  "--project=${PROJECT}" "--zone=${ZONE}" --quiet ||
  warn "could not delete TPU VM '${TPU_NAME}' (it may not exist); deleting the queued resource anyway."
info "deleting queued resource '${QUEUED_RESOURCE_ID}'"
run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE_ID}" \
  "--project=${PROJECT}" "--zone=${ZONE}" --force --quiet
info "done."
