"""Snakemake script: materialize a configured model as an HF safetensors directory."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake):  # noqa: F821 - injected by Snakemake
    from qbench import api

    out_dir = Path(snakemake.output.card).parent  # noqa: F821
    api.prepare_model(json.loads(snakemake.params.source), out_dir)  # noqa: F821
