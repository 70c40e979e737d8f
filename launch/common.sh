# shellcheck shell=bash
# Shared helpers for the Cloud TPU VM launch scripts in launch/.
#
# Sourced (not executed) by create.sh, setup.sh, train.sh, logs.sh and teardown.sh.
# Everything is driven by environment variables; see launch/README.md.
#
# Environment variables (defaults in brackets):
#   PROJECT             GCP project id                                [required]
#   ZONE                TPU zone                                      [us-central2-b]
#   TPU_NAME            TPU VM (node) name                            [dydit-tpu]
#   ACCELERATOR_TYPE    slice type, e.g. v4-8, v4-32, v5litepod-16    [v4-8]
#   RUNTIME_VERSION     TPU software version             [derived from ACCELERATOR_TYPE]
#   QUEUED_RESOURCE_ID  queued-resource id                            [${TPU_NAME}-qr]
#   SPOT                1 = spot capacity, 0 = on-demand              [0]
#   REMOTE_DIR          repo checkout on each worker (relative = under $HOME) [dydit-jax]
#   REMOTE_VENV         virtualenv on each worker (relative = under $HOME)    [dydit-venv]
#   REMOTE_LOG_DIR      training logs on each worker (relative = under $HOME) [dydit-logs]
#   DRY_RUN             1 = print the commands instead of running them [0]
#
# Dry-run mode prints every command that would change something, one per line, quoted so
# that it can be copy-pasted into a shell; informational messages go to stderr.

if [[ -n "${_DYDIT_LAUNCH_COMMON:-}" ]]; then
  return 0
fi
_DYDIT_LAUNCH_COMMON=1

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
export LAUNCH_DIR REPO_ROOT

# ----------------------------------------------------------------------------- defaults
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-dydit-tpu}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED_RESOURCE_ID="${QUEUED_RESOURCE_ID:-${TPU_NAME}-qr}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-dydit-jax}"
REMOTE_VENV="${REMOTE_VENV:-dydit-venv}"
REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-dydit-logs}"
DRY_RUN="${DRY_RUN:-0}"

# The env-var block printed by every script's --help.
# shellcheck disable=SC2034  # used by the scripts that source this file
COMMON_ENV_HELP="Common environment variables (defaults in brackets):
  PROJECT             GCP project id [required]
  ZONE                TPU zone [us-central2-b]
  TPU_NAME            TPU VM (node) name [dydit-tpu]
  ACCELERATOR_TYPE    slice type, e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 [v4-8]
  RUNTIME_VERSION     TPU software version [tpu-ubuntu2204-base for v2/v3/v4,
                      v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p,
                      v2-alpha-tpuv6e for v6e]
  QUEUED_RESOURCE_ID  queued-resource id [\${TPU_NAME}-qr]
  SPOT                1 = spot capacity, 0 = on-demand [0]
  REMOTE_DIR          repo checkout on each worker, relative paths are under \$HOME [dydit-jax]
  REMOTE_VENV         virtualenv on each worker, relative paths are under \$HOME [dydit-venv]
  REMOTE_LOG_DIR      training logs on each worker, relative paths are under \$HOME [dydit-logs]
  DRY_RUN             1 = only print the gcloud commands (same as --dry-run) [0]"

# ----------------------------------------------------------------------------- messages
info() { printf '[launch] %s\n' "$*" >&2; }
warn() { printf '[launch] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[launch] ERROR: %s\n' "$*" >&2
  exit 2
}

is_dry_run() {
  case "${DRY_RUN}" in
    1 | true | yes | True | TRUE) return 0 ;;
    *) return 1 ;;
  esac
}

# ----------------------------------------------------------------------------- quoting
# Quote one word for a POSIX shell: bare when it only holds safe characters, otherwise in
# single quotes (embedded single quotes become '\'').
shell_quote() {
  local s="$1"
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${s}"
    return 0
  fi
  # A character loop rather than ${s//.../...}: the latter's quoting rules differ between
  # bash versions (macOS still ships bash 3.2).
  local out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    if [[ "${c}" == "'" ]]; then
      out+="'\\''"
    else
      out+="${c}"
    fi
  done
  printf "'%s'" "${out}"
}

# Quote a whole argv as one copy-pasteable command line.
quote_cmd() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(shell_quote "${arg}")"
  done
  printf '%s' "${out}"
}

# Quote one word for the remote bash, using double quotes (so that the whole remote
# command still reads well when dry-run prints it inside single quotes).
remote_quote() {
  local s="$1"
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${s}"
    return 0
  fi
  local out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    case "${c}" in
      \\ | '"' | '$' | '`') out+="\\${c}" ;;
      *) out+="${c}" ;;
    esac
  done
  printf '"%s"' "${out}"
}

# A path on the TPU VM as one remote bash word: absolute paths are kept, relative ones go
# under the remote user's home ("$HOME/rel", $HOME expanding on the worker).
remote_path() {
  local p="$1"
  if [[ "${p}" == /* ]]; then
    remote_quote "${p}"
  else
    local q
    q="$(remote_quote "${p}")"
    q="${q#\"}"
    q="${q%\"}"
    # shellcheck disable=SC2016  # $HOME is meant to expand on the remote side
    printf '"$HOME/%s"' "${q}"
  fi
}

# Refuse remote directories that setup.sh could not safely replace.
check_remote_dir() {
  local name="$1" value="${!1:-}"
  case "${value}" in
    "" | / | . | .. | ./ | ../ | \~ | \~/*)
      die "${name}='${value}' is not allowed. Use a path relative to the remote \$HOME (e.g. export ${name}=dydit-jax) or an absolute path."
      ;;
    *) ;;
  esac
}

# ----------------------------------------------------------------------------- running
# run CMD ARGS...: in dry-run mode print the command on stdout; otherwise echo it to
# stderr (prefixed with "+ ") and execute it.
run() {
  if is_dry_run; then
    printf '%s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# ----------------------------------------------------------------------------- checks
# require_var NAME HINT: exit with an error naming NAME when it is unset or empty.
require_var() {
  local name="$1" hint="$2"
  if [[ -z "${!name:-}" ]]; then
    die "${name} is not set. ${hint}"
  fi
}

require_project() {
  require_var PROJECT \
    "Set it with: export PROJECT=<your-gcp-project-id>   (e.g. PROJECT=\"\$(gcloud config get-value project)\")"
}

check_common() {
  require_project
  require_var ZONE "Set it with: export ZONE=<tpu-zone>   (e.g. ZONE=us-central2-b)"
  require_var TPU_NAME "Set it with: export TPU_NAME=<tpu-vm-name>"
  case "${SPOT}" in
    0 | 1) ;;
    *) die "SPOT must be 0 or 1 (got '${SPOT}'). Set it with: export SPOT=1 for spot capacity." ;;
  esac
  if ! is_dry_run && ! command -v gcloud > /dev/null 2>&1; then
    die "gcloud not found on PATH. Install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) or use --dry-run."
  fi
}

# Default TPU software version for an accelerator type (Cloud TPU "TPU software versions").
default_runtime_version() {
  case "$1" in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

resolve_runtime_version() {
  if [[ -z "${RUNTIME_VERSION}" ]]; then
    if ! RUNTIME_VERSION="$(default_runtime_version "${ACCELERATOR_TYPE}")"; then
      die "RUNTIME_VERSION is not set and has no default for ACCELERATOR_TYPE='${ACCELERATOR_TYPE}'. Set it with: export RUNTIME_VERSION=<tpu-software-version>"
    fi
  fi
}

# ----------------------------------------------------------------------------- gcloud
# tpu_ssh WORKER REMOTE_COMMAND [EXTRA_GCLOUD_FLAGS...]: run a bash command on TPU workers.
tpu_ssh() {
  local worker="$1" remote_cmd="$2"
  shift 2
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" \
    "--project=${PROJECT}" "--zone=${ZONE}" "--worker=${worker}" \
    "$@" "--command=${remote_cmd}"
}

# ----------------------------------------------------------------------------- args
# Shared option handling. Each script loops over its arguments and calls
# `handle_common_opt "$1"` for the options it does not handle itself: --help prints the
# calling script's usage() and exits 0, --dry-run sets DRY_RUN=1, anything else is an
# error (exit 2).
handle_common_opt() {
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    -n | --dry-run)
      DRY_RUN=1
      ;;
    *)
      printf '[launch] ERROR: unknown argument: %s (see --help)\n' "$1" >&2
      exit 2
      ;;
  esac
}
