"""Snakemake script: apply one recipe and write its checkpoint."""
import json
from pathlib import Path

from qbench.workflow import job

with job(snakemake, gpu=True):  # noqa: F821 - injected by Snakemake
    from qbench import api

    smk = snakemake  # noqa: F821
    calib_dirs = {Path(p).parent.name: str(Path(p).parent) for p in smk.input.calib}
    stats_dirs = {Path(p).parent.name: str(Path(p).parent) for p in smk.input.stats}
    api.quantize(Path(smk.input.card).parent, json.loads(smk.params.recipe),
                 Path(smk.output.manifest).parent, calib_dirs=calib_dirs, stats_dirs=stats_dirs,
                 dtype=smk.params.dtype,
                 recipe_name=smk.wildcards.recipe)
