#!/usr/bin/env bash
# One prepared GPU check for qbench's Triton kernels: runs on a bare CUDA machine in at most
# ~9 minutes and writes everything into one folder.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default: gpu_check_out/<UTC timestamp>)
#
# Needs only a Python with torch (CUDA build), triton, transformers, pandas, matplotlib and
# safetensors — no snakemake, lm-eval, pytest or model download: qbench and qbench_kernels are
# taken from this working tree (PYTHONPATH), and speed is measured on random weights of real shapes.
#
# Steps (each under its own hard time limit, each writing its results as it goes):
#   1. compiled kernel checks  — python -m qbench_kernels.selftest --device cuda   (the CI cases,
#      fp16 + bf16; one config per kernel, QBENCH_KERNELS_TUNE=0)                   ≤ 150 s
#   2. kernel latency table    — benchmarks/kernel_latency.py (target shapes first) ≤ 200 s
#   3. decode speed            — benchmarks/decode_speed.py, Llama-3-8B widths with
#      DECODE_LAYERS (default 8) of the 32 layers, all variants                    ≤ 120 s
#   4. the test suite's compiled-CUDA cases — pytest -m gpu on the kernel tests (where pytest
#      is installed; PYTEST_S=0 skips it)                                          ≤ 90 s
# The limits are SELFTEST_S, LATENCY_S, DECODE_S and PYTEST_S (seconds); each benchmark stops
# starting new shapes 60 / 40 s before its limit.
# Then a summary.txt with every step's exit status. Copy the folder's kernel_latency.* /
# decode_speed.* / meta.json into reports/kernels/<device>/ to publish a run in the report.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out/$(date -u +%Y%m%dT%H%M%SZ)}
PY=${PYTHON:-$(command -v python || command -v python3)}
DECODE_LAYERS=${DECODE_LAYERS:-8}
SELFTEST_S=${SELFTEST_S:-150}
LATENCY_S=${LATENCY_S:-200}
DECODE_S=${DECODE_S:-120}
PYTEST_S=${PYTEST_S:-90}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export QBENCH_KERNELS=auto
T0=$SECONDS
log() { echo "[gpu_check +$((SECONDS - T0))s] $*" | tee -a "$OUT/gpu_check.log"; }

date -u > "$OUT/env.txt"
{ echo "git HEAD $(git rev-parse HEAD 2>/dev/null); files differing from it: $(git status --short 2>/dev/null | wc -l)"
  nvidia-smi 2>&1; } >> "$OUT/env.txt" || true
if ! "$PY" - >> "$OUT/env.txt" 2>&1 <<'PYEOF'
import sys
import torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__)
if not torch.cuda.is_available():
    sys.exit(2)
print(torch.cuda.get_device_name())
PYEOF
then
  log "no CUDA device visible to torch (or a package is missing): nothing to check (see env.txt)"
  exit 2
fi

log "1/4 compiled kernel checks"
QBENCH_KERNELS_TUNE=0 timeout "$SELFTEST_S" "$PY" -m qbench_kernels.selftest --device cuda > "$OUT/selftest.txt" 2>&1
rc1=$?
tail -n 1 "$OUT/selftest.txt" | tee -a "$OUT/gpu_check.log"

log "2/4 kernel latency"
timeout "$LATENCY_S" "$PY" benchmarks/kernel_latency.py --out "$OUT" --budget-s $((LATENCY_S - 60)) > "$OUT/kernel_latency.log" 2>&1
rc2=$?

log "3/4 decode speed (${DECODE_LAYERS} layers)"
timeout "$DECODE_S" "$PY" benchmarks/decode_speed.py --out "$OUT" --layers "$DECODE_LAYERS" --steps 16 --repeats 2 \
  --budget-s $((DECODE_S - 40)) > "$OUT/decode_speed.log" 2>&1
rc3=$?

log "4/4 pytest -m gpu (compiled-CUDA test cases)"
if [[ $PYTEST_S -le 0 ]]; then
  echo "PYTEST_S=$PYTEST_S: skipped" > "$OUT/pytest_gpu.txt"; rc4=0
elif "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$PYTEST_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py \
    tests/test_kernel_modules.py > "$OUT/pytest_gpu.txt" 2>&1
  rc4=$?
else
  echo "pytest not installed: skipped" > "$OUT/pytest_gpu.txt"; rc4=0
fi
tail -n 1 "$OUT/pytest_gpu.txt" | tee -a "$OUT/gpu_check.log"

{
  echo "gpu_check finished in $((SECONDS - T0)) s  (exit status 124 = step hit its time limit)"
  echo "selftest        rc=$rc1  $(tail -n 1 "$OUT/selftest.txt")"
  echo "kernel_latency  rc=$rc2"
  echo "decode_speed    rc=$rc3"
  echo "pytest -m gpu   rc=$rc4  $(tail -n 1 "$OUT/pytest_gpu.txt")"
  echo "results:"; find "$OUT" -mindepth 1 | sed "s|$OUT/|  |" | sort
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
[[ $rc1 -eq 0 && $rc2 -eq 0 && $rc3 -eq 0 && $rc4 -eq 0 ]]
