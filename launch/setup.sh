#!/usr/bin/env bash
# Put the repo on every TPU worker and install it (with jax[tpu]) into a virtualenv.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL="${REPO_URL:-}"
BRANCH="${BRANCH:-main}"
PYTHON="${PYTHON:-python3}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
CODE_ONLY=0

usage() {
  cat << EOF
Usage: launch/setup.sh [--dry-run] [--code-only] [--help]

On all workers of \$TPU_NAME (gcloud compute tpus tpu-vm ssh --worker=all):
  1. get the code into \$REMOTE_DIR:
       - REPO_URL set:   git clone --branch \$BRANCH \$REPO_URL (or fetch + checkout if
                         already cloned);
       - REPO_URL unset: pack this checkout (git-tracked and untracked-but-not-ignored
                         files, i.e. your uncommitted edits too), copy it with
                         'gcloud compute tpus tpu-vm scp --worker=all' and unpack it,
                         replacing \$REMOTE_DIR;
  2. create the virtualenv \$REMOTE_VENV with \$PYTHON (installing python3-venv via apt if
     needed), then: pip install -U "\$JAX_SPEC" and pip install -e . (in \$REMOTE_DIR).
Re-run it after changing code; --code-only skips step 2.

Options:
  -n, --dry-run   print the gcloud commands instead of running them
  --code-only     only sync the code, do not touch the virtualenv
  -h, --help      show this help

${COMMON_ENV_HELP}

setup.sh also reads:
  REPO_URL            git URL to clone on the workers; empty = copy this checkout []
  BRANCH              branch or tag to clone when REPO_URL is set [main]
  PYTHON              python used to create the virtualenv on the workers [python3]
  JAX_SPEC            pip requirement for JAX on TPU [jax[tpu]]

Example:
  PROJECT=my-proj TPU_NAME=dydit-tpu launch/setup.sh
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --code-only) CODE_ONLY=1 ;;
    *) handle_common_opt "$1" ;;
  esac
  shift
done

check_common
check_remote_dir REMOTE_DIR
check_remote_dir REMOTE_VENV
require_var PYTHON "Set it with: export PYTHON=python3"
require_var JAX_SPEC "Set it with: export JAX_SPEC='jax[tpu]'"
if [[ -n "${REPO_URL}" ]]; then
  require_var BRANCH "Set it with: export BRANCH=<branch-or-tag>   (e.g. BRANCH=main)"
fi

dir="$(remote_path "${REMOTE_DIR}")"
venv="$(remote_path "${REMOTE_VENV}")"
remote_tarball="dydit-jax-src.tar.gz" # lands in the remote $HOME

# Pack this checkout into $1: files git knows about plus untracked files that are not
# ignored (so venvs, caches and build outputs stay behind); without git, tar the tree
# minus the usual clutter.
pack_checkout() {
  local out="$1"
  if git -C "${REPO_ROOT}" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (
      cd "${REPO_ROOT}"
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          if [[ -e "${f}" ]]; then printf '%s\0' "${f}"; fi
        done |
        tar -czf "${out}" --null -T -
    )
  else
    tar -czf "${out}" -C "${REPO_ROOT}" --exclude=.git --exclude=.venv --exclude=venv \
      --exclude=__pycache__ --exclude='*.egg-info' .
  fi
}

# ----------------------------------------------------------------------------- 1. code
if [[ -n "${REPO_URL}" ]]; then
  url="$(remote_quote "${REPO_URL}")"
  branch="$(remote_quote "${BRANCH}")"
  info "cloning ${REPO_URL} (${BRANCH}) into ${REMOTE_DIR} on all workers of ${TPU_NAME}"
  tpu_ssh all "set -euo pipefail; if [ -d ${dir}/.git ]; then git -C ${dir} remote set-url origin ${url} && git -C ${dir} fetch --depth=1 origin ${branch} && git -C ${dir} checkout -f -B ${branch} FETCH_HEAD; else rm -rf ${dir} && git clone --depth=1 --branch ${branch} ${url} ${dir}; fi; git -C ${dir} log -1 --oneline"
else
  if is_dry_run; then
    local_tarball="${TMPDIR:-/tmp}/${remote_tarball}"
    info "dry-run: would pack ${REPO_ROOT} (git ls-files --cached --others --exclude-standard) into ${local_tarball}"
  else
    tmpdir="$(mktemp -d)"
    trap 'rm -rf "${tmpdir}"' EXIT
    local_tarball="${tmpdir}/${remote_tarball}"
    info "packing ${REPO_ROOT} into ${local_tarball}"
    pack_checkout "${local_tarball}"
  fi
  info "copying the checkout to ${REMOTE_DIR} on all workers of ${TPU_NAME}"
  run gcloud compute tpus tpu-vm scp "${local_tarball}" "${TPU_NAME}:${remote_tarball}" \
    "--project=${PROJECT}" "--zone=${ZONE}" --worker=all
  tpu_ssh all "set -euo pipefail; rm -rf ${dir} && mkdir -p ${dir} && tar -xzf \"\$HOME/${remote_tarball}\" -C ${dir} && rm -f \"\$HOME/${remote_tarball}\"; echo \"\$(hostname): code unpacked\""
fi

if [[ "${CODE_ONLY}" == 1 ]]; then
  info "--code-only: virtualenv left as it is."
  exit 0
fi

# ----------------------------------------------------------------------------- 2. venv
py="$(remote_quote "${PYTHON}")"
jax="$(remote_quote "${JAX_SPEC}")"
apt_pkgs="python3-venv"
if [[ "${PYTHON}" != python3 && "${PYTHON}" =~ ^python3\.[0-9]+$ ]]; then
  apt_pkgs+=" ${PYTHON}-venv"
fi
info "installing ${JAX_SPEC} and the repo (pip install -e .) into ${REMOTE_VENV} on all workers"
# The second install names ${JAX_SPEC} again so that, if setup.py's jax range makes pip pick
# another jax than the first install did, jaxlib/libtpu are moved along with it.
tpu_ssh all "set -euo pipefail; if [ ! -x ${venv}/bin/python ]; then ${py} -m venv ${venv} || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${apt_pkgs} && rm -rf ${venv} && ${py} -m venv ${venv}; }; fi; source ${venv}/bin/activate; pip install -q -U pip; pip install -U ${jax}; cd ${dir} && pip install -e . ${jax}; echo -n \"\$(hostname): jax \"; python -c \"import jax, dydit_jax; print(jax.__version__)\""

info "done. next: BUCKET=gs://<bucket>/<dir> CONFIG=configs/<name>.py launch/train.sh"
